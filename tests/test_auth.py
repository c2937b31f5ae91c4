"""Tests for gateway.auth: bearer key → caller, bot globs, key hashing."""

from __future__ import annotations

import hashlib

import pytest

from gateway.auth import LOCAL_CALLER, Authenticator, Caller, hash_key, new_key
from gateway.config.model import CallerConfig
from gateway.errors import Forbidden, Unauthenticated

CRM_KEY = "kgw_crm_key_0123456789"
NARROW_KEY = "kgw_narrow_key_9876543210"
CALLERS = (
    CallerConfig("crm-service", hash_key(CRM_KEY), ("st-*",)),
    CallerConfig("narrow-service", hash_key(NARROW_KEY), ("st-own-*", "st-exact")),
)


@pytest.fixture
def authenticator() -> Authenticator:
    return Authenticator(CALLERS)


class TestAuthenticator:
    def test_good_key_gives_its_caller(self, authenticator: Authenticator) -> None:
        assert authenticator.authenticate(f"Bearer {CRM_KEY}") == Caller("crm-service", ("st-*",))
        assert authenticator.authenticate(f"Bearer {NARROW_KEY}").name == "narrow-service"

    @pytest.mark.parametrize("scheme", ["bearer", "BEARER", "BeArEr"])
    def test_scheme_is_case_insensitive(self, authenticator: Authenticator, scheme: str) -> None:
        assert authenticator.authenticate(f"{scheme} {CRM_KEY}").name == "crm-service"

    def test_surrounding_whitespace_ignored(self, authenticator: Authenticator) -> None:
        assert authenticator.authenticate(f"  Bearer   {CRM_KEY}  ").name == "crm-service"

    @pytest.mark.parametrize("header", [
        None,
        "",
        "   ",
        "Bearer",
        "Bearer ",
        "Bearer kgw_unknown_key",
        f"Basic {CRM_KEY}",
        f"Token {CRM_KEY}",
        CRM_KEY,
        f"Bearer {CRM_KEY}x",
        f"Bearer {CRM_KEY[:-1]}",
        f"Bearer {CRM_KEY.upper()}",
        f"Bearer {hash_key(CRM_KEY)}",
        "Bearer \udcff\udcfe",
    ], ids=["missing", "empty", "blank", "scheme-only", "scheme-space", "unknown-key", "basic",
            "token-scheme", "no-scheme", "key-plus-char", "key-minus-char", "key-case-changed",
            "the-digest-itself", "undecodable"])
    def test_bad_header_is_unauthenticated(self, authenticator: Authenticator,
                                           header: str | None) -> None:
        with pytest.raises(Unauthenticated) as caught:
            authenticator.authenticate(header)
        assert caught.value.status == 401 and caught.value.code == "unauthenticated"

    def test_error_message_never_echoes_the_key(self, authenticator: Authenticator) -> None:
        with pytest.raises(Unauthenticated) as caught:
            authenticator.authenticate("Bearer kgw_wrong_secret_key")
        assert "kgw_wrong_secret_key" not in str(caught.value)

    def test_no_callers_rejects_everyone(self) -> None:
        with pytest.raises(Unauthenticated):
            Authenticator(()).authenticate(f"Bearer {CRM_KEY}")

    @pytest.mark.parametrize("header", [None, "", "Bearer anything", f"Bearer {CRM_KEY}"])
    def test_mode_none_gives_local_caller(self, header: str | None) -> None:
        caller = Authenticator(CALLERS, mode="none").authenticate(header)
        assert caller is LOCAL_CALLER
        assert caller.name == "local" and caller.may_touch("st-anything")

    def test_mode_none_without_callers(self) -> None:
        assert Authenticator((), mode="none").authenticate(None).name == "local"


class TestBotGlobs:
    @pytest.mark.parametrize(("globs", "bot_id", "allowed"), [
        (("st-*",), "st-abc", True),
        (("st-*",), "st-", True),
        (("st-*",), "xst-abc", False),
        (("st-*",), "ST-abc", False),
        (("st-own-*", "st-exact"), "st-own-1", True),
        (("st-own-*", "st-exact"), "st-exact", True),
        (("st-own-*", "st-exact"), "st-exact2", False),
        (("st-own-*", "st-exact"), "st-other", False),
        (("*",), "anything", True),
        (("st-?",), "st-1", True),
        (("st-?",), "st-12", False),
        ((), "st-abc", False),
    ], ids=["prefix", "prefix-empty-rest", "not-prefix", "case-sensitive", "first-glob",
            "second-glob-exact", "exact-no-suffix", "no-glob", "star", "question-mark",
            "question-mark-one-char", "no-globs"])
    def test_may_touch(self, globs: tuple[str, ...], bot_id: str, allowed: bool) -> None:
        assert Caller("c", globs).may_touch(bot_id) is allowed

    def test_authorize_raises_forbidden_naming_caller_and_bot(self) -> None:
        with pytest.raises(Forbidden) as caught:
            Caller("narrow-service", ("st-own-*",)).authorize("st-other")
        assert caught.value.status == 403 and caught.value.code == "forbidden"
        assert "narrow-service" in caught.value.message and "st-other" in caught.value.message

    def test_authorize_allows_matching_bot(self) -> None:
        Caller("c", ("st-own-*",)).authorize("st-own-1")


class TestKeys:
    @pytest.mark.parametrize("key", ["kgw_abc", "", "ключ-🔑", CRM_KEY])
    def test_hash_key_is_sha256_hex(self, key: str) -> None:
        assert hash_key(key) == hashlib.sha256(key.encode("utf-8")).hexdigest()

    def test_new_key_is_long_unique_and_url_safe(self) -> None:
        keys = {new_key() for _ in range(200)}
        assert len(keys) == 200
        for key in keys:
            assert len(key) >= 40
            assert all(ch.isascii() and (ch.isalnum() or ch in "-_") for ch in key)

    def test_new_key_authenticates_once_hashed(self) -> None:
        key = new_key()
        auth = Authenticator([CallerConfig("fresh", hash_key(key), ("*",))])
        assert auth.authenticate(f"Bearer {key}").name == "fresh"
