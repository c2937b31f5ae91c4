"""The gateway's config tables: one reader per TOML table, then the checks across tables.

Turns the parsed TOML of one file into a `Config`, every key read through `toml_table.Table`
(secrets resolved, types and ranges checked) and every problem collected into one
`ConfigError`. The dataclasses, `Secret` and `load_config` itself are `config.py`'s.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, urlsplit

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from gateway.config.model import (
    ALGORITHMS,
    DEFAULT_JTI_TOKEN_TTL_S,
    DEFAULT_SCOPES,
    DEFAULT_SUBJECT,
    DEFAULT_TOKEN_TTL_S,
    GATEWAY_CLAIMS,
    JTI_TTL_MARGIN_S,
    KORE_CLAIM_ALIASES,
    MAX_JTI_TTL_S,
    MIN_TOKEN_TTL_S,
    AuditConfig,
    CallerConfig,
    Config,
    ConfigError,
    ConfigWarning,
    KoreApp,
    LoggingConfig,
    RateLimitConfig,
    Secret,
    ServerConfig,
    UpstreamConfig,
    is_loopback,
    split_listen,
)
from gateway.config.toml import Table


def read_tables(raw: dict[str, Any], source: str, base_dir: Path, env: Mapping[str, str]
                ) -> Config:
    """The `Config` of one parsed TOML file; raises ConfigError listing every problem."""
    problems: list[str] = []
    root = Table(raw, "", problems, base_dir, env)

    def sub(name: str) -> Table:
        return Table(root.get(name, dict, {}), name, problems, base_dir, env)

    config = Config(
        server=_server(sub("server")),
        upstream=_upstream(sub("upstream")),
        audit=_audit(sub("audit")),
        rate_limit=_rate_limit(sub("rate_limit")),
        logging=_logging(sub("logging")),
        apps=_apps(root, problems, base_dir, env),
        callers=_callers(root, problems, base_dir, env),
        source=source,
    )
    root.finish()
    problems.extend(_check_config(config))
    if problems:
        raise ConfigError(source, problems)
    return config


def _server(t: Table) -> ServerConfig:
    d = ServerConfig()
    listen = t.get("listen", str, d.listen)
    try:
        split_listen(listen)
    except ValueError as exc:
        t.fail("listen", f"{exc} (e.g. \"127.0.0.1:8080\")")
        listen = d.listen
    server = ServerConfig(
        listen=listen,
        auth=t.choice("auth", d.auth, ("api-key", "none")),
        max_body_bytes=t.number("max_body_bytes", d.max_body_bytes, low=1, integer=True),
        max_batch_items=t.number("max_batch_items", d.max_batch_items, low=1, integer=True),
        max_in_flight=t.number("max_in_flight", d.max_in_flight, low=1, integer=True),
        drain_s=t.number("drain_s", d.drain_s, low=0),
        batch_concurrency=t.number("batch_concurrency", d.batch_concurrency, low=1,
                                   integer=True),
        client_timeout_s=t.number("client_timeout_s", d.client_timeout_s, low=0.1),
        max_header_bytes=t.number("max_header_bytes", d.max_header_bytes, low=256,
                                  integer=True),
        max_headers=t.number("max_headers", d.max_headers, low=8, integer=True),
        admin_listen=_admin_listen(t, listen),
        max_head_bytes=t.number("max_head_bytes", d.max_head_bytes, low=1024, integer=True),
        trusted_proxies=_networks(t, "trusted_proxies"),
        max_connections=t.number("max_connections", d.max_connections, low=1, integer=True),
        max_connections_per_client=t.number("max_connections_per_client",
                                            d.max_connections_per_client, low=1, integer=True),
        keepalive_timeout_s=t.number("keepalive_timeout_s", d.keepalive_timeout_s, low=0.1),
        write_timeout_s=t.number("write_timeout_s", d.write_timeout_s, low=0.1),
    )
    if server.max_head_bytes < server.max_header_bytes:
        t.fail("max_head_bytes", f"must be at least max_header_bytes ({server.max_header_bytes})")
    if server.auth == "none" and not is_loopback(server.host):
        t.fail("auth", f'"none" is allowed only on a loopback listen address, not {server.host}')
    t.finish()
    return server


_ANY_HOST = frozenset({"0.0.0.0", "::", "*", ""})


def _admin_listen(t: Table, listen: str) -> str:
    """`server.admin_listen`: "" (off) or HOST:PORT, never the API's own address."""
    admin: str = t.get("admin_listen", str, "")
    if not admin:
        return ""
    try:
        host, port = split_listen(admin)
    except ValueError as exc:
        t.fail("admin_listen", f'{exc} (e.g. "0.0.0.0:9091"), or "" for none')
        return ""
    api_host, api_port = split_listen(listen)
    # Same port on the same or an overlapping (wildcard) address: the two would collide.
    if port and port == api_port and (host == api_host or {host, api_host} & _ANY_HOST):
        t.fail("admin_listen", f"must differ from server.listen ({listen}): use another port")
        return ""
    return admin
