"""Tests for gateway.kore.tokens: claims, signing, app selection and the per-app token cache."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from typing import Any

import jwt
import pytest
import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from gateway.config.model import KoreApp, Secret
from gateway.errors import BotNotConfigured
from gateway.kore import tokens
from gateway.kore.tokens import (
    MIN_REMAINING_S,
    MintError,
    Token,
    TokenCache,
    claims_for,
    mint,
    remember,
    select_app,
)
from tests.conftest import FakeClock

T0 = 1_700_000_000.25
HS256_SECRET = "hs256-secret-" + "x" * 40  # ≥ 32 bytes: PyJWT warns below the digest size
HS512_SECRET = "hs512-secret-" + "y" * 60  # ≥ 64 bytes
BROKEN_PEM = "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture(autouse=True)
def fresh_structlog(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Uncached structlog defaults: capture_logs sees these events whatever ran before."""
    structlog.reset_defaults()
    monkeypatch.setattr(tokens, "log", structlog.get_logger(tokens.__name__))
    yield
    structlog.reset_defaults()


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def rsa_pem(rsa_key: rsa.RSAPrivateKey) -> str:
    return rsa_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption()).decode()


def hs_app(name: str = "main", **overrides: Any) -> KoreApp:
    fields: dict[str, Any] = {"client_id": f"cs-{name}", "client_secret": Secret(HS256_SECRET)}
    return KoreApp(name=name, **(fields | overrides))


def broken_rs_app() -> KoreApp:
    return KoreApp(name="bad", client_id="cs-1", algorithm="RS256", private_key=Secret(BROKEN_PEM))


@pytest.fixture
async def make_cache(clock: FakeClock) -> AsyncIterator[Callable[..., TokenCache]]:
    caches: list[TokenCache] = []

    def make(*apps: KoreApp) -> TokenCache:
        caches.append(TokenCache(apps, clock=clock))
        return caches[-1]

    yield make
    for cache in caches:
        await cache.aclose()


async def settle() -> None:
    """Lets background renewal tasks run (event-loop turns, no wall-clock wait)."""
    for _ in range(5):
        await asyncio.sleep(0)


def decode(token: Token, key: Any, algorithm: str) -> dict[str, Any]:
    return jwt.decode(token.value, key, algorithms=[algorithm],
                      options={"verify_exp": False, "verify_iat": False})


class TestClaims:
    def test_claims_are_exact(self) -> None:
        app = hs_app(token_ttl_s=900, subject="ops-bot")
        assert claims_for(app, T0) == {
            "appId": "cs-main", "sub": "ops-bot", "iat": 1_700_000_000, "exp": 1_700_000_900}

    def test_jti_claim_only_in_jti_mode(self) -> None:
        claims = claims_for(hs_app(jti=True), T0)
        assert len(claims["jti"]) == 32
        assert int(claims["jti"], 16) >= 0
        assert "jti" not in claims_for(hs_app(), T0)

    def test_extra_claims_are_merged(self) -> None:
        app = hs_app(extra_claims={"tenant": "acme", "roles": ["a", "b"]})
        claims = claims_for(app, T0)
        assert claims["tenant"] == "acme"
        assert claims["roles"] == ["a", "b"]

    def test_extra_claims_cannot_override_reserved_claims(self) -> None:
        extra = {"appId": "cs-evil", "sub": "someone", "iat": 1, "exp": 2**40, "jti": "fixed",
                 "tenant": "acme",
                 "kore_jti": "fixed", "kore_iss": "cs-evil", "kore_sub": "someone"}
        plain = claims_for(hs_app(extra_claims=extra), T0)
        assert plain == claims_for(hs_app(), T0) | {"tenant": "acme"}
        assert claims_for(hs_app(jti=True, extra_claims=extra), T0)["jti"] != "fixed"

    @settings(max_examples=50, deadline=None)
    @given(extra=st.dictionaries(st.sampled_from(["appId", "iat", "exp", "jti", "sub", "x",
                                                  "kore_jti", "kore_iss", "kore_sub"]),
                                 st.integers()))
    def test_reserved_claims_survive_any_extra_claims(self, extra: dict[str, int]) -> None:
        claims = claims_for(hs_app(extra_claims=extra), T0)
        assert (claims["appId"], claims["iat"], claims["exp"]) == ("cs-main", 1_700_000_000,
                                                                   1_700_000_600)
        assert claims["sub"] == "kore-session-gateway"
        assert "jti" not in claims
        assert not {"kore_jti", "kore_iss", "kore_sub"} & set(claims)


