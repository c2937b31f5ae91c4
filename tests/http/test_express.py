"""The express lane (`gateway/http/express.py`) against the general path: the same request, byte
for byte, to a gateway with the lane and to one without it, gives the same answer, the same
calls to the sandbox, the same audit records, metrics and access line; the lane serves only
the common case and leaves everything else to aiohttp's router untouched."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.config.model import Config
from gateway.http.app import RUNTIME, create_app
from gateway.http.express import ExpressLane
from tests.conftest import BOT, CALLER_KEY, OTHER_KEY, SETTLE_S, read_records
from tests.integration.sides import raw_http

PATH = f"/v1/bots/{BOT}/sessions/deactivate"
KEY = ("Authorization", f"Bearer {CALLER_KEY}")
JSON = ("Content-Type", "application/json")
BODY = b'{"userId":"u-1","channel":"rtm"}'
# What differs between two servings of one request by design: clocks, and the chain's place.
UNSTABLE = frozenset({"ts", "seq", "prev", "hash", "durationMs", "chain"})

Headers = Sequence[tuple[str, str]]


class Served:
    """One gateway (with or without the lane) on a loopback port, and what it left behind."""

    def __init__(self, config: Config, server: TestServer, app: web.Application) -> None:
        self.config, self.server, self.app = config, server, app

    @property
    def lane(self) -> ExpressLane | None:
        handle = self.app.__dict__.get("_handle")
        return handle if isinstance(handle, ExpressLane) else None

    def records(self) -> list[dict[str, Any]]:
        return [{k: v for k, v in r.items() if k not in UNSTABLE}
                for r in read_records(Path(self.config.audit.path), settle_s=SETTLE_S)
                if r.get("event", "").startswith("deactivate.")]

    def counted(self) -> dict[tuple[str, ...], float]:
        return dict(self.app[RUNTIME].metrics._requests.counts)


@pytest.fixture
async def both(make_config: Any, sandbox: Any, aiohttp_server: Any, tmp_path: Path
               ) -> tuple[Served, Served]:
    """The same settings twice (each its own audit file): with the lane, and without it."""
    sides = []
    for name in ("lane", "general"):
        config = make_config(sandbox.url, audit={"path": str(tmp_path / name / "audit.jsonl")})
        app = create_app(config)
        if name == "general":
            del app._handle  # aiohttp's own: the router, the middleware, the handlers
        server = await aiohttp_server(app, host="127.0.0.1")
        sides.append(Served(config, server, app))
    assert sides[0].lane is not None and sides[1].lane is None
    return sides[0], sides[1]


async def serve(side: Served, sandbox: Any, method: str, target: str, headers: Headers,
                body: bytes, *, length: bool = True, faults: dict[str, Any] | None = None
                ) -> dict[str, Any]:
    """What one request left: the answer, the sandbox's calls, records, counts, access line."""
    sandbox.calls.clear()
    for name, value in (faults or {}).items():
        setattr(sandbox.faults, name, value)
    with structlog.testing.capture_logs() as logs:
        assert side.server.port is not None
        answer = await raw_http(side.server.port, method, target, headers, body,
                                content_length=length)
    for name in faults or {}:  # back to "no fault" for the other side
        setattr(sandbox.faults, name, type(sandbox.faults)().__dict__[name])
    lines = [{k: v for k, v in line.items() if k not in ("duration_ms", "timestamp")}
             for line in logs if line.get("event") == "request"]
    return {
        "status": answer.status,
        "headers": {k.lower(): v for k, v in answer.headers.items()
                    if k.lower() in ("content-type", "x-request-id", "retry-after",
                                     "www-authenticate", "allow", "connection")},
        "body": answer.body,
        "calls": [(c.method, c.path, c.body, c.headers.get("X-Request-ID")) for c in sandbox.calls],
        "records": side.records(),
        "counted": side.counted(),
        "access": lines,
    }


