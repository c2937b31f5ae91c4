"""Kore.ai JWTs: which app signs for a bot, minting with PyJWT, and the per-app token cache.

Owns the claims, the signing key handling, reuse and early renewal of tokens, and the rule that
a token with less than `MIN_REMAINING_S` of life left is never handed out. Leaves the HTTP call
and the retry after a 401/403 to `upstream.py`, and the checks on `KoreApp` (key present for the
algorithm, ttl ≤ 3600 with jti) to `config.py`.
"""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, TypeAlias, TypeVar

import jwt
import structlog
from cachetools import TLRUCache
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from gateway.config.model import (
    BOT_SESSIONS_SCOPE,
    GATEWAY_CLAIMS,
    KORE_CLAIM_ALIASES,
    KoreApp,
    Secret,
)
from gateway.errors import BotNotConfigured
from gateway.metrics import Metrics

log = structlog.get_logger(__name__)

Clock: TypeAlias = Callable[[], float]
"""Epoch seconds now; `time.time` in production, a settable fake in tests."""

MIN_REMAINING_S = 10  # a token with less life left is never sent: it could expire in flight
# extra_claims cannot set these (the loader refuses them; a KoreApp built in code drops them)
RESERVED_CLAIMS = frozenset(GATEWAY_CLAIMS + KORE_CLAIM_ALIASES)
BOT_CACHE_SIZE = 4096  # bot IDs a per-bot memo (`remember`) holds at most

_K = TypeVar("_K")
_V = TypeVar("_V")


def remember(memo: dict[_K, _V], key: _K, value: _V, limit: int = BOT_CACHE_SIZE) -> _V:
    """Stores `value` in a per-bot memo: a plain dict emptied when full. On every request it
    is cheaper than cachetools' LRUCache (five Python calls a lookup); a bot forgotten is
    simply looked up anew."""
    if len(memo) >= limit:
        memo.clear()
    memo[key] = value
    return value


class MintError(Exception):
    """A token could not be signed for an app; the message names the app, never the key."""


@dataclass(frozen=True, slots=True)
class Token:
    """A signed JWT and when it expires; `repr` leaves the JWT out."""

    value: str = field(repr=False)  # the JWT itself
    app: str
    expires_at: float
    jti: str | None


def claims_for(app: KoreApp, now: float) -> dict[str, Any]:
    iat = int(now)
    claims = {"appId": app.client_id, "sub": app.subject, "iat": iat, "exp": iat + app.token_ttl_s}
    claims.update((k, v) for k, v in app.extra_claims.items() if k not in RESERVED_CLAIMS)
    if app.jti:
        claims["jti"] = uuid.uuid4().hex
    return claims


def mint(app: KoreApp, now: float) -> Token:
    """Signs a new token for `app`; raises `MintError` if its key cannot sign."""
    claims = claims_for(app, now)
    try:
        value = jwt.encode(claims, _signing_key(app), algorithm=app.algorithm,
                           headers={"typ": "JWT"})
    except Exception as exc:  # any library error becomes one error naming the app
        raise MintError(f"cannot sign a {app.algorithm} token for Kore.ai app {app.name!r} "
                        f"({type(exc).__name__}): {_key_hint(app)}") from exc
    return Token(value=value, app=app.name, expires_at=float(claims["exp"]), jti=claims.get("jti"))


def _signing_key(app: KoreApp) -> str | RSAPrivateKey:
    if app.algorithm.startswith("RS"):
        if app.private_key is None:
            raise ValueError("no private key")
        return _load_private_key(app.private_key)
    if app.client_secret is None:
        raise ValueError("no client secret")
    return app.client_secret.reveal()


@functools.lru_cache(maxsize=32)
def _load_private_key(pem: Secret) -> RSAPrivateKey:
    # Loading validates the RSA key (~30 ms), signing with the loaded key takes ~0.3 ms:
    # load once, so that jti apps, which mint on every call, stay cheap.
    key = load_pem_private_key(pem.reveal().encode(), password=None)
    if not isinstance(key, RSAPrivateKey):
        raise TypeError("not an RSA private key")
    return key


def _key_hint(app: KoreApp) -> str:
    if app.algorithm.startswith("RS"):
        return "check its private_key (an unencrypted PEM RSA private key)"
    return "check its client_secret"


def select_app(apps: Sequence[KoreApp], bot_id: str) -> KoreApp:
    """The first app whose `bots` globs match `bot_id` and whose scopes include Bot Sessions."""
    for app in apps:
        if BOT_SESSIONS_SCOPE in app.scopes and any(fnmatchcase(bot_id, g) for g in app.bots):
            return app
    raise BotNotConfigured(f"no Kore.ai app is configured for bot {bot_id}")


def _sendable_until(_name: str, token: Token, _now: float) -> float:
    return token.expires_at - MIN_REMAINING_S


def _renew_before_s(app: KoreApp) -> float:
    # Capped at half the lifetime so that a short-lived token is not renewed on every call.
    return min(app.renew_before_s, app.token_ttl_s / 2)