class TestMint:
    @pytest.mark.parametrize("algorithm", ["HS256", "HS512"])
    def test_hmac_token_header_and_claims(self, algorithm: str) -> None:
        secret = HS256_SECRET if algorithm == "HS256" else HS512_SECRET
        app = hs_app(algorithm=algorithm, client_secret=Secret(secret))
        token = mint(app, T0)
        assert jwt.get_unverified_header(token.value) == {"alg": algorithm, "typ": "JWT"}
        assert decode(token, secret, algorithm) == claims_for(app, T0)
        assert (token.app, token.expires_at, token.jti) == ("main", 1_700_000_600.0, None)

    @pytest.mark.parametrize("algorithm", ["RS256", "RS512"])
    def test_rsa_token_verifies_with_public_key(self, algorithm: str, rsa_pem: str,
                                                rsa_key: rsa.RSAPrivateKey) -> None:
        app = KoreApp(name="rs", client_id="cs-rs", algorithm=algorithm,
                      private_key=Secret(rsa_pem))
        token = mint(app, T0)
        assert jwt.get_unverified_header(token.value) == {"alg": algorithm, "typ": "JWT"}
        assert decode(token, rsa_key.public_key(), algorithm) == {
            "appId": "cs-rs", "sub": "kore-session-gateway", "iat": 1_700_000_000,
            "exp": 1_700_000_600}

    def test_jti_token_carries_its_jti(self) -> None:
        token = mint(hs_app(jti=True), T0)
        assert token.jti is not None
        assert decode(token, HS256_SECRET, "HS256")["jti"] == token.jti

    @pytest.mark.parametrize("app", [
        KoreApp(name="bad-rs", client_id="cs-1", algorithm="RS256", private_key=Secret(BROKEN_PEM)),
        KoreApp(name="bad-rs", client_id="cs-1", algorithm="RS256"),
        KoreApp(name="bad-rs", client_id="cs-1", algorithm="RS256",
                private_key=Secret(HS256_SECRET)),
    ], ids=["broken-pem", "no-key", "secret-as-pem"])
    def test_mint_failure_names_app_not_key(self, app: KoreApp) -> None:
        with pytest.raises(MintError, match="'bad-rs'") as failure:
            mint(app, T0)
        assert "bm90IGEga2V5" not in str(failure.value)
        assert HS256_SECRET not in str(failure.value)


class TestSelectApp:
    APPS = (
        KoreApp(name="no-scope", client_id="cs-0", scopes=("Other",), bots=("st-*",)),
        KoreApp(name="sales", client_id="cs-1", bots=("st-sales-*", "st-crm")),
        KoreApp(name="wide", client_id="cs-2", bots=("st-*",),
                scopes=("Other", "Bot Sessions")),
        KoreApp(name="late", client_id="cs-3", bots=("st-sales-1",)),
    )

    @pytest.mark.parametrize(("bot_id", "expected"), [
        ("st-sales-1", "sales"),
        ("st-crm", "sales"),
        ("st-support", "wide"),
        ("ST-SUPPORT", None),
        ("xx-support", None),
    ], ids=["first-match-wins", "second-glob", "skips-app-without-scope", "case-sensitive",
            "no-match"])
    def test_first_matching_app_with_scope(self, bot_id: str, expected: str | None) -> None:
        if expected is None:
            with pytest.raises(BotNotConfigured, match=f"for bot {bot_id}$"):
                select_app(self.APPS, bot_id)
        else:
            assert select_app(self.APPS, bot_id).name == expected

    def test_no_app_is_403_bot_not_configured(self) -> None:
        with pytest.raises(BotNotConfigured) as failure:
            select_app([], "st-x")
        assert (failure.value.status, failure.value.code) == (403, "bot_not_configured")
        assert failure.value.message == "no Kore.ai app is configured for bot st-x"

    def test_app_for_memoizes_per_bot(self, make_cache: Callable[..., TokenCache]) -> None:
        cache = make_cache(*self.APPS)
        assert cache.app_for("st-crm") is cache.app_for("st-crm") is self.APPS[1]
        with pytest.raises(BotNotConfigured):
            cache.app_for("nope")