def _networks(t: Table, name: str) -> tuple[str, ...]:
    """A list of CIDRs (a bare address is its own /32 or /128), each checked."""
    value = t.get(name, list, [])
    networks = []
    for i, item in enumerate(value):
        try:
            networks.append(str(ipaddress.ip_network(item, strict=False)))
        except (TypeError, ValueError):
            t.fail(f"{name}[{i}]", f"not an IP network in CIDR form (e.g. \"10.0.0.0/8\"): "
                   f"{item!r}")
    return tuple(networks)


def _upstream(t: Table) -> UpstreamConfig:
    d = UpstreamConfig()
    up = UpstreamConfig(
        base_url=t.get("base_url", str, d.base_url).rstrip("/"),
        session_path=t.get("session_path", str, d.session_path),
        bot_id_pattern=t.get("bot_id_pattern", str, d.bot_id_pattern),
        timeout_s=t.number("timeout_s", d.timeout_s, low=0.01),
        max_attempts=t.number("max_attempts", d.max_attempts, low=1, high=20, integer=True),
        allow_insecure_http=t.get("allow_insecure_http", bool, d.allow_insecure_http),
        ca_file=t.path("ca_file", None),
        backoff_base_s=t.number("backoff_base_s", d.backoff_base_s, low=0),
        backoff_max_s=t.number("backoff_max_s", d.backoff_max_s, low=0),
        breaker_failures=t.number("breaker_failures", d.breaker_failures, low=1, integer=True),
        breaker_cooldown_s=t.number("breaker_cooldown_s", d.breaker_cooldown_s, low=0),
        breaker_host_bots=t.number("breaker_host_bots", d.breaker_host_bots, low=2,
                                   integer=True),
        breaker_window_s=t.number("breaker_window_s", d.breaker_window_s, low=0.1),
        max_connections=t.number("max_connections", d.max_connections, low=1, integer=True),
    )
    _check_base_url(t, up)
    if up.session_path.count("{botId}") != 1 or not up.session_path.startswith("/"):
        t.fail("session_path", 'must start with "/" and contain "{botId}" exactly once')
    try:
        re.compile(up.bot_id_pattern)
    except re.error as exc:
        t.fail("bot_id_pattern", f"not a valid regular expression: {exc}")
    if up.ca_file and not Path(up.ca_file).is_file():
        t.fail("ca_file", f"{up.ca_file} is not a readable file")
    t.finish()
    return up


def _check_base_url(t: Table, up: UpstreamConfig) -> None:
    """Every problem of the URL, not only the first (the message never repeats the URL: it
    may hold a password)."""
    parts = urlsplit(up.base_url)
    if "@" in parts.netloc:
        t.fail("base_url", "must not carry user:password@ (Kore.ai authenticates the JWT; "
               "credentials in the URL would show wherever the upstream is named)")
    if parts.scheme not in ("https", "http") or not parts.hostname:
        t.fail("base_url", "must be an absolute URL such as \"https://bots.kore.ai\"")
        return
    if parts.scheme == "http" and not up.allow_insecure_http:
        t.fail("base_url", "must use https:// (set upstream.allow_insecure_http = true "
               "only for a local sandbox)")
    if parts.query or parts.fragment:
        t.fail("base_url", "must not have a query or fragment")
    if not _valid_port(parts):
        t.fail("base_url", "has an invalid port")


