"""Tests for gateway.config: every check names the file and the key, secrets stay hidden."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.config import model as config_module
from gateway.config.loader import load_config
from gateway.config.model import (
    AuditConfig,
    CallerConfig,
    Config,
    ConfigError,
    KoreApp,
    LoggingConfig,
    RateLimitConfig,
    Secret,
    ServerConfig,
    UpstreamConfig,
    )
from tests.conftest import CLIENT_SECRET, base_settings, merge, write_config

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "config" / "gateway.example.toml"
DEMO = REPO / "config" / "demo.toml"
CONTRACT_SAMPLE = Path(__file__).resolve().parents[1] / "data" / "contract-sample.toml"
SECRET_ENV = {"KORE_CLIENT_SECRET": "env-secret-value-0123456789abcdef"}

Settings = dict[str, Any]
Change = Callable[[Settings], None]


def load(tmp_path: Path, settings: Settings, env: dict[str, str] | None = None) -> Config:
    return load_config(write_config(tmp_path, settings), env=env or {})


def config_error(tmp_path: Path, settings: Settings, env: dict[str, str] | None = None
                 ) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, settings, env)
    return caught.value


def problem_lines(exc: ConfigError) -> list[str]:
    return str(exc).splitlines()


def pem_key() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def app0(s: Settings) -> dict[str, Any]:
    app: dict[str, Any] = s["apps"][0]
    return app


def _set(path: str, value: Any) -> Change:
    """A change setting a dotted key (`server.listen`, `apps.0.jti`) in the settings."""
    def change(s: Settings) -> None:
        *parents, last = path.split(".")
        target: Any = s
        for part in parents:
            if part.isdigit():
                target = target[int(part)]
            else:
                target = target.setdefault(part, {})
        if isinstance(target, list):
            target[int(last)] = value
        else:
            target[last] = value
    return change


def _drop(path: str) -> Change:
    def change(s: Settings) -> None:
        *parents, last = path.split(".")
        target: Any = s
        for part in parents:
            target = target[int(part)] if part.isdigit() else target[part]
        del target[last]
    return change


def _both(*changes: Change) -> Change:
    def change(s: Settings) -> None:
        for c in changes:
            c(s)
    return change


def _second_app(s: Settings) -> None:
    s["apps"].append(dict(s["apps"][0]))


def _rs_app(key: str | None = None) -> Change:
    def change(s: Settings) -> None:
        app = app0(s)
        app["algorithm"] = "RS256"
        del app["client_secret"]
        if key is not None:
            app["private_key"] = key
    return change


# (id, change to the valid base settings, the key named, a fragment of its message)
CONFIG_ERRORS: list[tuple[str, Change, str, str]] = [
    # unknown keys, at every level
    ("unknown-top-level", _set("servr", {}), "servr", "unknown key"),
    ("unknown-server", _set("server.lisen", "127.0.0.1:1"), "server.lisen", "unknown key"),
    ("unknown-upstream", _set("upstream.timeout", 3), "upstream.timeout", "unknown key"),
    ("unknown-audit", _set("audit.rotate", True), "audit.rotate", "unknown key"),
    ("unknown-rate-limit", _set("rate_limit.burst", 5), "rate_limit.burst", "unknown key"),
    ("unknown-logging", _set("logging.colour", True), "logging.colour", "unknown key"),
    ("unknown-apps", _set("apps.0.secret", "x"), "apps[0].secret", "unknown key"),
    ("unknown-callers", _set("callers.1.key", "x"), "callers[1].key", "unknown key"),
    ("unknown-window-item",
     _set("rate_limit.windows", [{"calls": 1, "per_s": 1, "burst": 2}]),
     "rate_limit.windows[0].burst", "unknown key"),
    # wrong types
    ("listen-not-string", _set("server.listen", 8080), "server.listen", "must be a string"),
    ("int-as-string", _set("server.max_body_bytes", "64k"), "server.max_body_bytes",
     "must be an integer"),
    ("int-as-float", _set("upstream.max_attempts", 2.5), "upstream.max_attempts",
     "must be an integer"),
    ("bool-as-string", _set("upstream.allow_insecure_http", "yes"),
     "upstream.allow_insecure_http", "must be true or false"),
    ("list-as-string", _set("apps.0.bots", "st-*"), "apps[0].bots", "must be a list"),
    ("list-of-non-strings", _set("apps.0.scopes", [1]), "apps[0].scopes",
     "must be a list of non-empty strings"),
    ("list-with-empty-string", _set("callers.0.bots", [""]), "callers[0].bots",
     "must be a list of non-empty strings"),
    ("table-as-string", _set("server", "fast"), "server", "must be a table"),
    ("apps-as-table", _set("apps", {"name": "x"}), "apps", "must be a list"),
    ("extra-claims-not-table", _set("apps.0.extra_claims", "aud"), "apps[0].extra_claims",
     "must be a table"),
    ("secret-not-string", _set("apps.0.client_secret", 12345), "apps[0].client_secret",
     "must be a string"),
    # booleans never pass for numbers
    ("bool-for-int", _set("server.max_body_bytes", True), "server.max_body_bytes",
     "must be an integer, not a boolean"),
    ("bool-for-float", _set("upstream.timeout_s", True), "upstream.timeout_s",
     "must be a number, not a boolean"),
    ("bool-for-window-calls", _set("rate_limit.windows", [{"calls": True, "per_s": 1}]),
     "rate_limit.windows[0].calls", "not a boolean"),
    # an audit path that can never open (check-config says what serve would)
    ("audit-path-is-a-directory", _set("audit.path", "."), "audit.path", "is a directory"),
    ("audit-path-under-a-file", _set("audit.path", "gateway.toml/audit/log.jsonl"),
     "audit.path", "gateway.toml is not a directory"),
    # out-of-range numbers
    ("timeout-inf", _set("upstream.timeout_s", float("inf")), "upstream.timeout_s",
     "must be a finite number"),
    ("timeout-huge", _set("upstream.timeout_s", 1e300), "upstream.timeout_s",
     "must be a finite number"),
    ("window-per-s-inf", _set("rate_limit.windows", [{"calls": 2, "per_s": float("inf")}]),
     "rate_limit.windows[0].per_s", "must be a finite number"),
    ("backoff-inf", _set("rate_limit.backoff_s", float("inf")), "rate_limit.backoff_s",
     "must be"),
    ("max-body-zero", _set("server.max_body_bytes", 0), "server.max_body_bytes",
     "must be at least 1"),
    ("max-attempts-zero", _set("upstream.max_attempts", 0), "upstream.max_attempts",
     "must be between 1 and 20"),
    ("max-attempts-huge", _set("upstream.max_attempts", 21), "upstream.max_attempts",
     "must be between 1 and 20"),
    ("timeout-zero", _set("upstream.timeout_s", 0), "upstream.timeout_s", "must be at least"),
    ("drain-negative", _set("server.drain_s", -1), "server.drain_s", "must be at least 0"),
    ("ttl-too-short", _set("apps.0.token_ttl_s", 5), "apps[0].token_ttl_s",
     "must be between 30 and 86400"),
    ("ttl-over-3600-with-jti", _both(_set("apps.0.jti", True), _set("apps.0.token_ttl_s", 3601)),
     "apps[0].token_ttl_s", "at most 3600 when jti = true"),
    ("audit-max-bytes-tiny", _set("audit.max_bytes", 10), "audit.max_bytes", "at least 1024"),
    ("fallback-fraction-over-1", _set("rate_limit.local_fallback_fraction", 1.5),
     "rate_limit.local_fallback_fraction", "between 0 and 1"),
    ("window-calls-zero", _set("rate_limit.windows", [{"calls": 0, "per_s": 60}]),
     "rate_limit.windows[0].calls", "at least 1"),
    ("window-missing-per-s", _set("rate_limit.windows", [{"calls": 10}]),
     "rate_limit.windows[0]", "needs both calls and per_s"),
    ("windows-empty", _set("rate_limit.windows", []), "rate_limit.windows",
     "at least one window"),
    ("listen-port-out-of-range", _set("server.listen", "127.0.0.1:70000"), "server.listen",
     "port must be 0-65535"),
    ("listen-without-port", _set("server.listen", "127.0.0.1"), "server.listen",
     "expected HOST:PORT"),
    ("listen-port-not-a-number", _set("server.listen", "127.0.0.1:http"), "server.listen",
     'e.g. "127.0.0.1:8080"'),
    # the admin listener: a HOST:PORT of its own, never the API's address
    ("admin-listen-not-string", _set("server.admin_listen", 9091), "server.admin_listen",
     "must be a string"),
    ("admin-listen-without-port", _set("server.admin_listen", "0.0.0.0"), "server.admin_listen",
     "expected HOST:PORT"),
    ("admin-listen-equals-listen", _both(_set("server.listen", "127.0.0.1:8080"),
                                         _set("server.admin_listen", "127.0.0.1:8080")),
     "server.admin_listen", "must differ from server.listen (127.0.0.1:8080)"),
    ("admin-listen-wildcard-on-api-port", _both(_set("server.listen", "127.0.0.1:8080"),
                                                _set("server.admin_listen", "0.0.0.0:8080")),
     "server.admin_listen", "must differ from server.listen"),
    ("admin-listen-under-wildcard-api", _both(_set("server.listen", "[::]:8080"),
                                              _set("server.admin_listen", "[::1]:8080")),
     "server.admin_listen", "must differ from server.listen"),
    ("max-connections-zero", _set("server.max_connections", 0), "server.max_connections",
     "must be at least 1"),
    ("per-client-connections-zero", _set("server.max_connections_per_client", 0),
     "server.max_connections_per_client", "must be at least 1"),
    ("write-timeout-zero", _set("server.write_timeout_s", 0), "server.write_timeout_s",
     "must be at least 0.1"),
    ("keepalive-zero", _set("server.keepalive_timeout_s", 0), "server.keepalive_timeout_s",
     "must be at least 0.1"),
    ("head-below-one-header", _set("server.max_head_bytes", 2048), "server.max_head_bytes",
     "must be at least max_header_bytes (8190)"),
    ("keyless-budget-negative", _set("audit.max_unauthenticated_per_s", -1),
     "audit.max_unauthenticated_per_s", "must be at least 0"),
    ("trusted-proxies-not-a-list", _set("server.trusted_proxies", "10.0.0.0/8"),
     "server.trusted_proxies", "must be a list"),
    ("trusted-proxy-not-a-network", _set("server.trusted_proxies", ["10.0.0.0/8", "lb.internal"]),
     "server.trusted_proxies[1]", "not an IP network in CIDR form"),
    ("trusted-proxy-bad-prefix", _set("server.trusted_proxies", ["10.0.0.0/33"]),
     "server.trusted_proxies[0]", "not an IP network in CIDR form"),
    # choices
    ("auth-unknown", _set("server.auth", "basic"), "server.auth", 'must be one of "api-key"'),
    ("algorithm-unknown", _set("apps.0.algorithm", "ES256"), "apps[0].algorithm",
     'must be one of "HS256"'),
    ("backend-unknown", _set("rate_limit.backend", "etcd"), "rate_limit.backend",
     'must be one of "memory", "redis"'),
    ("log-level-unknown", _set("logging.level", "trace"), "logging.level", "must be one of"),
    ("log-file-with-console-format", _both(_set("logging.file", "log/gateway.jsonl"),
                                           _set("logging.format", "console")),
     "logging.file", 'use format = "json" or "auto"'),
    ("log-file-max-bytes-tiny", _set("logging.file_max_bytes", 100), "logging.file_max_bytes",
     "at least 4096"),
    # auth = "none" only on loopback
    ("auth-none-on-any-v4", _both(_set("server.auth", "none"), _set("server.listen", "0.0.0.0:8080")),
     "server.auth", "only on a loopback listen address, not 0.0.0.0"),
    ("auth-none-on-any-v6", _both(_set("server.auth", "none"), _set("server.listen", "[::]:8080")),
     "server.auth", "only on a loopback listen address"),
    ("auth-none-on-lan", _both(_set("server.auth", "none"), _set("server.listen", "10.1.2.3:80")),
     "server.auth", "only on a loopback listen address"),
    ("auth-none-on-hostname",
     _both(_set("server.auth", "none"), _set("server.listen", "gateway.internal:80")),
     "server.auth", "only on a loopback listen address"),
    # upstream
    ("http-without-allow", _set("upstream.allow_insecure_http", False), "upstream.base_url",
     "must use https://"),
    ("base-url-not-http", _set("upstream.base_url", "ftp://bots.kore.ai"), "upstream.base_url",
     "must be an absolute URL"),
    ("base-url-relative", _set("upstream.base_url", "bots.kore.ai"), "upstream.base_url",
     "must be an absolute URL"),
    ("base-url-with-query", _set("upstream.base_url", "https://bots.kore.ai/?x=1"),
     "upstream.base_url", "must not have a query or fragment"),
    ("session-path-without-botid", _set("upstream.session_path", "/api/public/bot/session"),
     "upstream.session_path", "{botId}"),
    ("session-path-botid-twice", _set("upstream.session_path", "/{botId}/{botId}"),
     "upstream.session_path", "exactly once"),
    ("session-path-relative", _set("upstream.session_path", "api/{botId}"),
     "upstream.session_path", 'must start with "/"'),
    ("bot-id-pattern-bad-regex", _set("upstream.bot_id_pattern", "^st-[a-z"),
     "upstream.bot_id_pattern", "not a valid regular expression"),
    # apps
    ("apps-missing", _drop("apps"), "apps", "at least one [[apps]] entry is required"),
    ("apps-empty", _set("apps", []), "apps", "at least one [[apps]] entry is required"),
    ("app-without-name", _drop("apps.0.name"), "apps[0].name", "is required"),
    ("app-without-client-id", _drop("apps.0.client_id"), "apps[0].client_id", "is required"),
    ("hs-app-without-secret", _drop("apps.0.client_secret"), "apps[0].client_secret",
     "is required"),
    ("hs-app-empty-secret", _set("apps.0.client_secret", ""), "apps[0].client_secret",
     "must not be empty"),
    ("hs-app-with-private-key", _set("apps.0.private_key", "pem"), "apps[0].private_key",
     "is not used with HS256"),
    ("rs-app-without-key", _rs_app(), "apps[0].private_key", "is required"),
    ("rs-app-non-pem-key", _rs_app("not a pem key"), "apps[0].private_key",
     "is not an unencrypted PEM private key"),
    ("rs-app-with-client-secret",
     _both(_rs_app("not a pem key"), _set("apps.0.client_secret", "s")),
     "apps[0].client_secret", "is not used with RS256"),
    ("two-secret-forms", _set("apps.0.client_secret_env", "KORE_SECRET"),
     "apps[0].client_secret", "give only one of client_secret, client_secret_env"),
    ("secret-env-unset", _both(_drop("apps.0.client_secret"),
                               _set("apps.0.client_secret_env", "NOT_SET_ANYWHERE")),
     "apps[0].client_secret_env", "environment variable NOT_SET_ANYWHERE is not set"),
    ("secret-file-missing", _both(_drop("apps.0.client_secret"),
                                  _set("apps.0.client_secret_file", "no/such/secret")),
     "apps[0].client_secret_file", "cannot read"),
    ("duplicate-app-names", _second_app, "apps[1].name", "duplicate value"),
    # callers
    ("key-sha256-short", _set("callers.0.key_sha256", "ab" * 31), "callers[0].key_sha256",
     "must be 64 hex digits"),
    ("key-sha256-not-hex", _set("callers.0.key_sha256", "g" * 64), "callers[0].key_sha256",
     "must be 64 hex digits"),
    ("key-sha256-missing", _drop("callers.0.key_sha256"), "callers[0].key_sha256",
     "must be 64 hex digits"),
    ("caller-without-name", _drop("callers.0.name"), "callers[0].name", "is required"),
    ("duplicate-caller-names", _set("callers.1.name", "crm-service"), "callers[1].name",
     "duplicate value"),
    ("duplicate-caller-keys",
     lambda s: s["callers"][1].update(key_sha256=s["callers"][0]["key_sha256"]),
     "callers[1].key_sha256", "duplicate value"),
    ("api-key-without-callers", _drop("callers"), "callers",
     'required when server.auth = "api-key"'),
    # rate limit, audit
    ("redis-without-url", _set("rate_limit.backend", "redis"), "rate_limit.redis_url",
     'is required when backend = "redis"'),
    ("audit-path-empty", _set("audit.path", ""), "audit.path", "must not be empty"),
    ("ca-file-missing", _set("upstream.ca_file", "no-such-ca.pem"), "upstream.ca_file",
     "is not a readable file"),
]


class TestConfigErrors:
    @pytest.mark.parametrize(("change", "key", "fragment"),
                             [case[1:] for case in CONFIG_ERRORS],
                             ids=[case[0] for case in CONFIG_ERRORS])
    def test_error_names_file_and_key(self, tmp_path: Path, change: Change, key: str,
                                      fragment: str) -> None:
        settings = base_settings(tmp_path)
        change(settings)
        exc = config_error(tmp_path, settings)
        path = str(tmp_path / "gateway.toml")
        lines = [line for line in problem_lines(exc) if line.startswith(f"{path}: {key}: ")]
        assert lines, f"no problem for {key!r} in:\n{exc}"
        assert any(fragment in line for line in lines), str(exc)

    def test_every_problem_of_the_base_url_is_named(self, tmp_path: Path) -> None:
        settings = base_settings(tmp_path)
        settings["upstream"] = {"base_url": "http://user:pw@bots.example.com:99999/?q=1"}
        lines = [line for line in problem_lines(config_error(tmp_path, settings))
                 if ": upstream.base_url: " in line]
        assert [line.split(": upstream.base_url: ")[1].split(" (")[0] for line in lines] == [
            "must not carry user:password@", "must use https://",
            "must not have a query or fragment", "has an invalid port"]
        assert not [line for line in lines if "pw" in line]

    def test_key_error_example_from_the_style_guide(self, tmp_path: Path) -> None:
        settings = merge(base_settings(tmp_path), {})
        app0(settings).update(jti=True, token_ttl_s=7200)
        exc = config_error(tmp_path, settings)
        assert f"{tmp_path / 'gateway.toml'}: apps[0].token_ttl_s: at most 3600 when jti = true" \
            in problem_lines(exc)

    def test_every_problem_reported_at_once(self, tmp_path: Path) -> None:
        settings = merge(base_settings(tmp_path), {"server": {"max_body_bytes": 0},
                                                  "upstream": {"session_path": "/x"}})
        settings["callers"][0]["key_sha256"] = "nope"
        exc = config_error(tmp_path, settings)
        keys = [p.split(":")[0] for p in exc.problems]
        assert {"server.max_body_bytes", "upstream.session_path",
                "callers[0].key_sha256"} <= set(keys)
        assert len(problem_lines(exc)) == len(exc.problems) >= 3

    def test_two_unknown_keys_both_listed(self, tmp_path: Path) -> None:
        settings = merge(base_settings(tmp_path), {"server": {"a": 1}, "upstream": {"b": 2}})
        problems = config_error(tmp_path, settings).problems
        assert "server.a: unknown key" in problems and "upstream.b: unknown key" in problems

    def test_secret_file_is_empty(self, tmp_path: Path) -> None:
        (tmp_path / "empty").write_text("\n", encoding="utf-8")
        settings = base_settings(tmp_path)
        del app0(settings)["client_secret"]
        app0(settings)["client_secret_file"] = "empty"
        exc = config_error(tmp_path, settings)
        assert any(p.startswith("apps[0].client_secret_file: ") and "is empty" in p
                   for p in exc.problems)

    def test_window_item_not_a_table(self, tmp_path: Path) -> None:
        settings = merge(base_settings(tmp_path), {"rate_limit": {"windows": [600]}})
        exc = config_error(tmp_path, settings)
        assert any(p.startswith("rate_limit.windows[0]: must be a table") for p in exc.problems)

    def test_app_item_not_a_table(self, tmp_path: Path) -> None:
        settings = base_settings(tmp_path)
        settings["apps"] = ["sessions"]
        exc = config_error(tmp_path, settings)
        assert any(p.startswith("apps[0]: must be a table") for p in exc.problems)


class TestConfigFile:
    def test_missing_file(self, tmp_path: Path) -> None:
        path = tmp_path / "absent.toml"
        with pytest.raises(ConfigError) as caught:
            load_config(path, env={})
        assert str(caught.value).startswith(f"{path}: cannot read the config file")

    def test_not_toml(self, tmp_path: Path) -> None:
        path = tmp_path / "gateway.toml"
        path.write_text("[server\nlisten = 1\n", encoding="utf-8")
        with pytest.raises(ConfigError) as caught:
            load_config(path, env={})
        assert str(caught.value).startswith(f"{path}: not valid TOML")

    def test_not_utf8(self, tmp_path: Path) -> None:
        path = tmp_path / "gateway.toml"
        path.write_bytes(b'name = "\xff"\n')
        with pytest.raises(ConfigError, match="not valid TOML"):
            load_config(path, env={})


class TestLoopbackAuthNone:
    @pytest.mark.parametrize("listen", ["127.0.0.1:8080", "127.8.9.10:8080", "[::1]:8080",
                                        "localhost:8080"],
                             ids=["v4", "v4-net", "v6", "localhost"])
    def test_auth_none_accepted_on_loopback_without_callers(self, tmp_path: Path,
                                                            listen: str) -> None:
        settings = merge(base_settings(tmp_path), {"server": {"auth": "none", "listen": listen}})
        del settings["callers"]
        config = load(tmp_path, settings)
        assert config.server.auth == "none" and config.callers == ()
        assert config.server.listen == listen

    def test_ipv6_listen_host_and_port(self, tmp_path: Path) -> None:
        config = load(tmp_path, merge(base_settings(tmp_path), {"server": {"listen": "[::1]:81"}}))
        assert (config.server.host, config.server.port) == ("::1", 81)


class TestAdminListen:
    @pytest.mark.parametrize(("listen", "admin"), [
        ("127.0.0.1:8080", "0.0.0.0:9091"),
        ("127.0.0.1:8080", "[::]:9091"),
        ("127.0.0.1:8080", "127.0.0.2:8080"),  # two addresses, one port: no overlap
        ("127.0.0.1:0", "127.0.0.1:0"),  # two free ports, each picked at start
    ], ids=["v4-wildcard", "v6-wildcard", "same-port-other-address", "both-port-0"])
    def test_admin_address_accepted(self, tmp_path: Path, listen: str, admin: str) -> None:
        server = load(tmp_path, merge(base_settings(tmp_path), {
            "server": {"listen": listen, "admin_listen": admin}})).server
        assert server.admin_listen == admin
        assert f"{server.admin_host}:{server.admin_port}" == admin.replace("[", "").replace(
            "]", "")

    def test_admin_listener_needs_no_loopback_with_auth_none(self, tmp_path: Path) -> None:
        """The admin listener serves no deactivation route: a pod-wide address is fine."""
        settings = merge(base_settings(tmp_path), {"server": {
            "auth": "none", "listen": "127.0.0.1:8080", "admin_listen": "0.0.0.0:9091"}})
        del settings["callers"]
        assert load(tmp_path, settings).server.admin_listen == "0.0.0.0:9091"

    def test_off_by_default(self) -> None:
        assert ServerConfig().admin_listen == ""


class TestDefaultsAndPaths:
    def minimal(self, tmp_path: Path) -> Settings:
        settings = base_settings(tmp_path, "https://bots.kore.ai")
        return {"apps": settings["apps"], "callers": settings["callers"]}

    def test_defaults_when_tables_omitted(self, tmp_path: Path) -> None:
        config = load(tmp_path, self.minimal(tmp_path))
        assert config.server == ServerConfig()
        assert config.upstream == UpstreamConfig()
        assert config.rate_limit == RateLimitConfig()
        assert config.logging == LoggingConfig()
        assert config.audit == AuditConfig(
            path=str(tmp_path.resolve() / "audit" / "deactivations.jsonl"))
        assert config.source == str(tmp_path / "gateway.toml")

    def test_app_defaults(self, tmp_path: Path) -> None:
        [app] = load(tmp_path, self.minimal(tmp_path)).apps
        assert (app.algorithm, app.token_ttl_s, app.jti, app.subject, app.scopes) == (
            "HS256", 600, False, "kore-session-gateway", ("Bot Sessions",))
        assert app.client_secret == Secret(CLIENT_SECRET) and app.private_key is None

    def test_contract_defaults(self) -> None:
        """The defaults the contract states, section 4."""
        assert ServerConfig().max_body_bytes == 65536
        assert ServerConfig().max_batch_items == 1000
        assert UpstreamConfig().session_path == "/api/public/bot/{botId}/session"
        assert UpstreamConfig().bot_id_pattern == "^st-[A-Za-z0-9-]{1,100}$"
        assert UpstreamConfig().allow_insecure_http is False
        assert RateLimitConfig().windows == ((600, 60.0), (18000, 3600.0))
        assert ServerConfig().trusted_proxies == ()
        assert ServerConfig().max_connections == 4096
        assert AuditConfig().max_unauthenticated_per_s == 20

    def test_trusted_proxies_normalised_to_networks(self, tmp_path: Path) -> None:
        config = load(tmp_path, merge(base_settings(tmp_path), {"server": {
            "trusted_proxies": ["10.0.0.0/8", "192.0.2.7", "2001:db8::/32", "10.1.2.3/16"]}}))
        assert config.server.trusted_proxies == ("10.0.0.0/8", "192.0.2.7/32",
                                                 "2001:db8::/32", "10.1.0.0/16")

    def test_relative_audit_path_resolved_against_config_dir(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        conf_dir = tmp_path / "etc"
        conf_dir.mkdir()
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        monkeypatch.chdir(elsewhere)
        settings = merge(self.minimal(tmp_path), {"audit": {"path": "../var/audit.jsonl"}})
        config = load_config(write_config(conf_dir, settings), env={})
        assert config.audit.path == str(tmp_path.resolve() / "var" / "audit.jsonl")

    def test_secret_file_resolved_against_config_dir(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        conf_dir = tmp_path / "etc"
        (conf_dir / "secrets").mkdir(parents=True)
        (conf_dir / "secrets" / "kore").write_text("file-secret-value\n", encoding="utf-8")
        monkeypatch.chdir(tmp_path)
        settings = self.minimal(tmp_path)
        del app0(settings)["client_secret"]
        app0(settings)["client_secret_file"] = "secrets/kore"
        config = load_config(write_config(conf_dir, settings), env={})
        secret = config.apps[0].client_secret
        assert secret is not None and secret.reveal() == "file-secret-value"

    def test_secret_from_env(self, tmp_path: Path) -> None:
        settings = self.minimal(tmp_path)
        del app0(settings)["client_secret"]
        app0(settings)["client_secret_env"] = "KORE_CLIENT_SECRET"
        config = load(tmp_path, settings, env=SECRET_ENV)
        assert config.apps[0].client_secret == Secret(SECRET_ENV["KORE_CLIENT_SECRET"])

    def test_private_key_env_for_rs_app(self, tmp_path: Path) -> None:
        settings = self.minimal(tmp_path)
        app0(settings).update(algorithm="RS512", private_key_env="KORE_PEM")
        del app0(settings)["client_secret"]
        pem = pem_key()
        config = load(tmp_path, settings, env={"KORE_PEM": pem})
        assert config.apps[0].private_key == Secret(pem.strip()) or \
            config.apps[0].private_key == Secret(pem)

    def test_log_file_resolved_against_config_dir(self, tmp_path: Path) -> None:
        config = load(tmp_path, merge(base_settings(tmp_path),
                                      {"logging": {"file": "log/gateway.jsonl"}}))
        assert config.logging.file == str(tmp_path.resolve() / "log" / "gateway.jsonl")
        assert config.logging.file_max_bytes == 10_485_760

    def test_ca_file_resolved_against_config_dir(self, tmp_path: Path) -> None:
        (tmp_path / "ca.pem").write_text("ca", encoding="utf-8")
        config = load(tmp_path, merge(self.minimal(tmp_path), {"upstream": {"ca_file": "ca.pem"}}))
        assert config.upstream.ca_file == str(tmp_path.resolve() / "ca.pem")

    def test_key_sha256_upper_case_accepted(self, tmp_path: Path) -> None:
        settings = self.minimal(tmp_path)
        digest = settings["callers"][0]["key_sha256"]
        settings["callers"][0]["key_sha256"] = digest.upper()
        assert load(tmp_path, settings).callers[0].key_sha256 == digest

    def test_redis_backend_with_url(self, tmp_path: Path) -> None:
        settings = merge(self.minimal(tmp_path), {"rate_limit": {
            "backend": "redis", "redis_url_env": "REDIS_URL"}})
        config = load(tmp_path, settings, env={"REDIS_URL": "redis://:pw@redis:6379/0"})
        assert config.rate_limit.redis_url == Secret("redis://:pw@redis:6379/0")

    def test_windows_loaded_as_pairs(self, tmp_path: Path) -> None:
        settings = merge(self.minimal(tmp_path), {"rate_limit": {"windows": [
            {"calls": 5, "per_s": 1}, {"calls": 100, "per_s": 60.5}]}})
        assert load(tmp_path, settings).rate_limit.windows == ((5, 1.0), (100, 60.5))


class TestSecretsStayHidden:
    SECRETS = ("literal-client-secret-value", "env-secret-value-0123456789abcdef",
               "redis-password-value", "not-a-pem-but-a-secret-value")

    def test_secret_repr_masked(self) -> None:
        secret = Secret("hunter2-value")
        assert "hunter2" not in repr(secret) and "hunter2" not in str(secret)
        assert "hunter2" not in f"{secret}" and "hunter2" not in f"{[secret]}"
        assert secret.reveal() == "hunter2-value"

    def test_repr_of_config_never_shows_a_secret(self, tmp_path: Path) -> None:
        settings = base_settings(tmp_path)
        settings["apps"] = [
            {"name": "a", "client_id": "cs-a", "client_secret": self.SECRETS[0]},
            {"name": "b", "client_id": "cs-b", "client_secret_env": "KORE_CLIENT_SECRET"},
        ]
        settings["rate_limit"] = {"backend": "redis",
                                  "redis_url": f"redis://:{self.SECRETS[2]}@redis:6379"}
        config = load(tmp_path, settings, env=SECRET_ENV)
        text = repr(config) + str(config) + repr(config.apps) + repr(config.rate_limit)
        for secret in self.SECRETS[:3]:
            assert secret not in text
        assert config.callers[0].key_sha256 not in text

    def test_config_error_never_shows_a_secret(self, tmp_path: Path) -> None:
        settings = base_settings(tmp_path)
        settings["apps"] = [
            {"name": "rs", "client_id": "cs-rs", "algorithm": "RS256",
             "private_key": self.SECRETS[3], "client_secret": self.SECRETS[0]},
            {"name": "hs", "client_id": "cs-hs", "client_secret": self.SECRETS[0],
             "client_secret_env": "KORE_CLIENT_SECRET", "token_ttl_s": 1},
            {"name": "typo", "client_id": "cs-t", "client_secrett": self.SECRETS[0]},
        ]
        settings["rate_limit"] = {"backend": "etcd",
                                  "redis_url": f"redis://:{self.SECRETS[2]}@redis:6379",
                                  "redis_url_env": "REDIS_URL"}
        exc = config_error(tmp_path, settings, env=SECRET_ENV)
        text = str(exc) + repr(exc)
        for secret in self.SECRETS:
            assert secret not in text
        assert len(exc.problems) >= 5

    def test_toml_syntax_error_never_shows_a_secret(self, tmp_path: Path) -> None:
        path = tmp_path / "gateway.toml"
        path.write_text(f'[[apps]]\nclient_secret = "{self.SECRETS[0]}\n', encoding="utf-8")
        with pytest.raises(ConfigError) as caught:
            load_config(path, env={})
        assert self.SECRETS[0] not in str(caught.value)


class TestShippedConfigs:
    def test_example_loads_with_its_env_var(self) -> None:
        config = load_config(EXAMPLE, env=SECRET_ENV)
        assert config.apps[0].client_secret == Secret(SECRET_ENV["KORE_CLIENT_SECRET"])
        assert config.upstream.base_url == "https://bots.kore.ai"

    def test_example_without_its_env_var_names_it(self) -> None:
        with pytest.raises(ConfigError, match="apps\\[0\\].client_secret_env: environment "
                                              "variable KORE_CLIENT_SECRET"):
            load_config(EXAMPLE, env={})

    def test_demo_loads(self) -> None:
        config = load_config(DEMO, env={})
        assert config.apps and config.callers
        assert Path(config.audit.path).is_absolute()

    @pytest.mark.parametrize("cls", [ServerConfig, UpstreamConfig, AuditConfig, RateLimitConfig,
                                     LoggingConfig, KoreApp, CallerConfig],
                             ids=lambda c: c.__name__)
    def test_every_dataclass_key_documented_in_example(self, cls: type) -> None:
        text = EXAMPLE.read_text(encoding="utf-8")
        missing = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("not_a_key")
                   and not re.search(rf"(?m)^\s*(#\s*)?{f.name}(_env|_file)?\s*=", text)]
        assert not missing, f"{cls.__name__} keys not in {EXAMPLE.name}: {missing}"

    def test_every_table_documented_in_example(self) -> None:
        text = EXAMPLE.read_text(encoding="utf-8")
        for f in dataclasses.fields(Config):
            if f.name != "source":
                assert f"[{f.name}]" in text, f.name
        assert re.search(r"calls\s*=.*per_s\s*=", text)

    def test_every_dataclass_of_the_module_is_checked(self) -> None:
        classes = {obj for obj in vars(config_module).values()
                   if isinstance(obj, type) and dataclasses.is_dataclass(obj)
                   and obj.__module__ == config_module.__name__}
        assert classes == {Config, ServerConfig, UpstreamConfig, AuditConfig, RateLimitConfig,
                           LoggingConfig, KoreApp, CallerConfig}

    def test_example_commented_keys_accepted_once_uncommented(self, tmp_path: Path) -> None:
        text = EXAMPLE.read_text(encoding="utf-8")
        for key in ("ca_file", "redis_url_env", "extra_claims"):
            text, count = re.subn(rf"(?m)^#\s*({key}\s*=)", r"\1", text)
            assert count == 1, key
        (tmp_path / "ca.pem").write_text("ca", encoding="utf-8")
        path = tmp_path / "gateway.toml"
        path.write_text(text, encoding="utf-8")
        config = load_config(path, env={**SECRET_ENV, "REDIS_URL": "redis://r:6379"})
        assert config.upstream.ca_file == str(tmp_path.resolve() / "ca.pem")
        assert config.apps[0].extra_claims
        # redis_url_env is read only with backend = "redis" (the example's backend is memory)
        assert config.rate_limit.redis_url is None

    @staticmethod
    def contract_sample() -> str:
        return CONTRACT_SAMPLE.read_text(encoding="utf-8").replace("<64 hex>", "ab" * 32)

    def test_contract_sample_accepted(self, tmp_path: Path) -> None:
        path = tmp_path / "gateway.toml"
        path.write_text(self.contract_sample(), encoding="utf-8")
        config = load_config(path, env={**SECRET_ENV, "REDIS_URL": "redis://redis:6379/0"})
        assert config.server.listen == "127.0.0.1:8080"
        assert config.rate_limit.windows == ((600, 60.0), (18000, 3600.0))
        assert config.apps[0].name == "sessions" and config.callers[0].name == "crm-service"

    def test_contract_sample_accepted_without_redis_env(self, tmp_path: Path) -> None:
        path = tmp_path / "gateway.toml"
        path.write_text(self.contract_sample(), encoding="utf-8")
        assert load_config(path, env=SECRET_ENV).rate_limit.backend == "memory"