async def compare(both: tuple[Served, Served], sandbox: Any, method: str, target: str,
                  headers: Headers, body: bytes, **kwargs: Any) -> dict[str, Any]:
    lane, general = both
    served_before = lane.lane.served if lane.lane else 0
    one = await serve(lane, sandbox, method, target, headers, body, **kwargs)
    two = await serve(general, sandbox, method, target, headers, body, **kwargs)
    assert one == two
    one["lane_served"] = (lane.lane.served if lane.lane else 0) - served_before
    return one


RID = ("X-Request-ID", "rid-express-1")

COMMON = [
    pytest.param([KEY, JSON, RID], BODY, id="with-channel"),
    pytest.param([KEY, JSON, RID], b'{"userId":"u-2"}', id="without-channel"),
    pytest.param([KEY, JSON], BODY, id="no-request-id-given"),
    pytest.param([KEY, JSON, RID, ("X-Forwarded-For", "10.1.2.3")], BODY, id="forwarded-for"),
]


class TestTheCommonCase:
    @pytest.mark.parametrize(("headers", "body"), COMMON)
    async def test_served_by_the_lane_as_the_general_path_serves_it(
            self, both: tuple[Served, Served], sandbox: Any, headers: Headers,
            body: bytes) -> None:
        if ("X-Request-ID", "rid-express-1") not in headers:
            # A request ID made up by the gateway differs between the two: compare the rest.
            lane, general = both
            one = await serve(lane, sandbox, "POST", PATH, headers, body)
            two = await serve(general, sandbox, "POST", PATH, headers, body)
            rid_one, rid_two = one["headers"].pop("x-request-id"), two["headers"].pop(
                "x-request-id")
            assert json.loads(one.pop("body"))["requestId"] == rid_one
            assert json.loads(two.pop("body"))["requestId"] == rid_two
            for side, rid in ((one, rid_one), (two, rid_two)):
                for record in side["records"]:
                    assert record.pop("requestId") == rid
                assert [call[3] for call in side["calls"]] == [rid]
                side["calls"] = [call[:3] for call in side["calls"]]
            assert one == two
            assert one["status"] == 200
            return
        seen = await compare(both, sandbox, "POST", PATH, headers, body)
        assert seen["status"] == 200
        assert json.loads(seen["body"])["success"] is True
        assert seen["lane_served"] == 1
        assert [r["event"] for r in seen["records"]] == ["deactivate.requested",
                                                        "deactivate.completed"]
        assert len(seen["access"]) == 1 and seen["access"][0]["status"] == 200


UPSTREAM = [
    pytest.param({"fail_first": 1, "error_status": 503}, 200, id="503-then-retried"),
    pytest.param({"error_rate": 1.0, "error_status": 500}, 502, id="500-every-time"),
    pytest.param({"fail_first": 1, "error_status": 400}, 400, id="kore-rejects-400"),
    pytest.param({"rate_429": 1.0, "retry_after_s": 1.0}, 429, id="kore-rate-limited"),
    pytest.param({"reject_token_next": 2}, 502, id="token-refused-twice"),
    pytest.param({"odd_success": "empty"}, 502, id="empty-200"),
]


class TestOutcomesAfterTheLaneTookTheRequest:
    @pytest.mark.parametrize(("faults", "status"), UPSTREAM)
    async def test_every_upstream_outcome_is_the_general_paths(
            self, both: tuple[Served, Served], sandbox: Any, faults: dict[str, Any],
            status: int) -> None:
        seen = await compare(both, sandbox, "POST", PATH, [KEY, JSON, RID], BODY,
                             faults=faults)
        assert seen["lane_served"] == 1
        assert seen["status"] == status, seen["body"]
        assert seen["records"][-1]["event"] == "deactivate.completed"

    async def test_a_draining_gateway_sheds_by_the_general_path(
            self, both: tuple[Served, Served], sandbox: Any) -> None:
        for side in both:
            side.app[RUNTIME].draining = True
        seen = await compare(both, sandbox, "POST", PATH, [KEY, JSON, RID], BODY)
        assert seen["status"] == 503 and seen["lane_served"] == 0