def _valid_port(parts: SplitResult) -> bool:
    try:
        parts.port  # noqa: B018 - reading it validates it
    except ValueError:
        return False
    return True


def _audit(t: Table) -> AuditConfig:
    d = AuditConfig()
    path = t.path("path", d.path) or ""
    audit = AuditConfig(
        path=path,
        hash_user_ids=t.get("hash_user_ids", bool, d.hash_user_ids),
        max_bytes=t.number("max_bytes", d.max_bytes, low=1024, integer=True),
        fsync=t.get("fsync", bool, d.fsync),
        max_unauthenticated_per_s=t.number("max_unauthenticated_per_s",
                                           d.max_unauthenticated_per_s, low=0, integer=True),
        chain_key=_chain_key(t, Path(path).parent if path else None),
        anchor_every_s=t.number("anchor_every_s", d.anchor_every_s, low=0.05),
    )
    if not audit.path:
        t.fail("path", "must not be empty")
    elif (problem := _audit_path_problem(Path(audit.path))) is not None:
        t.fail("path", problem)
    t.finish()
    return audit


def _audit_path_problem(path: Path) -> str | None:
    """What keeps `audit.path` from ever opening, seen without opening it (so `check-config`
    says what `serve` would): a directory there, or a file where a directory must be. What
    depends on the moment (permissions, space) is found when the log opens."""
    if path.is_dir():
        return f"{path}: is a directory; give the path of the log file"
    for parent in path.parents:  # nearest first: the deepest part that exists
        if parent.exists():
            return None if parent.is_dir() else f"{path}: {parent} is not a directory"
    return None


def _chain_key(t: Table, audit_dir: Path | None) -> Secret | None:
    """From chain_key_env or chain_key_file ("" = not set); never from the config file itself,
    and never from a file in the audit directory: whoever can rewrite the log must not have it."""
    if "chain_key" in t.data:
        t.data.pop("chain_key")
        t.fail("chain_key", "give chain_key_env or chain_key_file: the key is never written "
               "in the config")
    env = t.get("chain_key_env", str, "")
    file = t.get("chain_key_file", str, "")
    if env and file:
        t.fail("chain_key_env", "give only one of chain_key_env, chain_key_file")
        return None
    if file and audit_dir is not None and _inside(t.base_dir / file, audit_dir):
        t.fail("chain_key_file", f"{t.base_dir / file} is in the audit directory "
               f"{audit_dir}: keep the key off the audit volume")
        return None
    if env:
        return t.read_secret("chain_key_env", env)
    return t.read_secret("chain_key_file", file) if file else None


def _inside(path: Path, directory: Path) -> bool:
    """As written and with symlinks resolved: a link in the directory is in it too."""
    named = Path(os.path.abspath(path))
    return any(p.is_relative_to(d) for p in (named, path.resolve())
               for d in (Path(os.path.abspath(directory)), directory.resolve()))


def _rate_limit(t: Table) -> RateLimitConfig:
    d = RateLimitConfig()
    enabled = t.get("enabled", bool, d.enabled)
    backend = t.choice("backend", d.backend, ("memory", "redis"))
    rl = RateLimitConfig(
        enabled=enabled,
        backend=backend,
        windows=_windows(t, d.windows),
        # The Redis URL is resolved only when Redis is used: a memory deployment need not set it.
        redis_url=t.secret("redis_url", required=False, resolve=enabled and backend == "redis"),
        local_fallback_fraction=t.number("local_fallback_fraction", d.local_fallback_fraction,
                                         low=0, high=1),
        redis_timeout_s=t.number("redis_timeout_s", d.redis_timeout_s, low=0.01, high=10),
        backoff_s=t.number("backoff_s", d.backoff_s, low=0.01, high=86400),
        max_pause_s=t.number("max_pause_s", d.max_pause_s, low=0.01, high=86400),
    )
    if rl.max_pause_s < rl.backoff_s:
        t.fail("max_pause_s", f"must be at least backoff_s ({rl.backoff_s:g})")
    if rl.enabled and rl.backend == "redis" and rl.redis_url is None:
        t.fail("redis_url", 'is required when backend = "redis" (as redis_url, redis_url_env '
               "or redis_url_file)")
    t.finish()
    return rl


