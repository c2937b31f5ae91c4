"""The contract minimum (`floor.py --contract-minimum`): the floor plus every per-request duty
of the contract, against the real sandbox as its upstream (which checks the JWT and the body
and records each call). Its audit file must be a chain the project's own verifier accepts."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest

from benchmarks import peers, stubs
from benchmarks.procs import Server, wait_status
from gateway.audit.chain import verify_files

CLIENT_ID = "cs-floor-minimum"
SECRET = "floor-minimum-secret-for-the-sandbox-0123456789"
CALLER_KEY = "kgw_floor_minimum_caller_key"
START_TIMEOUT_S = 20.0
PATH = f"/v1/bots/{peers.BOT}/sessions/deactivate"


@dataclass
class Stack:
    stub: Server
    floor: Server
    audit_dir: Path


@pytest.fixture(params=[False, True], ids=["minimum", "kept-behaviours"])
def kept(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.fixture
async def stack(tmp_path: Path, kept: bool) -> AsyncIterator[Stack]:
    now = int(time.time())
    token = jwt.encode({"appId": CLIENT_ID, "sub": "floor-minimum", "iat": now,
                        "exp": now + 3600}, SECRET, algorithm="HS256")
    stub = stubs.start_stub("sandbox", tmp_path / "stub", CLIENT_ID, SECRET)
    servers = [stub]
    try:
        await wait_status(stub, "/healthz", START_TIMEOUT_S)
        floor = peers.start_floor(tmp_path / "floor", 1, stub.url, token,
                                  contract_minimum=True, caller_key=CALLER_KEY, kept=kept)
        servers.append(floor)
        assert floor.name == ("floor_minimum_kept" if kept else "floor_minimum")
        await wait_status(floor, "/healthz", START_TIMEOUT_S)
        yield Stack(stub, floor, tmp_path / "floor" / "audit")
    finally:
        for server in reversed(servers):
            server.stop()


async def _post(session: aiohttp.ClientSession, url: str, key: str,
                request_id: str | None = None) -> tuple[int, dict[str, Any], Any]:
    headers = {"Authorization": f"Bearer {key}"}
    if request_id is not None:
        headers["X-Request-ID"] = request_id
    async with session.post(url + PATH, json={"userId": "u-1001", "channel": "rtm"},
                            headers=headers) as resp:
        return resp.status, dict(resp.headers), await resp.json()


async def test_deactivations_are_audited_in_a_verifiable_chain(stack: Stack) -> None:
    async with aiohttp.ClientSession() as session:
        answers = [await _post(session, stack.floor.url, CALLER_KEY, "given-id.1"),
                   await _post(session, stack.floor.url, CALLER_KEY),
                   await _post(session, stack.floor.url, CALLER_KEY, "not a valid id")]
        denied = await _post(session, stack.floor.url, "kgw_wrong_key")
        async with session.get(stack.stub.url + "/__sandbox/calls") as resp:
            calls = await resp.json()

    ids = []
    for status, headers, body in answers:
        assert status == 200, body
        assert body == {"success": True, "botId": peers.BOT, "userId": "u-1001",
                        "channel": "rtm", "requestId": headers["X-Request-ID"]}
        ids.append(headers["X-Request-ID"])
    assert ids[0] == "given-id.1"  # a valid request ID is kept, an invalid one replaced
    assert len(ids[2]) == 32 and ids[2] != "not a valid id" and len(set(ids)) == 3
    status, headers, body = denied
    assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
    assert body == {"error": {"code": "unauthenticated", "message": body["error"]["message"],
                              "requestId": headers["X-Request-ID"]}}

    # Upstream: one PUT each (the sandbox checked the JWT and the body), with the request ID.
    assert [c["status"] for c in calls] == [200, 200, 200]
    assert [c["headers"]["x-request-id"] for c in calls] == ids
    assert all(c["body"] == {"userId": "u-1001", "status": "inactive", "channel": "rtm"}
               for c in calls)

    assert stack.floor.stop() == 0  # the terminal records are written by then
    files = sorted(stack.audit_dir.glob("audit-*.jsonl"))
    assert len(files) == 1  # one worker, one file
    report = verify_files(files)
    assert report.ok and report.records == 6, report
    records = [json.loads(line) for line in files[0].read_bytes().splitlines()]
    assert [r["seq"] for r in records] == [1, 2, 3, 4, 5, 6]
    for request_id in ids:  # each requested record precedes its completed one
        events = [(i, r["event"]) for i, r in enumerate(records) if r["requestId"] == request_id]
        assert [e for _, e in events] == ["deactivate.requested", "deactivate.completed"]
        completed = records[events[1][0]]
        assert {k: completed[k] for k in ("outcome", "status", "upstreamStatus", "attempts",
                                          "error", "caller", "botId", "userId", "channel",
                                          "app", "route", "client")} == {
            "outcome": "success", "status": 200, "upstreamStatus": 200, "attempts": 1,
            "error": None, "caller": "bench-caller", "botId": peers.BOT, "userId": "u-1001",
            "channel": "rtm", "app": "bench",
            "route": "POST /v1/bots/{botId}/sessions/deactivate", "client": "127.0.0.1"}
        assert completed["durationMs"] > 0

    # One access line a request, the refused one too.
    lines = [json.loads(line) for line in stack.floor.log.read_text().splitlines()
             if line.startswith('{"event":"request"')]
    assert [(a["status"], a["caller"], a["request_id"]) for a in lines] == [
        (200, "bench-caller", ids[0]), (200, "bench-caller", ids[1]),
        (200, "bench-caller", ids[2]), (401, None, headers["X-Request-ID"])]


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


@pytest.mark.parametrize("kept", [True], ids=["kept-behaviours"])
async def test_kept_behaviours_terminal_record_before_the_answer_and_a_moved_file_followed(
        stack: Stack) -> None:
    """`--kept-behaviours`: each answer finds its `completed` record already in the file (the
    event loop wrote it: the log's thread was idle), and a file moved away is left for a new one
    at the path before the next write; the moved file and the new one verify as one chain."""
    async with aiohttp.ClientSession() as session:
        (path,) = stack.audit_dir.glob("audit-*.jsonl")
        for request_id in ("kept-1", "kept-2"):
            status, _, body = await _post(session, stack.floor.url, CALLER_KEY, request_id)
            assert status == 200, body
            mine = [r["event"] for r in _records(path) if r["requestId"] == request_id]
            assert mine == ["deactivate.requested", "deactivate.completed"]
        moved = path.with_name("moved.jsonl")
        path.rename(moved)
        status, _, body = await _post(session, stack.floor.url, CALLER_KEY, "kept-3")
        assert status == 200, body
        assert [r["requestId"] for r in _records(path)] == ["kept-3", "kept-3"]  # a new file
    assert stack.floor.stop() == 0
    assert [r["seq"] for r in _records(moved)] == [1, 2, 3, 4]
    report = verify_files([moved, path])
    assert report.ok and report.records == 6, report


def test_kept_behaviours_need_the_contract_minimum(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="contract minimum"):
        peers.start_floor(tmp_path, 1, "http://127.0.0.1:9", "token", kept=True)