class TestTokenCache:
    async def test_cached_token_reused_until_renew_window(
            self, clock: FakeClock, make_cache: Callable[..., TokenCache]) -> None:
        app = hs_app()  # ttl 600, renew 60 s before expiry
        cache = make_cache(app)
        first = await cache.token(app)
        clock.advance(600 - 61)
        assert await cache.token(app) is first
        await settle()
        assert cache.mints("main") == 1

    async def test_renewal_in_window_runs_once_in_background(
            self, clock: FakeClock, make_cache: Callable[..., TokenCache]) -> None:
        app = hs_app()
        cache = make_cache(app)
        first = await cache.token(app)
        clock.advance(600 - 45)
        assert [await cache.token(app) for _ in range(5)] == [first] * 5
        assert cache.mints("main") == 1
        await settle()
        assert cache.mints("main") == 2
        renewed = await cache.token(app)
        assert renewed != first
        assert renewed.expires_at == first.expires_at + 555

    @pytest.mark.parametrize(("ttl", "renew", "window"), [
        (600, 60, 60), (60, 60, 30), (600, 0, 0),
    ], ids=["renew-before", "capped-at-half-ttl", "no-early-renewal"])
    async def test_renew_window_is_min_of_setting_and_half_ttl(
            self, ttl: int, renew: int, window: int, clock: FakeClock,
            make_cache: Callable[..., TokenCache]) -> None:
        app = hs_app(token_ttl_s=ttl, renew_before_s=renew)
        cache = make_cache(app)
        first = await cache.token(app)
        clock.now = first.expires_at - max(window, MIN_REMAINING_S) - 1
        assert await cache.token(app) is first
        await settle()
        assert cache.mints("main") == 1
        if window > MIN_REMAINING_S:
            clock.advance(1)
            assert await cache.token(app) is first
            await settle()
            assert cache.mints("main") == 2

    @pytest.mark.parametrize("renew", [60, 0], ids=["renewed-ahead", "no-early-renewal"])
    async def test_the_request_paths_shortcut_never_outlives_the_cache(
            self, renew: int, clock: FakeClock, make_cache: Callable[..., TokenCache]) -> None:
        """A hit sets `_cached`'s shortcut past the TLRUCache; it answers only while the token
        is neither due for renewal nor too old to send, and a drop ends it."""
        app = hs_app(token_ttl_s=600, renew_before_s=renew)
        cache = make_cache(app)
        first = await cache.token(app)
        assert await cache.token(app) is first and app.name in cache._fresh
        ends = first.expires_at - max(renew, MIN_REMAINING_S)
        clock.now = ends - 0.5
        assert await cache.token(app) is first
        await settle()
        assert cache.mints("main") == 1
        clock.now = ends  # renewal starts, or the token is too old to send: either way, a mint
        token = await cache.token(app)
        await settle()
        assert cache.mints("main") == 2
        assert (token is first) == (renew > MIN_REMAINING_S)  # renewed ahead, else replaced
        renewed = await cache.token(app)
        assert renewed is not first and await cache.token(app) is renewed
        cache.drop(app)
        assert app.name not in cache._fresh
        assert await cache.token(app) is not renewed and cache.mints("main") == 3

    @pytest.mark.parametrize("left", [MIN_REMAINING_S - 0.5, MIN_REMAINING_S, 1])
    async def test_token_near_expiry_is_never_returned(
            self, left: float, clock: FakeClock, make_cache: Callable[..., TokenCache]) -> None:
        app = hs_app()
        cache = make_cache(app)
        first = await cache.token(app)
        clock.now = first.expires_at - left
        fresh = await cache.token(app)
        assert fresh != first
        assert cache.mints("main") == 2
        assert fresh.expires_at - clock() >= 600 - 1

    async def test_jti_mode_mints_every_call_and_caches_nothing(
            self, make_cache: Callable[..., TokenCache]) -> None:
        app = hs_app(jti=True)
        cache = make_cache(app)
        issued = [await cache.token(app) for _ in range(3)]
        jtis = {decode(t, HS256_SECRET, "HS256")["jti"] for t in issued}
        assert len(jtis) == 3
        assert {t.jti for t in issued} == jtis
        assert cache.mints("main") == 3

    async def test_concurrent_calls_on_cold_cache_mint_once(
            self, make_cache: Callable[..., TokenCache]) -> None:
        app = hs_app()
        cache = make_cache(app)
        issued = await asyncio.gather(*(cache.token(app) for _ in range(100)))
        assert cache.mints("main") == 1
        assert len(set(issued)) == 1

    async def test_callers_waiting_on_a_mint_reuse_its_token(
            self, make_cache: Callable[..., TokenCache]) -> None:
        """The re-check after the lock: 50 callers queued behind a mint in flight mint nothing."""
        app = hs_app()
        cache = make_cache(app)
        async with cache._locks[app.name]:  # a mint in flight
            waiting = [asyncio.create_task(cache.token(app)) for _ in range(50)]
            await settle()
            first = await cache.token(replace(app, name="other"))  # other apps are not blocked
            assert first.app == "other"
            assert not any(t.done() for t in waiting)
        issued = await asyncio.gather(*waiting)
        assert cache.mints("main") == 1
        assert len(set(issued)) == 1

    async def test_drop_forces_a_new_mint(
            self, clock: FakeClock, make_cache: Callable[..., TokenCache]) -> None:
        app = hs_app()
        cache = make_cache(app)
        first = await cache.token(app)
        cache.drop(app)
        clock.advance(1)
        assert await cache.token(app) != first
        assert cache.mints("main") == 2

    async def test_drop_of_stale_token_keeps_newer_one(
            self, clock: FakeClock, make_cache: Callable[..., TokenCache]) -> None:
        app = hs_app()
        cache = make_cache(app)
        stale = await cache.token(app)
        cache.drop(app, stale)
        clock.advance(1)
        newer = await cache.token(app)
        cache.drop(app, stale)  # a second 401 on the old token arrives late
        assert await cache.token(app) is newer
        assert cache.mints("main") == 2

    async def test_aclose_cancels_pending_renewal(
            self, clock: FakeClock, make_cache: Callable[..., TokenCache]) -> None:
        app = hs_app()
        cache = make_cache(app)
        await cache.token(app)
        clock.advance(600 - 30)
        await cache.token(app)
        await cache.aclose()
        await settle()
        assert cache.mints("main") == 1

    async def test_failed_renewal_keeps_serving_cached_token(
            self, clock: FakeClock, make_cache: Callable[..., TokenCache],
            monkeypatch: pytest.MonkeyPatch) -> None:
        app = hs_app()
        cache = make_cache(app)
        first = await cache.token(app)

        def cannot_sign(app: KoreApp, now: float) -> Token:
            raise MintError("cannot sign a HS256 token for Kore.ai app 'main'")

        monkeypatch.setattr(tokens, "mint", cannot_sign)
        clock.advance(600 - 30)
        with capture_logs() as logs:
            assert await cache.token(app) is first
            await settle()
        assert [e["event"] for e in logs] == ["token.renewal_failed"]
        assert await cache.token(app) is first

    async def test_failed_mint_raises_mint_error(
            self, make_cache: Callable[..., TokenCache]) -> None:
        app = broken_rs_app()
        with pytest.raises(MintError, match="'bad'"):
            await make_cache(app).token(app)


