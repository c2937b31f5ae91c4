"""A failed reload is loud (issue 11, item 9): the reload is refused as a whole, so a caller
meant to be removed keeps working; `kgw_config_reload_failed`, the /readyz detail and an error
log line say so, naming the file and the key, and never a secret."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from gateway.http import reload as reload_module
from gateway.http.app import RUNTIME
from gateway.http.reload import Reloader
from tests.conftest import CALLER_KEY, CLIENT_SECRET, OTHER_KEY, base_settings, merge, write_config

URL = "/v1/bots/st-own-a/sessions/deactivate"


@pytest.fixture(autouse=True)
def fresh_log(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reload_module, "log", structlog.get_logger(reload_module.__name__))


async def status_of(gateway: Any, key: str) -> int:
    resp = await gateway.post(URL, json={"userId": "u-1"},
                              headers={"Authorization": f"Bearer {key}"})
    await resp.read()
    return int(resp.status)


async def reload_gauge(gateway: Any) -> float:
    text = await (await gateway.get("/metrics")).text()
    [line] = [line for line in text.splitlines() if line.startswith("kgw_config_reload_failed ")]
    return float(line.split()[1])


async def config_reload(gateway: Any) -> dict[str, Any]:
    resp = await gateway.get("/readyz")
    assert resp.status == 200  # the old config still serves: ready
    text = await resp.text()
    assert CLIENT_SECRET not in text and "secret-in-the-typo" not in text
    detail: dict[str, Any] = (await resp.json())["configReload"]
    return detail


async def test_removal_plus_a_typo_is_refused_loudly_then_applied(
        tmp_path: Path, start_gateway: Any, sandbox: Any) -> None:
    gateway = await start_gateway()
    reloader = Reloader(gateway.app[RUNTIME])
    assert await config_reload(gateway) == {"ok": True}
    assert await reload_gauge(gateway) == 0
    assert await status_of(gateway, OTHER_KEY) == 200

    settings = base_settings(tmp_path, sandbox.url)
    settings["callers"] = settings["callers"][:1]  # narrow-service removed …
    typo = merge(settings, {"upstream": {"timeout_sec": "secret-in-the-typo"}})  # … and a typo
    path = write_config(tmp_path, typo)
    with capture_logs() as logs:
        assert await reloader.reload() is None
    [line] = [e for e in logs if e["event"] == "config.reload_failed"]
    assert line["log_level"] == "error" and line["file"] == str(path)
    assert line["keys"] == ["upstream.timeout_sec"] and "still in use" in line["kept"]

    assert await status_of(gateway, OTHER_KEY) == 200  # the removal did not happen
    assert await reload_gauge(gateway) == 1
    detail = await config_reload(gateway)
    assert detail["ok"] is False and detail["keys"] == ["upstream.timeout_sec"]
    assert detail["error"] == f"{path}: upstream.timeout_sec: unknown key"

    write_config(tmp_path, settings)  # the typo fixed
    assert await reloader.reload() is not None
    assert await status_of(gateway, OTHER_KEY) == 401
    assert await status_of(gateway, CALLER_KEY) == 200
    assert await reload_gauge(gateway) == 0
    assert await config_reload(gateway) == {"ok": True}


async def test_several_problems_are_counted(tmp_path: Path, start_gateway: Any,
                                            sandbox: Any) -> None:
    gateway = await start_gateway()
    broken = merge(base_settings(tmp_path, sandbox.url),
                   {"server": {"lisen": "x"}, "audit": {"hash_user_id": True}})
    write_config(tmp_path, broken)
    assert await Reloader(gateway.app[RUNTIME]).reload() is None
    detail = await config_reload(gateway)
    assert detail["error"].endswith("(and 1 more problem(s))")
    assert detail["keys"] == ["server.lisen", "audit.hash_user_id"]