OTHERS = [
    pytest.param("POST", PATH, [JSON, RID], BODY, id="no-key"),
    pytest.param("POST", PATH, [("Authorization", "Bearer nope"), JSON, RID], BODY,
                 id="wrong-key"),
    pytest.param("POST", PATH, [KEY, KEY, JSON, RID], BODY, id="two-keys"),
    pytest.param("POST", PATH, [("Authorization", f"Bearer {OTHER_KEY}"), JSON, RID], BODY,
                 id="bot-not-allowed"),
    pytest.param("POST", PATH, [KEY, ("Content-Type", "text/plain"), RID], BODY,
                 id="not-json"),
    pytest.param("POST", PATH, [KEY, ("Content-Type", "application/json; charset=utf-8"), RID],
                 BODY, id="charset-given"),
    pytest.param("POST", PATH, [KEY, ("Content-Type", "application/json; charset=latin-1"),
                                RID], BODY, id="charset-latin-1"),
    pytest.param("POST", PATH, [KEY, JSON, RID, ("Content-Encoding", "gzip")], BODY,
                 id="content-encoding"),
    pytest.param("POST", PATH, [KEY, JSON, RID, ("Expect", "100-continue")], BODY,
                 id="expect"),
    pytest.param("POST", PATH, [KEY, JSON, RID], b'{"userId":"u-1","extra":1}',
                 id="extra-key"),
    pytest.param("POST", PATH, [KEY, JSON, RID], b'{"userId":""}', id="empty-user"),
    pytest.param("POST", PATH, [KEY, JSON, RID], b'{"userId":"u-1","channel":null}',
                 id="channel-null"),
    pytest.param("POST", PATH, [KEY, JSON, RID], b'{"userId":"u-1",', id="broken-json"),
    pytest.param("POST", PATH, [KEY, JSON, RID], b'["u-1"]', id="not-an-object"),
    pytest.param("POST", PATH, [KEY, JSON, RID], b"x" * 70_000, id="too-large"),
    pytest.param("POST", PATH + "?x=1", [KEY, JSON, RID], BODY, id="query-string"),
    pytest.param("POST", "/v1/bots/st-%41/sessions/deactivate", [KEY, JSON, RID], BODY,
                 id="percent-encoded-bot"),
    pytest.param("POST", "/v1/bots/./sessions/deactivate", [KEY, JSON, RID], BODY,
                 id="dot-segment"),
    pytest.param("POST", "/v1/bots/st-a:b@c/sessions/deactivate", [KEY, JSON, RID], BODY,
                 id="bot-the-pattern-refuses"),
    pytest.param("POST", PATH + "/", [KEY, JSON, RID], BODY, id="trailing-slash"),
    pytest.param("PUT", PATH, [KEY, JSON, RID], BODY, id="other-method"),
    pytest.param("GET", PATH, [KEY, RID], b"", id="get"),
    pytest.param("POST", "/v1/sessions/deactivate", [KEY, JSON, RID],
                 b'{"items":[{"botId":"st-test-bot","userId":"u-1"}]}', id="batch-route"),
    pytest.param("PUT", f"/api/public/bot/{BOT}/session", [KEY, JSON, RID],
                 b'{"userId":"u-1","status":"inactive"}', id="kore-route"),
]


class TestEverythingElseTakesTheGeneralPath:
    @pytest.mark.parametrize(("method", "target", "headers", "body"), OTHERS)
    async def test_untouched_by_the_lane(self, both: tuple[Served, Served], sandbox: Any,
                                         method: str, target: str, headers: Headers,
                                         body: bytes) -> None:
        seen = await compare(both, sandbox, method, target, headers, body)
        assert seen["lane_served"] == 0
        assert seen["headers"].get("x-request-id") == "rid-express-1"

    async def test_a_chunked_body_takes_the_general_path(
            self, both: tuple[Served, Served], sandbox: Any) -> None:
        chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(BODY), BODY)
        seen = await compare(both, sandbox, "POST", PATH,
                             [KEY, JSON, RID, ("Transfer-Encoding", "chunked")], chunked,
                             length=False)
        assert seen["lane_served"] == 0 and seen["status"] == 200
