"""`benchmarks.without`: the gateway with parts of its request path removed, as
`python -m benchmarks.instructions --without` counts it (a price, not a way to run it)."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

import aiohttp
import pytest

from benchmarks import peers, stubs, without
from benchmarks.instructions import gateway_argv, report
from benchmarks.procs import start, wait_status
from benchmarks.without import PARTS, label, remove
from gateway.audit.log import AuditLog

ALL = ",".join(PARTS)


def test_an_unknown_part_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"unknown part\(s\) nope; known: access-line"):
        remove(["nope"])


@pytest.fixture
def undone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Parts removed in this test only: each replacement is undone after it."""
    def replace(owner: object, **attributes: object) -> None:
        for name, value in attributes.items():
            monkeypatch.setattr(owner, name, value)

    monkeypatch.setattr(without, "_replace", replace)


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.usefixtures("undone")
async def test_without_the_terminal_records_wait_the_record_comes_after_the_answer(
        tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    log.open()
    await log.append({"event": "deactivate.requested"})
    remove(["terminal-record-wait"])
    record = await log.append({"event": "deactivate.completed"}, durable=False)
    assert record["event"] == "deactivate.completed"
    assert len(_lines(log.path)) == 1  # not in the file when the caller has it
    await log.close()
    assert len(_lines(log.path)) == 2  # written (and fsynced) by the log's thread


@pytest.mark.usefixtures("undone")
async def test_without_the_path_look_a_removed_file_is_not_followed(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    log.open()
    await log.append({"event": "deactivate.requested"})
    remove(["audit-path-look"])
    log.path.unlink()
    await log.append({"event": "deactivate.requested"})
    assert not log.path.exists()  # the record went into the removed file: nobody looked
    await log.close()


async def test_as_it_ships_the_log_follows_the_path_and_writes_before_the_answer(
        tmp_path: Path) -> None:
    """The control (and proof that the tests above put both parts back)."""
    log = AuditLog(tmp_path / "audit.jsonl")
    log.open()
    await log.append({"event": "deactivate.requested"})
    log.path.unlink()
    await log.append({"event": "deactivate.requested"})
    assert len(_lines(log.path)) == 1  # the path was looked at: a new file
    await log.append({"event": "deactivate.completed"}, durable=False)
    assert len(_lines(log.path)) == 2  # in the file when the caller has it
    await log.close()


def test_the_runner_is_chosen_by_the_parts() -> None:
    config = Path("/x/gateway.toml")
    assert gateway_argv(config)[1:3] == ["-m", "gateway"]
    assert gateway_argv(config, "metrics,breaker")[1:4] == ["-m", "benchmarks.without",
                                                           "metrics,breaker"]
    assert label("metrics,breaker") == "without metrics + breaker"


def test_a_run_without_parts_is_priced_against_the_gateway() -> None:
    from argparse import Namespace

    from benchmarks.instructions import Count

    counts = [Count("aiohttp floor", 10, 7_000_000), Count("gateway", 10, 10_000_000),
              Count(label("access-line,breaker"), 10, 9_500_000)]
    text = report(counts, Namespace(requests=10, concurrency=8, warmup=0))
    assert ("| without access-line + breaker | 950,000 | 1.36 | 50,000 (the access line (none "
            "written); the circuit breaker (always closed)) |") in text


async def _deactivate(url: str, key: str, count: int) -> list[int]:
    headers = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession() as session:
        statuses = []
        for number in range(count):
            async with session.post(f"{url}/v1/bots/{peers.BOT}/sessions/deactivate",
                                    json={"userId": f"u-{number}", "channel": "rtm"},
                                    headers=headers) as resp:
                statuses.append(resp.status)
        async with session.get(f"{url}/metrics") as resp:
            metrics = await resp.text()
    counted = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                  if line.startswith("kore_gateway_requests_total{") and "/deactivate" in line)
    return [*statuses, int(counted)]


@pytest.mark.parametrize(("parts", "seen"), [("", 3), (ALL, 0)], ids=["control", "without-all"])
def test_the_gateway_without_every_part_still_deactivates_and_leaves_them_out(
        tmp_path: Path, parts: str, seen: int) -> None:
    """Real sandbox, real gateway (one in-process worker): every deactivation succeeds and is
    audited, and what was removed is visibly gone: no access line, no request counted (the
    control, the gateway as it ships, has both)."""
    creds = peers.Credentials("cs-without", secrets.token_urlsafe(32),
                              "kgw_" + secrets.token_hex(16))
    stub = stubs.start_stub("sandbox", tmp_path / "stub", creds.client_id, creds.secret)
    config = peers.gateway_config(tmp_path / "gw", stub.url, creds)
    server = start("gateway", gateway_argv(config, parts), peers.listen_url(config),
                   tmp_path / "gateway.log")
    try:
        async def scenario() -> list[int]:
            await wait_status(stub, "/healthz", 20)
            await wait_status(server, "/readyz", 20)
            return await _deactivate(server.url, creds.caller_key, 3)

        *statuses, counted = asyncio.run(scenario())
    finally:
        server.stop()
        stub.stop()
    assert statuses == [200, 200, 200]
    assert counted == seen  # metrics: the requests counted
    lines = peers.gateway_log_events(tmp_path / "gateway.log", "request")  # access lines
    assert len([line for line in lines if line["method"] == "POST"]) == seen
    audit = "\n".join(path.read_text() for path in (tmp_path / "gw").rglob("*.jsonl"))
    assert audit.count('"deactivate.completed"') == 3  # the audit is not a removable part