def _windows(t: Table, default: tuple[tuple[int, float], ...]) -> tuple[tuple[int, float], ...]:
    raw = t.get("windows", list, None)
    if raw is None:
        return default
    windows = []
    for i, item in enumerate(raw):
        w = Table(item, f"{t.key('windows')}[{i}]", t.problems, t.base_dir, t.env)
        calls = w.number("calls", 0, low=1, integer=True)
        per_s = w.number("per_s", 0.0, low=0.001)
        if isinstance(item, dict) and ("calls" not in item or "per_s" not in item):
            w.fail("", "needs both calls and per_s")
        w.finish()
        windows.append((calls, per_s))
    if not windows:
        t.fail("windows", "must list at least one window (or set enabled = false)")
        return default
    return tuple(windows)


def _logging(t: Table) -> LoggingConfig:
    d = LoggingConfig()
    cfg = LoggingConfig(
        level=t.choice("level", d.level, ("debug", "info", "warning", "error")),
        format=t.choice("format", d.format, ("auto", "json", "console")),
        file=t.path("file", d.file) or "",
        file_max_bytes=t.number("file_max_bytes", d.file_max_bytes, low=4096, integer=True),
    )
    if cfg.file and cfg.format == "console":
        t.fail("file", 'the log file is JSON lines: use format = "json" or "auto" with it')
    t.finish()
    return cfg


def _array(root: Table, name: str) -> list[Any]:
    value = root.get(name, list, [])
    return list(value)


def _apps(root: Table, problems: list[str], base: Path, env: Mapping[str, str]
          ) -> tuple[KoreApp, ...]:
    apps = [_app(Table(item, f"apps[{i}]", problems, base, env))
            for i, item in enumerate(_array(root, "apps"))]
    return tuple(a for a in apps if a is not None)


def _app(t: Table) -> KoreApp | None:
    name = t.get("name", str, "")
    client_id = t.get("client_id", str, "")
    algorithm = t.choice("algorithm", "HS256", ALGORITHMS)
    hs = algorithm.startswith("HS")
    jti = t.get("jti", bool, False)
    app = KoreApp(
        name=name,
        client_id=client_id,
        algorithm=algorithm,
        client_secret=t.secret("client_secret", required=hs),
        private_key=t.secret("private_key", required=not hs),
        token_ttl_s=t.number("token_ttl_s", DEFAULT_JTI_TOKEN_TTL_S if jti else DEFAULT_TOKEN_TTL_S,
                             low=MIN_TOKEN_TTL_S, high=86400, integer=True),
        jti=jti,
        subject=t.get("subject", str, DEFAULT_SUBJECT),
        scopes=t.strings("scopes", DEFAULT_SCOPES),
        bots=t.strings("bots", ("*",)),
        extra_claims=t.get("extra_claims", dict, {}),
        renew_before_s=t.number("renew_before_s", 60, low=0, integer=True),
    )
    if not name:
        t.fail("name", "is required")
    if not client_id:
        t.fail("client_id", "is required (the Kore.ai app's client ID, cs-…)")
    if app.jti and app.token_ttl_s > MAX_JTI_TTL_S:
        t.fail("token_ttl_s", f"at most {MAX_JTI_TTL_S} when jti = true")
    if not hs and app.client_secret is not None:
        t.fail("client_secret", f"is not used with {algorithm}; give private_key_file instead")
    if hs and app.private_key is not None:
        t.fail("private_key", f"is not used with {algorithm}; give client_secret instead")
    _check_claims(t, app)
    _check_key(t, app)
    t.finish()
    return app


