"""Configuration: one TOML file → frozen dataclasses, every check, `Secret`, `ConfigError`.

`load_config(path)` is the one way in. After loading, nothing reads the environment.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

DEFAULT_SUBJECT = "kore-session-gateway"
DEFAULT_SCOPES = ("Bot Sessions",)
BOT_SESSIONS_SCOPE = "Bot Sessions"
ALGORITHMS = ("HS256", "HS512", "RS256", "RS512")


class Secret:
    """A secret value that never shows itself in `repr`, `str` or logs."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True, slots=True)
class KoreApp:
    """A Kore.ai app whose credentials sign the JWT."""

    name: str
    client_id: str
    algorithm: str = "HS256"
    client_secret: Secret | None = None  # HS*
    private_key: Secret | None = None  # RS*: PEM text
    token_ttl_s: int = 600
    jti: bool = False
    subject: str = DEFAULT_SUBJECT
    scopes: tuple[str, ...] = DEFAULT_SCOPES
    bots: tuple[str, ...] = ("*",)
    extra_claims: Mapping[str, Any] = field(default_factory=dict)
    renew_before_s: int = 60  # a cached token is renewed this long before it expires


DEFAULT_LISTEN = "127.0.0.1:8080"
DEFAULT_BASE_URL = "https://bots.kore.ai"
DEFAULT_SESSION_PATH = "/api/public/bot/{botId}/session"
DEFAULT_BOT_ID_PATTERN = r"^st-[A-Za-z0-9-]{1,100}$"
DEFAULT_AUDIT_PATH = "audit/deactivations.jsonl"
DEFAULT_WINDOWS = ((600, 60.0), (18000, 3600.0))
MAX_JTI_TTL_S = 3600
MIN_TOKEN_TTL_S = 30  # a token must outlive the 10 s "never sent" margin by a useful amount


@dataclass(frozen=True, slots=True)
class ServerConfig:
    listen: str = DEFAULT_LISTEN
    auth: str = "api-key"  # "api-key" or "none" (loopback listen only)
    max_body_bytes: int = 65536
    max_batch_items: int = 1000
    max_in_flight: int = 1000
    drain_s: float = 20.0
    batch_concurrency: int = 16  # batch items sent upstream at once
    client_timeout_s: float = 15.0  # a client must deliver its request within this time
    max_header_bytes: int = 8190  # one header line / field, aiohttp's parser limit
    max_headers: int = 64

    @property
    def host(self) -> str:
        return split_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return split_listen(self.listen)[1]


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    base_url: str = DEFAULT_BASE_URL
    session_path: str = DEFAULT_SESSION_PATH
    bot_id_pattern: str = DEFAULT_BOT_ID_PATTERN
    timeout_s: float = 10.0  # whole deadline for one caller request, retries included
    max_attempts: int = 3
    allow_insecure_http: bool = False
    ca_file: str | None = None
    backoff_base_s: float = 0.1  # exponential backoff with full jitter between attempts
    backoff_max_s: float = 2.0
    breaker_failures: int = 20  # failed requests in a row (after retries) that open the circuit
    breaker_cooldown_s: float = 5.0
    max_connections: int = 100


@dataclass(frozen=True, slots=True)
class AuditConfig:
    path: str = DEFAULT_AUDIT_PATH
    hash_user_ids: bool = False
    max_bytes: int = 104857600
    fsync: bool = True


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    enabled: bool = True
    backend: str = "memory"  # or "redis"
    windows: tuple[tuple[int, float], ...] = DEFAULT_WINDOWS  # (calls, per_s)
    redis_url: Secret | None = None
    local_fallback_fraction: float = 0.5  # share of the budget used while Redis is down
    redis_timeout_s: float = 0.25


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: str = "info"
    format: str = "auto"  # "json", "console" or "auto" (console on a terminal)


@dataclass(frozen=True, slots=True)
class CallerConfig:
    name: str
    key_sha256: str = field(repr=False)
    bots: tuple[str, ...] = ("*",)


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = ServerConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    audit: AuditConfig = AuditConfig()
    rate_limit: RateLimitConfig = RateLimitConfig()
    logging: LoggingConfig = LoggingConfig()
    apps: tuple[KoreApp, ...] = ()
    callers: tuple[CallerConfig, ...] = ()
    source: str = "<defaults>"