class TestCheck:
    def test_true_when_every_app_can_sign(self, rsa_pem: str, clock: FakeClock) -> None:
        rs = KoreApp(name="rs", client_id="cs-2", algorithm="RS512", private_key=Secret(rsa_pem))
        cache = TokenCache([hs_app(), rs], clock=clock)
        assert cache.check() is True
        assert cache.mints("main") == cache.mints("rs") == 0  # nothing minted for callers

    def test_false_for_app_with_broken_private_key(self, clock: FakeClock) -> None:
        bad = broken_rs_app()
        with capture_logs() as logs:
            assert TokenCache([hs_app(), bad], clock=clock).check() is False
        assert [(e["event"], e["app"]) for e in logs] == [("token.check_failed", "bad")]
        assert "bm90IGEga2V5" not in str(logs)


class TestSecrecy:
    def test_token_repr_hides_the_jwt(self) -> None:
        token = mint(hs_app(), T0)
        assert token.value not in repr(token)
        assert token.value not in str(token)
        assert "expires_at=1700000600.0" in repr(token)

    async def test_logs_never_contain_jwt_or_secret(
            self, clock: FakeClock, make_cache: Callable[..., TokenCache]) -> None:
        app = hs_app()
        cache = make_cache(app)
        with capture_logs() as logs:
            token = await cache.token(app)
            cache.drop(app, token)
        assert logs == [
            {"event": "token.minted", "app": "main", "ttl_s": 600, "jti_mode": False,
             "log_level": "info"},
            {"event": "token.dropped", "app": "main", "log_level": "info"},
        ]
        assert token.value not in str(logs)
        assert HS256_SECRET not in str(logs)


