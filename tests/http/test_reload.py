"""Tests for gateway.http.reload and `Runtime.reload`: what a reload changes, what it refuses, and
the watch that triggers it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from structlog.testing import capture_logs

from gateway.auth import hash_key
from gateway.config.loader import load_config
from gateway.config.model import KoreApp, Secret
from gateway.errors import Unauthenticated
from gateway.http import reload as reload_module
from gateway.http.reload import (
    ConfigChange,
    Reloader,
    diff,
    problem_keys,
    reload_problems,
    restart_only_changes,
    watched_files,
)
from gateway.http.runtime import Runtime
from tests.conftest import CALLER_KEY, CLIENT_SECRET, base_settings, merge, write_config

NEW_KEY = "kgw_test_new_caller_key"
NEW_SECRET = "rotated-secret-for-sandbox-only-987654321"
WAIT_S = 10.0  # generous bound for anything the watch must notice


@pytest.fixture(autouse=True)
def fresh_log(monkeypatch: pytest.MonkeyPatch) -> None:
    """capture_logs sees reload events whatever logger configuration ran before."""
    monkeypatch.setattr(reload_module, "log", structlog.get_logger(reload_module.__name__))


class ConfigFile:
    """A config file in tmp_path with its client secret in a separate file."""

    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path
        self.path = tmp_path / "gateway.toml"
        self.secret = tmp_path / "secret.txt"
        self.secret.write_text(CLIENT_SECRET + "\n", encoding="utf-8")
        self.settings = base_settings(tmp_path)
        self.settings["apps"][0].pop("client_secret")
        self.settings["apps"][0]["client_secret_file"] = "secret.txt"
        self.write()

    def write(self, **tables: Any) -> None:
        self.settings = merge(self.settings, tables)
        write_config(self.dir, self.settings)

    def add_caller(self, name: str = "new-service", key: str = NEW_KEY) -> None:
        callers = [*self.settings["callers"],
                   {"name": name, "key_sha256": hash_key(key), "bots": ["st-*"]}]
        self.write(callers=callers)


@pytest.fixture
def config_file(tmp_path: Path) -> ConfigFile:
    return ConfigFile(tmp_path)


@pytest.fixture
async def runtime(config_file: ConfigFile) -> AsyncIterator[Runtime]:
    rt = Runtime(load_config(config_file.path))
    yield rt
    await rt.tokens.aclose()


def bearer(key: str) -> str:
    return f"Bearer {key}"


class TestDiff:
    def test_names_callers_and_apps_added_removed_changed(self, config_file: ConfigFile) -> None:
        old = load_config(config_file.path)
        callers = [{**config_file.settings["callers"][0], "bots": ["st-own-*"]},
                   {"name": "new-service", "key_sha256": hash_key(NEW_KEY)}]
        config_file.write(callers=callers,
                          apps=[{**config_file.settings["apps"][0], "token_ttl_s": 300},
                                {"name": "extra", "client_id": "cs-x", "client_secret": "s" * 40}])
        change = diff(old, load_config(config_file.path))
        assert change == ConfigChange(
            callers_added=("new-service",), callers_removed=("narrow-service",),
            callers_changed=("crm-service",), apps_added=("extra",),
            apps_changed=("sessions",))
        assert change.live

    def test_a_rotated_secret_file_is_a_changed_app(self, config_file: ConfigFile) -> None:
        old = load_config(config_file.path)
        config_file.secret.write_text(NEW_SECRET, encoding="utf-8")
        change = diff(old, load_config(config_file.path))
        assert change.apps_changed == ("sessions",)
        assert NEW_SECRET not in str(change.log_fields()) + repr(change)

    def test_restart_only_keys_are_named(self, config_file: ConfigFile, tmp_path: Path) -> None:
        old = load_config(config_file.path)
        config_file.write(server={"listen": "127.0.0.1:18099", "max_in_flight": 5},
                          audit={"path": str(tmp_path / "elsewhere.jsonl")})
        assert restart_only_changes(old, load_config(config_file.path)) == (
            "server.listen", "server.max_in_flight", "audit.path")

    def test_same_file_changes_nothing(self, config_file: ConfigFile) -> None:
        change = diff(load_config(config_file.path), load_config(config_file.path))
        assert change == ConfigChange() and not change.live


class TestReloadProblems:
    def test_no_callers_refused_while_running_with_api_keys(self, config_file: ConfigFile
                                                           ) -> None:
        old = load_config(config_file.path)
        config_file.write(server={"auth": "none"}, callers=[])
        problems = reload_problems(old, load_config(config_file.path))
        assert problems and problems[0].startswith("callers:")

    def test_a_key_that_cannot_sign_is_refused(self, config_file: ConfigFile) -> None:
        pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()).decode()
        new = load_config(config_file.path)
        app = KoreApp(name="ec", client_id="cs-ec", algorithm="RS256", private_key=Secret(pem))
        problems = reload_problems(new, type(new)(**{**_fields(new), "apps": (app,)}))
        assert len(problems) == 1 and problems[0].startswith("apps[0].private_key: ")
        assert "PRIVATE KEY" not in problems[0]

    def test_problem_keys(self) -> None:
        problems = ["apps[0].client_secret_file: cannot read /x", "server.listne: unknown key",
                    "not valid TOML: Invalid value (at line 3)"]
        assert problem_keys(problems) == ["apps[0].client_secret_file", "server.listne",
                                          "<file>"]


def _fields(config: Any) -> dict[str, Any]:
    return {name: getattr(config, name) for name in config.__dataclass_fields__}


class TestRuntimeReload:
    async def test_new_caller_key_works_and_removed_one_stops(
            self, runtime: Runtime, config_file: ConfigFile) -> None:
        with pytest.raises(Unauthenticated):
            runtime.auth.authenticate(bearer(NEW_KEY))
        config_file.add_caller()
        config_file.write(callers=config_file.settings["callers"][1:])  # crm-service goes
        runtime.reload(load_config(config_file.path))
        assert runtime.auth.authenticate(bearer(NEW_KEY)).name == "new-service"
        with pytest.raises(Unauthenticated):
            runtime.auth.authenticate(bearer(CALLER_KEY))

    async def test_rotated_secret_signs_the_next_token(
            self, runtime: Runtime, config_file: ConfigFile) -> None:
        app = runtime.tokens.app_for("st-test-bot")
        old_token = await runtime.tokens.token(app)
        config_file.secret.write_text(NEW_SECRET, encoding="utf-8")
        change = runtime.reload(load_config(config_file.path))
        assert change.apps_changed == ("sessions",)
        new_app = runtime.tokens.app_for("st-test-bot")
        token = await runtime.tokens.token(new_app)
        assert token is not old_token
        jwt.decode(token.value, NEW_SECRET, algorithms=["HS256"])
        assert runtime.config.apps == (new_app,)

    async def test_restart_only_settings_keep_their_running_value(
            self, runtime: Runtime, config_file: ConfigFile, tmp_path: Path) -> None:
        running = runtime.config
        config_file.write(server={"listen": "127.0.0.1:18099"},
                          audit={"path": str(tmp_path / "elsewhere.jsonl")})
        config_file.add_caller()
        change = runtime.reload(load_config(config_file.path))
        assert change.restart_required == ("server.listen", "audit.path")
        assert runtime.config.server == running.server
        assert runtime.config.audit == running.audit
        assert runtime.config.callers[-1].name == "new-service"

    async def test_auth_mode_is_kept(self, runtime: Runtime, config_file: ConfigFile) -> None:
        """`server.auth` is restart-only: a reload can never switch caller keys off."""
        config_file.write(server={"auth": "none"})
        change = runtime.reload(load_config(config_file.path))
        assert change.restart_required == ("server.auth",)
        with pytest.raises(Unauthenticated):
            runtime.auth.authenticate(None)


class TestReloader:
    async def test_valid_file_is_applied_and_logged(
            self, runtime: Runtime, config_file: ConfigFile) -> None:
        config_file.add_caller()
        with capture_logs() as logs:
            change = await Reloader(runtime).reload()
        assert change is not None and change.callers_added == ("new-service",)
        assert runtime.auth.authenticate(bearer(NEW_KEY)).name == "new-service"
        [line] = [e for e in logs if e["event"] == "config.reloaded"]
        assert line["callers_added"] == ["new-service"] and line["file"] == str(config_file.path)

    async def test_broken_file_is_rejected_and_the_old_config_kept(
            self, runtime: Runtime, config_file: ConfigFile) -> None:
        running = runtime.config
        config_file.add_caller()
        config_file.write(server={"listne": "x"}, apps=[
            {**config_file.settings["apps"][0], "client_secret_file": "missing.txt"}])
        with capture_logs() as logs:
            assert await Reloader(runtime).reload() is None
        assert runtime.config is running
        with pytest.raises(Unauthenticated):
            runtime.auth.authenticate(bearer(NEW_KEY))
        [line] = [e for e in logs if e["event"] == "config.reload_failed"]
        assert line["log_level"] == "error" and line["file"] == str(config_file.path)
        assert line["keys"] == ["server.listne", "apps[0].client_secret_file"]
        assert any("missing.txt" in p for p in line["problems"])

    async def test_not_toml_names_the_file(self, runtime: Runtime, config_file: ConfigFile
                                          ) -> None:
        config_file.path.write_text("[server\n", encoding="utf-8")
        with capture_logs() as logs:
            assert await Reloader(runtime).reload() is None
        [line] = [e for e in logs if e["event"] == "config.reload_failed"]
        assert line["keys"] == ["<file>"] and "not valid TOML" in line["problems"][0]

    async def test_requests_are_coalesced(self, runtime: Runtime, config_file: ConfigFile
                                         ) -> None:
        reloader = Reloader(runtime)
        reloader.start()
        try:
            for _ in range(5):
                reloader.request()
            await _eventually(lambda: reloader.attempts >= 1)
            await asyncio.sleep(0.2)
        finally:
            await reloader.aclose()
        assert 1 <= reloader.attempts <= 2


class TestWatch:
    async def test_a_changed_secret_file_triggers_a_reload(
            self, runtime: Runtime, config_file: ConfigFile) -> None:
        reloader = Reloader(runtime, watch_s=0.1)
        reloader.start()
        try:
            await asyncio.sleep(0.3)
            assert reloader.attempts == 0  # nothing changed: nothing reloaded
            config_file.secret.write_text(NEW_SECRET + "\n", encoding="utf-8")
            await _eventually(lambda: runtime.config.apps[0].client_secret == Secret(NEW_SECRET))
        finally:
            await reloader.aclose()

    async def test_a_broken_file_is_tried_once_per_change(
            self, runtime: Runtime, config_file: ConfigFile) -> None:
        reloader = Reloader(runtime, watch_s=0.1)
        reloader.start()
        try:
            config_file.path.write_text("[server\n", encoding="utf-8")
            await _eventually(lambda: reloader.attempts == 1)
            await asyncio.sleep(0.5)
            assert reloader.attempts == 1
        finally:
            await reloader.aclose()

    def test_watched_files_are_the_config_and_its_secret_files(
            self, config_file: ConfigFile) -> None:
        assert watched_files(str(config_file.path)) == [config_file.path,
                                                        config_file.secret.resolve()]

    def test_interval_is_bounded(self, runtime: Runtime) -> None:
        assert Reloader(runtime, watch_s=0.0).watch_s == reload_module.MIN_WATCH_S
        assert Reloader(runtime, watch_s=1e9).watch_s == reload_module.MAX_WATCH_S


async def _eventually(check: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)