def _check_claims(t: Table, app: KoreApp) -> None:
    """`extra_claims` adds claims; it never replaces one the gateway sets, directly or through
    Kore.ai's aliases (a fixed `kore_jti` would make every token a replay)."""
    aliases = [k for k in KORE_CLAIM_ALIASES if k in app.extra_claims]
    if aliases:
        t.fail("extra_claims", f"{', '.join(aliases)}: Kore.ai reads these as overrides of "
               "jti, iss and sub; they cannot be set here (use subject, and jti = true)")
    own = [k for k in GATEWAY_CLAIMS if k in app.extra_claims]
    if own:
        t.fail("extra_claims", f"{', '.join(own)}: set by the gateway itself "
               "(client_id, subject, token_ttl_s, jti); they cannot be set here")


def config_warnings(config: Config) -> list[ConfigWarning]:
    """What a config may hold but probably should not; shown at start-up and by check-config."""
    found = []
    for i, app in enumerate(config.apps):
        if app.jti and app.token_ttl_s >= MAX_JTI_TTL_S - JTI_TTL_MARGIN_S:
            found.append(ConfigWarning(f"apps[{i}].token_ttl_s", (
                f"{app.token_ttl_s} s is within {JTI_TTL_MARGIN_S} s of Kore.ai's "
                f"{MAX_JTI_TTL_S} s cap for tokens with a jti; Kore.ai measures exp on its "
                "own clock, so a Kore.ai clock slightly behind the gateway's refuses every "
                "token "
                f"(use less than {MAX_JTI_TTL_S - JTI_TTL_MARGIN_S}, or leave it unset for "
                f"{DEFAULT_JTI_TOKEN_TTL_S})")))
        if not re.fullmatch(r"cs-[A-Za-z0-9-]+", app.client_id):
            found.append(ConfigWarning(f"apps[{i}].client_id", (
                "is not shaped like a Kore.ai client ID (cs-…, as Bot Builder shows it under "
                "the app's client ID); Kore.ai will refuse tokens whose appId it does not know")))
    for i, caller in enumerate(config.callers):
        if caller.bots_unset:
            found.append(ConfigWarning(f"callers[{i}].bots", (
                f"is not set, so caller {caller.name} may touch every bot; give its globs "
                '(bots = ["*"] says every bot on purpose and is not warned about)')))
    return found


def _check_key(t: Table, app: KoreApp) -> None:
    if app.private_key is None or app.algorithm.startswith("HS"):
        return
    try:
        serialization.load_pem_private_key(app.private_key.reveal().encode(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        t.fail("private_key", "is not an unencrypted PEM private key")


def _callers(root: Table, problems: list[str], base: Path, env: Mapping[str, str]
             ) -> tuple[CallerConfig, ...]:
    callers = []
    for i, item in enumerate(_array(root, "callers")):
        t = Table(item, f"callers[{i}]", problems, base, env)
        unset = isinstance(item, dict) and "bots" not in item
        caller = CallerConfig(
            name=t.get("name", str, ""),
            key_sha256=t.get("key_sha256", str, "").lower(),
            bots=t.strings("bots", ("*",)),
            bots_unset=unset,
        )
        if not caller.name:
            t.fail("name", "is required")
        if not re.fullmatch(r"[0-9a-f]{64}", caller.key_sha256):
            t.fail("key_sha256", "must be 64 hex digits (see `kore-gateway hash-key`)")
        t.finish()
        callers.append(caller)
    return tuple(callers)


def _check_config(config: Config) -> list[str]:
    problems = []
    if not config.apps:
        problems.append("apps: at least one [[apps]] entry is required")
    problems += _duplicates("apps", [a.name for a in config.apps])
    problems += _duplicates("callers", [c.name for c in config.callers])
    problems += _duplicates("callers", [c.key_sha256 for c in config.callers], what="key_sha256")
    if config.server.auth == "api-key" and not config.callers:
        problems.append('callers: at least one [[callers]] entry is required when '
                        'server.auth = "api-key"')
    return problems


def _duplicates(table: str, values: list[str], what: str = "name") -> list[str]:
    seen: set[str] = set()
    out = []
    for i, value in enumerate(values):
        if value and value in seen:
            out.append(f"{table}[{i}].{what}: duplicate value")
        seen.add(value)
    return out
