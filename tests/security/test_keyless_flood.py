"""A keyless flood (issue 11, finding 1): 150 clients without a valid key for 10 s cannot crowd
out a caller with one, and cannot fill the audit volume."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.audit.log import rotated_files
from tests.conftest import BOT
from tests.security.served import Served, client_address, keyed_call, open_from, read_answer

FLOOD_S = 10.0
CLIENTS = 150
# What the keyless flood may add to the audit: its records are bounded by time (PER_S a
# second, then one summary a second), about 120 kB in FLOOD_S. The keyed calls' own records
# are not counted: a faster gateway serves more of them in the same time.
MAX_KEYLESS_AUDIT_BYTES = 300_000
KEYED_CALLER = "crm-service"
PER_S = 20  # audit.max_unauthenticated_per_s, the contract's default

pytestmark = pytest.mark.skipif(not Path("/proc/self").exists(), reason="Linux loopback /8")


def keyless_request(n: int) -> bytes:
    auth = "" if n % 2 else "Authorization: Bearer kgw_not_a_configured_key\r\n"
    body = b'{"userId":"u-flood"}'
    return (f"POST /v1/bots/{BOT}/sessions/deactivate HTTP/1.1\r\nHost: gw\r\n{auth}"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode() + body


async def flood_client(n: int, port: int, until: float) -> list[int]:
    """One keyless client on its own address: request after request, reconnecting when the
    gateway closes the connection; the statuses it got."""
    statuses: list[int] = []
    request = keyless_request(n)
    while time.monotonic() < until:
        try:
            reader, writer = await open_from(client_address(n), port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        try:
            while time.monotonic() < until:
                writer.write(request)
                status, headers, _ = await asyncio.wait_for(read_answer(reader), 10)
                statuses.append(status)
                if headers.get("connection", "").lower() == "close":
                    break
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                TimeoutError):
            pass
        finally:
            writer.close()
    return statuses


async def keyed_caller(url: str, until: float, workers: int = 4) -> list[int | None]:
    """A few callers with the valid key, call after call while the flood lasts."""
    statuses: list[int | None] = []
    timeout = aiohttp.ClientTimeout(total=15)

    async def worker(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < until:
            statuses.append(await keyed_call(session, url, f"u-keyed-{len(statuses)}"))

    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(workers)))
    return statuses


async def test_keyless_flood_leaves_keyed_calls_served_and_the_audit_small(
        sandbox: Any, tmp_path: Path) -> None:
    # The keyed calls all go to one bot: no per-bot budget may refuse them on a fast machine.
    gateway = await Served(tmp_path, sandbox.url, server={"max_in_flight": 50},
                           rate_limit={"enabled": False}).start()
    try:
        before = gateway.audit_bytes()
        until = time.monotonic() + FLOOD_S
        flood = [asyncio.create_task(flood_client(n, gateway.port, until))
                 for n in range(CLIENTS)]
        keyed = await keyed_caller(gateway.url, until)
        answered = [status for statuses in await asyncio.gather(*flood) for status in statuses]
        growth = gateway.audit_bytes() - before - keyed_bytes(gateway)
        suppressed_metric = await gateway.metric(
            "kore_gateway_audit_unauthenticated_suppressed_total")
    finally:
        assert gateway.stop() == 0
    ok = keyed.count(200) / len(keyed)
    print(f"keyless answers {len(answered)}, keyed {keyed.count(200)}/{len(keyed)} "
          f"({ok:.1%}), keyless audit growth {growth} bytes")
    assert len(answered) > CLIENTS * 5, "the flood did not happen"
    assert set(answered) == {401}
    assert len(keyed) >= 20 and ok >= 0.99, keyed
    assert growth <= MAX_KEYLESS_AUDIT_BYTES
    check_keyless_records(gateway.records(), len(answered), suppressed_metric)


def keyed_bytes(gateway: Served) -> int:
    """The bytes of the keyed callers' records in the audit files."""
    return sum(len(line) for path in rotated_files(gateway.audit_path)
               for line in path.read_bytes().splitlines(keepends=True)
               if json.loads(line).get("caller") == KEYED_CALLER)


def check_keyless_records(records: list[dict[str, Any]], answered: int,
                          suppressed_metric: float) -> None:
    """One record each up to 20 a second, the rest in one summary a second, all counted."""
    own = [r for r in records if r.get("event") == "deactivate.denied" and r["status"] == 401]
    summaries = [r for r in records if r["event"] == "audit.unauthenticated_suppressed"]
    assert len(own) <= PER_S * (FLOOD_S + 3)
    assert 1 <= len(summaries) <= FLOOD_S + 3
    for summary in summaries:
        assert set(summary) >= {"ts", "seq", "event", "count", "clients", "prev", "hash"}
        assert summary["count"] >= sum(summary["clients"].values()) > 0
        assert 1 <= len(summary["clients"]) <= 10
        assert all(address.startswith("127.") for address in summary["clients"])
    counted = sum(s["count"] for s in summaries)
    # Every keyless request the gateway answered was recorded or counted (a few more may have
    # been handled while their client was already hanging up).
    assert answered <= len(own) + counted <= answered + 2 * CLIENTS
    assert suppressed_metric <= counted
    keyed = [r for r in records if r.get("caller") == KEYED_CALLER]
    assert keyed and all(r["client"] == "127.0.0.1" for r in keyed)