def split_listen(listen: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` → (host, port); raises ValueError."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host:
        raise ValueError("expected HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    number = int(port)
    if not 0 <= number <= 65535:
        raise ValueError("port must be 0-65535")
    return host, number


def with_changes(obj: Any, **changes: Any) -> Any:
    """`dataclasses.replace`, named for call sites that tweak a loaded config."""
    return dataclasses.replace(obj, **changes)


class ConfigError(Exception):
    """Every problem of one config file, each naming the file and the key."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__("\n".join(f"{source}: {p}" for p in problems))


_LOOPBACK_NAMES = {"localhost", "::1"}


def is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Table:
    """Reads one TOML table with typed getters, collecting problems instead of raising."""

    def __init__(self, data: Any, where: str, problems: list[str], base_dir: Path,
                 env: Mapping[str, str]) -> None:
        self.where, self.problems, self.base_dir, self.env = where, problems, base_dir, env
        if not isinstance(data, dict):
            self.fail("", "must be a table")
            data = {}
        self.data = dict(data)

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def fail(self, name: str, message: str) -> None:
        self.problems.append(f"{self.key(name) if name else self.where}: {message}")

    def get(self, name: str, kind: type | tuple[type, ...], default: Any) -> Any:
        if name not in self.data:
            return default
        value = self.data.pop(name)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and kind is not bool:
            self.fail(name, f"must be {_kind_name(kind)}, not a boolean")
            return default
        if not isinstance(value, kind):
            self.fail(name, f"must be {_kind_name(kind)}")
            return default
        return value

    def number(self, name: str, default: float, *, low: float, high: float | None = None,
               integer: bool = False) -> Any:
        if name not in self.data:
            return default
        value = self.get(name, int if integer else float, default)
        if value < low or (high is not None and value > high):
            bound = f"between {low:g} and {high:g}" if high is not None else f"at least {low:g}"
            self.fail(name, f"must be {bound}")
            return default
        return value

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value: str = self.get(name, str, default)
        if value not in choices:
            self.fail(name, "must be one of " + ", ".join(f'"{c}"' for c in choices))
            return default
        return value

    def strings(self, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self.get(name, list, list(default))
        if not all(isinstance(v, str) and v for v in value):
            self.fail(name, "must be a list of non-empty strings")
            return default
        return tuple(value)

    def path(self, name: str, default: str | None) -> str | None:
        value = self.get(name, str, default)
        if value is None:
            return None
        return str((self.base_dir / value).resolve()) if value else value

    def secret(self, name: str, *, required: bool, resolve: bool = True) -> Secret | None:
        forms = [f for f in (name, f"{name}_env", f"{name}_file") if f in self.data]
        if not resolve:
            for f in forms:
                self.get(f, str, "")
            return None
        if len(forms) > 1:
            self.fail(name, f"give only one of {name}, {name}_env, {name}_file")
            for f in forms:
                self.data.pop(f)
            return None
        if not forms:
            if required:
                self.fail(name, f"is required (as {name}, {name}_env or {name}_file)")
            return None
        return self._read_secret(forms[0], self.get(forms[0], str, ""))

    def _read_secret(self, form: str, value: str) -> Secret | None:
        if form.endswith("_env"):
            text = self.env.get(value, "")
            if not text:
                self.fail(form, f"environment variable {value} is not set or empty")
                return None
            return Secret(text)
        if form.endswith("_file"):
            path = (self.base_dir / value).resolve()
            try:
                text = path.read_text(encoding="utf-8").strip()
            except OSError as exc:
                self.fail(form, f"cannot read {path}: {exc.strerror or exc}")
                return None
            if not text:
                self.fail(form, f"{path} is empty")
                return None
            return Secret(text)
        if not value:
            self.fail(form, "must not be empty")
            return None
        return Secret(value)

    def finish(self) -> None:
        for name in sorted(self.data):
            self.fail(name, "unknown key")


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
             list: "a list", dict: "a table"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Reads, resolves and checks one TOML config file; raises ConfigError listing every problem."""
    source = str(path)
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(source, [f"cannot read the config file: {exc.strerror or exc}"]) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(source, [f"not valid TOML: {exc}"]) from None
    problems: list[str] = []
    base_dir = Path(path).resolve().parent
    env = os.environ if env is None else env
    root = _Table(raw, "", problems, base_dir, env)

    def sub(name: str) -> _Table:
        return _Table(root.get(name, dict, {}), name, problems, base_dir, env)

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


def _server(t: _Table) -> ServerConfig:
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
    )
    if server.auth == "none" and not is_loopback(server.host):
        t.fail("auth", f'"none" is allowed only on a loopback listen address, not {server.host}')
    t.finish()
    return server


def _upstream(t: _Table) -> UpstreamConfig:
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


def _check_base_url(t: _Table, up: UpstreamConfig) -> None:
    parts = urlsplit(up.base_url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        t.fail("base_url", "must be an absolute URL such as \"https://bots.kore.ai\"")
    elif parts.scheme == "http" and not up.allow_insecure_http:
        t.fail("base_url", "must use https:// (set upstream.allow_insecure_http = true "
               "only for a local sandbox)")
    elif parts.query or parts.fragment:
        t.fail("base_url", "must not have a query or fragment")


def _audit(t: _Table) -> AuditConfig:
    d = AuditConfig()
    audit = AuditConfig(
        path=t.path("path", d.path) or "",
        hash_user_ids=t.get("hash_user_ids", bool, d.hash_user_ids),
        max_bytes=t.number("max_bytes", d.max_bytes, low=1024, integer=True),
        fsync=t.get("fsync", bool, d.fsync),
    )
    if not audit.path:
        t.fail("path", "must not be empty")
    t.finish()
    return audit


def _rate_limit(t: _Table) -> RateLimitConfig:
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
    )
    if rl.enabled and rl.backend == "redis" and rl.redis_url is None:
        t.fail("redis_url", 'is required when backend = "redis" (as redis_url, redis_url_env '
               "or redis_url_file)")
    t.finish()
    return rl


def _windows(t: _Table, default: tuple[tuple[int, float], ...]) -> tuple[tuple[int, float], ...]:
    raw = t.get("windows", list, None)
    if raw is None:
        return default
    windows = []
    for i, item in enumerate(raw):
        w = _Table(item, f"{t.key('windows')}[{i}]", t.problems, t.base_dir, t.env)
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


def _logging(t: _Table) -> LoggingConfig:
    d = LoggingConfig()
    cfg = LoggingConfig(
        level=t.choice("level", d.level, ("debug", "info", "warning", "error")),
        format=t.choice("format", d.format, ("auto", "json", "console")),
    )
    t.finish()
    return cfg


def _array(root: _Table, name: str) -> list[Any]:
    value = root.get(name, list, [])
    return list(value)


def _apps(root: _Table, problems: list[str], base: Path, env: Mapping[str, str]
          ) -> tuple[KoreApp, ...]:
    apps = [_app(_Table(item, f"apps[{i}]", problems, base, env))
            for i, item in enumerate(_array(root, "apps"))]
    return tuple(a for a in apps if a is not None)


def _app(t: _Table) -> KoreApp | None:
    name = t.get("name", str, "")
    client_id = t.get("client_id", str, "")
    algorithm = t.choice("algorithm", "HS256", ALGORITHMS)
    hs = algorithm.startswith("HS")
    app = KoreApp(
        name=name,
        client_id=client_id,
        algorithm=algorithm,
        client_secret=t.secret("client_secret", required=hs),
        private_key=t.secret("private_key", required=not hs),
        token_ttl_s=t.number("token_ttl_s", 600, low=MIN_TOKEN_TTL_S, high=86400, integer=True),
        jti=t.get("jti", bool, False),
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
    _check_key(t, app)
    t.finish()
    return app


def _check_key(t: _Table, app: KoreApp) -> None:
    if app.private_key is None or app.algorithm.startswith("HS"):
        return
    try:
        serialization.load_pem_private_key(app.private_key.reveal().encode(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        t.fail("private_key", "is not an unencrypted PEM private key")


def _callers(root: _Table, problems: list[str], base: Path, env: Mapping[str, str]
             ) -> tuple[CallerConfig, ...]:
    callers = []
    for i, item in enumerate(_array(root, "callers")):
        t = _Table(item, f"callers[{i}]", problems, base, env)
        caller = CallerConfig(
            name=t.get("name", str, ""),
            key_sha256=t.get("key_sha256", str, "").lower(),
            bots=t.strings("bots", ("*",)),
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
