"""Shared fixtures: a valid config in tmp_path, a settable clock, the real sandbox on a
loopback port, the real gateway in front of it, a caller key and the audit records."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import tomli_w
from aiohttp.test_utils import TestClient, TestServer

from gateway.auth import hash_key
from gateway.config.loader import load_config
from gateway.config.model import Config
from gateway.http.app import RUNTIME, create_app
from gateway.sandbox.server import KoreSandbox, SandboxApp
from tests.redis_fixtures import redis_server, redis_server_binary, silent_port  # noqa: F401

CLIENT_ID = "cs-test-app"
CLIENT_SECRET = "test-secret-for-sandbox-only-0123456789"
CALLER_KEY = "kgw_test_caller_key"
OTHER_KEY = "kgw_test_other_key"
BOT = "st-test-bot"


class FakeClock:
    """A settable clock: token and limiter tests advance it instead of sleeping."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(autouse=True)
def _fresh_structlog() -> Iterator[None]:
    """`logs.configure()` caches loggers and takes over the standard library's root logger and
    exception hooks; every test starts from the defaults and leaves them as it found them."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, sys.excepthook, threading.excepthook,
             sys.unraisablehook)
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()
    root.handlers[:], level, sys.excepthook, threading.excepthook, sys.unraisablehook = saved
    root.setLevel(level)
    logging.captureWarnings(False)


def base_settings(tmp_path: Path, base_url: str = "http://127.0.0.1:9") -> dict[str, Any]:
    return {
        "server": {"listen": "127.0.0.1:0"},
        "upstream": {"base_url": base_url, "allow_insecure_http": True, "timeout_s": 5,
                     "backoff_base_s": 0.01, "backoff_max_s": 0.05},
        "audit": {"path": str(tmp_path / "audit" / "deactivations.jsonl")},
        "apps": [{"name": "sessions", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET,
                  "bots": ["st-*"]}],
        "callers": [
            {"name": "crm-service", "key_sha256": hash_key(CALLER_KEY), "bots": ["st-*"]},
            {"name": "narrow-service", "key_sha256": hash_key(OTHER_KEY), "bots": ["st-own-*"]},
        ],
    }


def merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def write_config(tmp_path: Path, settings: dict[str, Any], name: str = "gateway.toml") -> Path:
    path = tmp_path / name
    path.write_text(tomli_w.dumps(settings), encoding="utf-8")
    return path


ConfigFactory = Callable[..., Config]


@pytest.fixture
def make_config(tmp_path: Path) -> ConfigFactory:
    """`make_config(base_url, **tables)`: a loaded config with tables merged over the base."""
    def factory(base_url: str = "http://127.0.0.1:9", **tables: Any) -> Config:
        settings = merge(base_settings(tmp_path, base_url), tables)
        return load_config(write_config(tmp_path, settings))
    return factory


class Sandbox:
    """The real sandbox on a loopback port, with its recorded calls."""

    def __init__(self, emulator: KoreSandbox, server: TestServer) -> None:
        self.emulator, self.server = emulator, server
        self.url = str(server.make_url("")).rstrip("/")

    @property
    def calls(self) -> list[Any]:
        return self.emulator.calls

    @property
    def faults(self) -> Any:
        return self.emulator.faults


@pytest.fixture
async def sandbox(aiohttp_server: Any) -> Sandbox:
    emulator = KoreSandbox([SandboxApp(client_id=CLIENT_ID, key=CLIENT_SECRET)])
    server = await aiohttp_server(emulator.create_app(), host="127.0.0.1")
    return Sandbox(emulator, server)


@pytest.fixture
def config(make_config: ConfigFactory, sandbox: Sandbox) -> Config:
    return make_config(sandbox.url)


def settling(client: TestClient[Any, Any]) -> TestClient[Any, Any]:
    """`client` handing each answer to the test once the gateway's audit log has nothing left
    to commit. A terminal record may follow its answer by a commit (contract §3), and a test
    that then reads the file synchronously (`read_records`) blocks the event loop the
    in-process gateway needs to start that commit."""
    app = client.app
    assert app is not None
    audit = app[RUNTIME].audit
    send = client._request

    async def settled(method: str, path: Any, **kwargs: Any) -> Any:
        response = await send(method, path, **kwargs)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(audit.until_quiet(), SETTLE_S)
        return response

    client._request = settled  # type: ignore[method-assign]
    return client


@pytest.fixture
async def gateway(aiohttp_client: Any, config: Config) -> TestClient:
    return settling(await aiohttp_client(create_app(config),
                                         server_kwargs={"host": "127.0.0.1"}))


@pytest.fixture
async def gateway_for(aiohttp_client: Any) -> Callable[[Config], Any]:
    """Starts a gateway for a config the test built itself."""
    async def start(config: Config) -> TestClient:
        return settling(await aiohttp_client(create_app(config),
                                             server_kwargs={"host": "127.0.0.1"}))
    return start


@pytest.fixture
def caller_key() -> str:
    return CALLER_KEY


@pytest.fixture
def auth_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {CALLER_KEY}"}


SETTLE_S = 3.0  # how long a test waits for terminal records that follow their answer


def read_records(path: Path, settle_s: float = 0.0) -> list[dict[str, Any]]:
    """The records of one audit file. The terminal record of a call that went upstream may be
    written just after its answer (contract §3): with `settle_s`, wait up to that long for
    every `deactivate.requested` record to be closed before returning what is there."""
    deadline = time.monotonic() + settle_s
    while True:
        records = _parse_records(path)
        if not open_requests(records) or time.monotonic() >= deadline:
            return records
        time.sleep(0.02)


def _parse_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")  # not splitlines(): U+2028 is data
    return [json.loads(line) for line in lines if line]


def open_requests(records: list[dict[str, Any]]) -> set[str]:
    """Request IDs with a `deactivate.requested` record and no `deactivate.completed` yet."""
    opened = {r.get("requestId") for r in records if r.get("event") == "deactivate.requested"}
    closed = {r.get("requestId") for r in records if r.get("event") == "deactivate.completed"}
    return {str(rid) for rid in opened - closed}


@pytest.fixture
def audit_records(config: Config) -> Callable[[], list[dict[str, Any]]]:
    return lambda: read_records(Path(config.audit.path), settle_s=SETTLE_S)


@pytest.fixture
async def session() -> AsyncIterator[Any]:
    import aiohttp

    async with aiohttp.ClientSession() as s:
        yield s
