"""Integration fixtures on top of tests/conftest.py: a gateway from a few config tables, a
sandbox with its own options (known bots, session paths) and the gateway's audit trail."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.sandbox.server import KoreSandbox, SandboxApp
from tests.conftest import CLIENT_ID, CLIENT_SECRET, Sandbox
from tests.integration.sides import AuditTrail

StartGateway = Callable[..., Awaitable[Any]]


@pytest.fixture
def audit(tmp_path: Path) -> AuditTrail:
    """The audit file every config built by `make_config` in this test writes to."""
    return AuditTrail(tmp_path / "audit" / "deactivations.jsonl")


@pytest.fixture
def start_gateway(make_config: Any, gateway_for: Any, sandbox: Sandbox) -> StartGateway:
    """`await start_gateway(**tables)`: a gateway in front of `sandbox` (or `base_url=`)."""
    async def start(base_url: str | None = None, **tables: Any) -> Any:
        return await gateway_for(make_config(base_url or sandbox.url, **tables))
    return start


@pytest.fixture
def make_sandbox(aiohttp_server: Any) -> Callable[..., Awaitable[Sandbox]]:
    """`await make_sandbox(known_bots=("st-known-*",))`: a second sandbox with its own
    `KoreSandbox` options, e.g. answering 404 for every bot outside `known_bots`."""
    async def start(**options: Any) -> Sandbox:
        emulator = KoreSandbox([SandboxApp(client_id=CLIENT_ID, key=CLIENT_SECRET)], **options)
        server = await aiohttp_server(emulator.create_app(), host="127.0.0.1")
        return Sandbox(emulator, server)
    return start