class TestReload:
    """`TokenCache.reload`: a rotated secret's token is never sent again."""

    async def test_changed_secret_drops_the_cached_token(
            self, make_cache: Callable[..., TokenCache]) -> None:
        old, new = hs_app(), hs_app(client_secret=Secret("rotated-" + "z" * 40))
        cache = make_cache(old)
        await cache.token(old)
        with capture_logs() as logs:
            assert cache.reload([new]) == ("main",)
        token = await cache.token(new)
        assert decode(token, "rotated-" + "z" * 40, "HS256")["appId"] == "cs-main"
        assert cache.mints("main") == 2
        assert {"event": "token.dropped", "app": "main", "reason": "config_reload",
                "log_level": "info"} in logs

    async def test_unchanged_app_keeps_its_token(
            self, make_cache: Callable[..., TokenCache]) -> None:
        keep, other = hs_app("keep"), hs_app("other")
        cache = make_cache(keep, other)
        first = await cache.token(keep)
        assert cache.reload([keep, replace(other, token_ttl_s=300), hs_app("added")]) == (
            "other",)
        assert await cache.token(keep) is first
        assert cache.mints("keep") == 1

    async def test_app_chosen_before_a_reload_never_caches_its_token(
            self, make_cache: Callable[..., TokenCache]) -> None:
        """An in-flight request still holding the old app mints for itself only."""
        old, new = hs_app(), hs_app(client_secret=Secret("rotated-" + "z" * 40))
        cache = make_cache(old)
        cache.reload([new])
        stale = await cache.token(old)
        decode(stale, HS256_SECRET, "HS256")  # signed with what the request started with
        fresh = await cache.token(new)
        assert fresh is not stale
        decode(fresh, "rotated-" + "z" * 40, "HS256")
        assert await cache.token(new) is fresh

    async def test_bot_to_app_mapping_follows_the_new_apps(
            self, make_cache: Callable[..., TokenCache]) -> None:
        narrow = hs_app("narrow", bots=("st-a-*",))
        cache = make_cache(narrow)
        assert cache.app_for("st-a-1").name == "narrow"
        with pytest.raises(BotNotConfigured):
            cache.app_for("st-b-1")
        cache.reload([narrow, hs_app("wide", bots=("st-*",))])
        assert cache.app_for("st-b-1").name == "wide"
        cache.reload([hs_app("wide", bots=("st-*",))])
        assert cache.app_for("st-a-1").name == "wide"


def test_a_per_bot_memo_is_emptied_when_full_never_grown_past_its_limit() -> None:
    memo: dict[str, int] = {}
    assert [remember(memo, f"bot-{i}", i, limit=3) for i in range(3)] == [0, 1, 2]
    assert memo == {"bot-0": 0, "bot-1": 1, "bot-2": 2}
    assert remember(memo, "bot-3", 3, limit=3) == 3
    assert memo == {"bot-3": 3}
