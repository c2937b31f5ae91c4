"""The JWT as Kore.ai reads it: claim aliases refused, jti apps' short default TTL, and the
warning for a jti TTL Kore.ai's own clock could push past its 1-hour cap."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from gateway.config.loader import load_config
from gateway.config.model import (
    DEFAULT_JTI_TOKEN_TTL_S,
    DEFAULT_TOKEN_TTL_S,
    ConfigError,
    ConfigWarning,
)
from gateway.config.tables import config_warnings
from gateway.http.app import create_app
from tests.conftest import base_settings, write_config

REPO = Path(__file__).resolve().parents[2]


def settings_with_app(tmp_path: Path, **app: Any) -> dict[str, Any]:
    settings = base_settings(tmp_path)
    settings["apps"][0].update(app)
    return settings


def problems(tmp_path: Path, **app: Any) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(write_config(tmp_path, settings_with_app(tmp_path, **app)), env={})
    assert str(caught.value).startswith(f"{tmp_path / 'gateway.toml'}: ")
    return caught.value.problems


class TestExtraClaims:
    @pytest.mark.parametrize("alias", ["kore_jti", "kore_iss", "kore_sub"])
    def test_kore_alias_is_a_config_error_naming_it(self, tmp_path: Path, alias: str) -> None:
        found = problems(tmp_path, extra_claims={alias: "x", "tenant": "acme"})
        [line] = [p for p in found if p.startswith("apps[0].extra_claims: ")]
        assert alias in line and "tenant" not in line

    def test_every_alias_is_named_in_one_line(self, tmp_path: Path) -> None:
        found = problems(tmp_path, extra_claims={"kore_sub": "a", "kore_jti": "b",
                                                 "kore_iss": "c"})
        [line] = [p for p in found if p.startswith("apps[0].extra_claims: ")]
        assert "kore_jti, kore_iss, kore_sub" in line

    @pytest.mark.parametrize("claim", ["appId", "sub", "iat", "exp", "jti"])
    def test_a_claim_the_gateway_sets_is_a_config_error(self, tmp_path: Path,
                                                        claim: str) -> None:
        found = problems(tmp_path, extra_claims={claim: 1})
        assert any(p.startswith("apps[0].extra_claims: ") and claim in p for p in found)

    def test_other_claims_are_accepted(self, tmp_path: Path) -> None:
        path = write_config(tmp_path, settings_with_app(
            tmp_path, extra_claims={"aud": "https://idproxy.kore.com/authorize", "tier": 2}))
        assert load_config(path, env={}).apps[0].extra_claims == {
            "aud": "https://idproxy.kore.com/authorize", "tier": 2}


class TestJtiTokenTtl:
    def test_jti_app_defaults_to_a_short_ttl(self, tmp_path: Path) -> None:
        path = write_config(tmp_path, settings_with_app(tmp_path, jti=True))
        assert load_config(path, env={}).apps[0].token_ttl_s == DEFAULT_JTI_TOKEN_TTL_S == 120

    def test_plain_app_keeps_the_usual_default(self, tmp_path: Path) -> None:
        path = write_config(tmp_path, settings_with_app(tmp_path))
        assert load_config(path, env={}).apps[0].token_ttl_s == DEFAULT_TOKEN_TTL_S == 600

    def test_a_given_ttl_wins_over_the_jti_default(self, tmp_path: Path) -> None:
        path = write_config(tmp_path, settings_with_app(tmp_path, jti=True, token_ttl_s=900))
        assert load_config(path, env={}).apps[0].token_ttl_s == 900

    @pytest.mark.parametrize(("jti", "ttl", "warned"), [
        (True, 3600, True), (True, 3540, True), (True, 3539, False), (True, 120, False),
        (False, 3600, False), (False, 86400, False),
    ], ids=["jti-at-cap", "jti-60s-below", "jti-61s-below", "jti-default", "no-jti-at-cap",
            "no-jti-a-day"])
    def test_warning_near_the_one_hour_cap(self, tmp_path: Path, jti: bool, ttl: int,
                                           warned: bool) -> None:
        path = write_config(tmp_path, settings_with_app(tmp_path, jti=jti, token_ttl_s=ttl))
        found = config_warnings(load_config(path, env={}))
        assert bool(found) is warned
        if warned:
            [warning] = found
            assert isinstance(warning, ConfigWarning)
            assert warning.key == "apps[0].token_ttl_s"
            assert "own clock" in warning.message and str(ttl) in warning.message

    def test_check_config_shows_the_warning(self, tmp_path: Path) -> None:
        path = write_config(tmp_path, settings_with_app(tmp_path, jti=True, token_ttl_s=3600))
        result = subprocess.run([sys.executable, "-m", "gateway", "check-config", "--config",
                                 str(path)], cwd=REPO, capture_output=True, text=True,
                                timeout=30, check=False, stdin=subprocess.DEVNULL)
        assert result.returncode == 0, result.stderr
        assert f"{path}: OK" in result.stdout
        assert f"warning: {path}: apps[0].token_ttl_s: 3600 s is within 60 s" in result.stderr

    async def test_start_up_logs_the_warning(self, tmp_path: Path, aiohttp_client: Any) -> None:
        path = write_config(tmp_path, settings_with_app(tmp_path, jti=True, token_ttl_s=3590))
        with capture_logs() as logs:
            client = await aiohttp_client(create_app(load_config(path, env={})))
            await client.close()
        [line] = [e for e in logs if e["event"] == "config.warning"]
        assert line["log_level"] == "warning"
        assert (line["file"], line["key"]) == (str(path), "apps[0].token_ttl_s")
        assert "3590 s" in line["message"]

    async def test_no_warning_logged_for_a_safe_ttl(self, tmp_path: Path,
                                                    aiohttp_client: Any) -> None:
        path = write_config(tmp_path, settings_with_app(tmp_path, jti=True))
        with capture_logs() as logs:
            client = await aiohttp_client(create_app(load_config(path, env={})))
            await client.close()
        assert [e for e in logs if e["event"] == "gateway.started"]
        assert not [e for e in logs if e["event"] == "config.warning"]


class TestShapeWarnings:
    @pytest.mark.parametrize(("client_id", "warned"), [
        ("cs-3a1b2c3d-0000-4000-8000-1234567890ab", False), ("cs-test-app", False),
        ("3a1b2c3d-0000-4000-8000-1234567890ab", True), ("st-oops", True),
    ], ids=["uuid", "short", "no-prefix", "a-bot-id"])
    def test_a_client_id_not_shaped_like_kores_is_warned_about(
            self, tmp_path: Path, client_id: str, warned: bool) -> None:
        path = write_config(tmp_path, settings_with_app(tmp_path, client_id=client_id))
        keys = [w.key for w in config_warnings(load_config(path, env={}))]
        assert keys == (["apps[0].client_id"] if warned else [])

    @pytest.mark.parametrize(("bots", "warned"), [
        (None, True), (["*"], False), (["st-*"], False),
    ], ids=["unset", "every-bot-on-purpose", "globs"])
    def test_a_caller_without_bots_is_warned_about(self, tmp_path: Path,
                                                   bots: list[str] | None,
                                                   warned: bool) -> None:
        settings = base_settings(tmp_path)
        caller = settings["callers"][0]
        caller.pop("bots", None)
        if bots is not None:
            caller["bots"] = bots
        config = load_config(write_config(tmp_path, settings), env={})
        found = [w for w in config_warnings(config) if w.key == "callers[0].bots"]
        assert bool(found) is warned
        if warned:
            assert "may touch every bot" in found[0].message
            assert config.callers[0].bots == ("*",)