class TokenCache:
    """Tokens per app: reused until close to expiry, renewed ahead of it, one mint at a time.

    Apps with `jti = true` get a fresh token on every call, never cached.
    """

    def __init__(self, apps: Sequence[KoreApp], *, clock: Clock = time.time,
                 metrics: Metrics | None = None) -> None:
        self._apps = tuple(apps)
        self._clock = clock
        self._metrics = metrics if metrics is not None else Metrics()
        # An entry vanishes by itself once it has MIN_REMAINING_S or less to live.
        self._tokens: TLRUCache[str, Token, float] = TLRUCache(
            maxsize=max(len(self._apps), 1), ttu=_sendable_until, timer=clock)
        self._apps_by_bot: dict[str, KoreApp] = {}  # a `remember` memo
        # The request path's shortcut past the TLRUCache (about ten Python calls a request):
        # app name → (the app, its token, when the token enters its renewal window or stops
        # being sendable). Set only by `_cached`; emptied whenever a token is stored or dropped.
        self._fresh: dict[str, tuple[KoreApp, Token, float]] = {}
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._renewals: dict[str, asyncio.Task[None]] = {}
        self._mints: Counter[str] = Counter()

    def app_for(self, bot_id: str) -> KoreApp:
        app = self._apps_by_bot.get(bot_id)
        if app is None:
            app = remember(self._apps_by_bot, bot_id, select_app(self._apps, bot_id))
        return app

    def ready(self, app: KoreApp) -> Token | None:
        """The cached token, when `token` would answer it without minting (a cache hit);
        None when `token` must be awaited."""
        if app.jti:
            return None
        cached = self._cached(app)
        if cached is not None:
            self._metrics.token_cache_hit(app.name)
        return cached

    async def token(self, app: KoreApp) -> Token:
        if app.jti:
            return self._mint(app)  # Enforce JTI: a token is good for one attempt only
        cached = self.ready(app)
        if cached is not None:
            return cached
        # Minting is synchronous today; the lock keeps "one mint in flight" true should it
        # ever await (a KMS, a thread), and the re-check lets waiters reuse the winner's token.
        async with self._locks[app.name]:
            return self._cached(app) or self._mint_and_store(app)

    def drop(self, app: KoreApp, token: Token | None = None) -> None:
        """Forgets the cached token (only if it still is `token`, when one is given)."""
        if token is not None and self._tokens.get(app.name) != token:
            return  # a newer token replaced it: keep that one
        self._fresh.pop(app.name, None)
        if self._tokens.pop(app.name, None) is not None:
            log.info("token.dropped", app=app.name)

    def reload(self, apps: Sequence[KoreApp]) -> tuple[str, ...]:
        """Takes a new set of apps; returns the names whose cached token was dropped.

        An app whose settings or secret changed, or that went away, loses its cached token:
        a token signed with a replaced secret is never sent again. Unchanged apps keep theirs.
        """
        fresh = {app.name: app for app in apps}
        stale = tuple(a.name for a in self._apps if fresh.get(a.name) != a)
        kept = {name: token for name in fresh if name not in stale
                and (token := self._tokens.get(name)) is not None}
        dropped = [name for name in stale if self._tokens.get(name) is not None]
        self._apps = tuple(apps)
        self._apps_by_bot.clear()
        self._fresh.clear()
        self._tokens = TLRUCache(maxsize=max(len(self._apps), 1), ttu=_sendable_until,
                                 timer=self._clock)
        self._tokens.update(kept)
        for name in dropped:
            log.info("token.dropped", app=name, reason="config_reload")
        return stale

    def mints(self, app_name: str) -> int:
        return self._mints[app_name]

    def check(self) -> bool:
        """True when every app can sign a token now (a throw-away mint, nothing cached)."""
        now = self._clock()
        results = [self._can_sign(app, now) for app in self._apps]  # every failing app is logged
        return all(results)

    async def aclose(self) -> None:
        tasks = list(self._renewals.values())
        self._renewals.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _cached(self, app: KoreApp) -> Token | None:
        fresh = self._fresh.get(app.name)
        if fresh is not None and fresh[0] is app and self._clock() < fresh[2]:
            return fresh[1]  # neither due for renewal nor too old to send: as the cache has it
        if app not in self._apps:
            return None  # replaced by a reload: the cached token belongs to the new app
        token = self._tokens.get(app.name)
        if token is None:
            return None
        if self._in_renew_window(app, token):
            self._start_renewal(app)
        else:
            until = token.expires_at - max(_renew_before_s(app), MIN_REMAINING_S)
            self._fresh[app.name] = (app, token, until)
        return token

    def _in_renew_window(self, app: KoreApp, token: Token) -> bool:
        return token.expires_at - self._clock() <= _renew_before_s(app)

    def _start_renewal(self, app: KoreApp) -> None:
        running = self._renewals.get(app.name)
        if running is None or running.done():
            self._renewals[app.name] = asyncio.create_task(
                self._renew(app), name=f"token-renewal:{app.name}")

    async def _renew(self, app: KoreApp) -> None:
        async with self._locks[app.name]:
            current = self._tokens.get(app.name)
            if current is not None and not self._in_renew_window(app, current):
                return  # replaced meanwhile (drop + mint)
            try:
                self._mint_and_store(app)
            except MintError as exc:  # the cached token still serves until it is too old
                log.warning("token.renewal_failed", app=app.name, error=str(exc))

    def _mint_and_store(self, app: KoreApp) -> Token:
        token = self._mint(app)
        if app in self._apps:  # a request that began before a reload never caches its token
            self._fresh.pop(app.name, None)
            self._tokens[app.name] = token
        return token

    def _mint(self, app: KoreApp) -> Token:
        token = mint(app, self._clock())
        self._mints[app.name] += 1
        self._metrics.token_minted(app.name)
        log.info("token.minted", app=app.name, ttl_s=app.token_ttl_s, jti_mode=app.jti)
        return token

    def _can_sign(self, app: KoreApp, now: float) -> bool:
        try:
            mint(app, now)
        except MintError as exc:
            log.warning("token.check_failed", app=app.name, error=str(exc))
            return False
        return True
