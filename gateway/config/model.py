"""The configuration model: frozen dataclasses, one per TOML table, plus `Secret` and `ConfigError`.

It imports nothing of the gateway; `tables.py` builds these from a checked file and `loader.py`
is the one way in (`load_config`).
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple
from urllib.parse import urlsplit

DEFAULT_SUBJECT = "kore-session-gateway"
DEFAULT_SCOPES = ("Bot Sessions",)
BOT_SESSIONS_SCOPE = "Bot Sessions"
ALGORITHMS = ("HS256", "HS512", "RS256", "RS512")
MAX_JTI_TTL_S = 3600  # Kore.ai refuses a token with a jti whose exp is more than 1 h ahead
MIN_TOKEN_TTL_S = 30  # a token must outlive the 10 s "never sent" margin by a useful amount
DEFAULT_TOKEN_TTL_S = 600
# A jti token is minted for one attempt and sent at once: two minutes cover the attempt and
# a clock skew of well over a minute between the gateway and Kore.ai.
DEFAULT_JTI_TOKEN_TTL_S = 120
JTI_TTL_MARGIN_S = 60  # a jti ttl this close to MAX_JTI_TTL_S is warned about: Kore.ai's clock
# Kore.ai reads these as overrides of jti, iss and sub (its SDK security page): extra_claims
# setting them would replace the gateway's own claims, so a config naming them is refused.
KORE_CLAIM_ALIASES = ("kore_jti", "kore_iss", "kore_sub")
GATEWAY_CLAIMS = ("appId", "sub", "iat", "exp", "jti")  # set by the gateway, never by extra_claims


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
    token_ttl_s: int = DEFAULT_TOKEN_TTL_S  # the loader gives jti apps DEFAULT_JTI_TOKEN_TTL_S
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
    # "" = off; else HOST:PORT serving /metrics, /healthz, /readyz and /openapi.json (no
    # deactivation route, no key); /metrics then leaves the `listen` address.
    admin_listen: str = ""
    max_head_bytes: int = 16384  # a whole request head (line and headers); beyond it 431
    trusted_proxies: tuple[str, ...] = ()  # CIDRs of peers whose X-Forwarded-For is believed
    max_connections: int = 4096  # open client connections per process; beyond it refused
    max_connections_per_client: int = 256  # per client address (trusted proxies exempt)
    keepalive_timeout_s: float = 75.0  # an idle kept-alive connection is closed after this
    write_timeout_s: float = 30.0  # an answer the client does not read for this long: cut off

    @property
    def host(self) -> str:
        return split_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return split_listen(self.listen)[1]

    @property
    def admin_host(self) -> str:
        return split_listen(self.admin_listen)[0]

    @property
    def admin_port(self) -> int:
        return split_listen(self.admin_listen)[1]


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
    breaker_failures: int = 20  # failed requests to one bot in a row that open its circuit
    breaker_cooldown_s: float = 5.0
    breaker_host_bots: int = 5  # distinct failing bots, no success between: the host's opens
    breaker_window_s: float = 60.0  # … when they failed within this window
    max_connections: int = 100


@dataclass(frozen=True, slots=True)
class AuditConfig:
    path: str = DEFAULT_AUDIT_PATH
    hash_user_ids: bool = False
    max_bytes: int = 104857600
    fsync: bool = True
    max_unauthenticated_per_s: int = 20  # keyless requests audited one by one; the rest summed
    chain_key: Secret | None = None  # HMAC chain key, from chain_key_env or chain_key_file
    anchor_every_s: float = 60.0  # log an audit.anchor line this often (and at shutdown)


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    enabled: bool = True
    backend: str = "memory"  # or "redis"
    windows: tuple[tuple[int, float], ...] = DEFAULT_WINDOWS  # (calls, per_s)
    redis_url: Secret | None = None
    local_fallback_fraction: float = 0.5  # share of the budget used while Redis is down
    redis_timeout_s: float = 0.25
    backoff_s: float = 5.0  # pause after Kore.ai's rate-limit answer without Retry-After (doubles)
    max_pause_s: float = 3600.0  # the longest pause, whatever Kore.ai's Retry-After says


DEFAULT_LOG_FILE_MAX_BYTES = 10_485_760


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: str = "info"
    format: str = "auto"  # "json", "console" or "auto" (console on a terminal)
    # "" = stderr only; else every line also goes to this file (JSON), for a log shipper to
    # tail; with --workers N, worker n writes `{stem}-w{n}{suffix}` beside it.
    file: str = ""
    file_max_bytes: int = DEFAULT_LOG_FILE_MAX_BYTES  # then renamed to `<file>.1`, one kept


@dataclass(frozen=True, slots=True)
class CallerConfig:
    name: str
    key_sha256: str = field(repr=False)
    bots: tuple[str, ...] = ("*",)
    # No `bots` in the file: every bot, and a warning says so (not a key of the file).
    bots_unset: bool = field(default=False, metadata={"not_a_key": True})


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


def upstream_host(base_url: str) -> str:
    """`host:port` of a base URL, the port filled in from the scheme: the only form in which
    the gateway shows its upstream (logs, `/readyz`, metric labels), never with `user:password@`."""
    parts = urlsplit(base_url)
    host = parts.hostname or ""
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def with_changes(obj: Any, **changes: Any) -> Any:
    """`dataclasses.replace`, named for call sites that tweak a loaded config."""
    return dataclasses.replace(obj, **changes)


class ConfigError(Exception):
    """Every problem of one config file, each naming the file and the key."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__("\n".join(f"{source}: {p}" for p in problems))


class ConfigWarning(NamedTuple):
    """A setting that loads but is likely to hurt; shown with the key, like a problem."""

    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


_LOOPBACK_NAMES = {"localhost", "::1"}


def is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
