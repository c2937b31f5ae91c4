"""The gateway's JWTs against the sandbox's emulation of Kore.ai's jti checks: the 1-hour `exp`
cap read on Kore.ai's clock, and replay refusal, over real HTTP and in the audit."""

from __future__ import annotations

import time
from typing import Any

from tests.conftest import BOT, CALLER_KEY, CLIENT_ID, CLIENT_SECRET
from tests.integration.sides import (
    AuditTrail,
    completed,
    expect_error,
    expect_upstream_call,
    request_id,
    requested,
)

URL = f"/v1/bots/{BOT}/sessions/deactivate"
AUTH = {"Authorization": f"Bearer {CALLER_KEY}"}
EXP_TOO_FAR = 'error verifying the jwt: if "jti" claim "exp" must be <= 1 hour(s)'


def jti_app(**settings: Any) -> list[dict[str, Any]]:
    return [{"name": "sessions", "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET,
             "jti": True, "bots": ["st-*"], **settings}]


def clock_behind(seconds: float) -> Any:
    return lambda: time.time() - seconds


async def test_a_ttl_at_the_cap_fails_against_a_kore_clock_a_little_behind(
        make_sandbox: Any, start_gateway: Any, audit: AuditTrail) -> None:
    """Why `token_ttl_s` near 3600 is warned about: 5 s of skew refuse every token."""
    sandbox = await make_sandbox(clock=clock_behind(5))
    gateway = await start_gateway(base_url=sandbox.url, apps=jti_app(token_ttl_s=3600))
    resp = await gateway.post(URL, json={"userId": "u-1"}, headers=AUTH)
    error = await expect_error(resp, 502, "upstream_auth_failed", names=EXP_TOO_FAR)
    rid = error["requestId"]
    assert [c.status for c in sandbox.calls] == [401, 401]  # the first try and one re-mint
    audit.expect(requested(rid),
                 completed(rid, outcome="failed", status=502, upstream_status=401,
                           attempts=2, error="upstream_auth_failed"))


async def test_the_default_jti_ttl_survives_the_same_skew(
        make_sandbox: Any, start_gateway: Any, audit: AuditTrail) -> None:
    sandbox = await make_sandbox(clock=clock_behind(5))
    gateway = await start_gateway(base_url=sandbox.url, apps=jti_app())
    resp = await gateway.post(URL, json={"userId": "u-1"}, headers=AUTH)
    assert resp.status == 200, await resp.text()
    rid = request_id(resp)
    [call] = sandbox.calls
    claims = expect_upstream_call(call, bot_id=BOT, user_id="u-1", request_id=rid, ttl_s=120)
    assert claims["jti"]
    audit.expect(requested(rid), completed(rid, outcome="success", status=200,
                                           upstream_status=200, attempts=1))


async def test_every_call_of_a_jti_app_passes_kores_replay_check(
        make_sandbox: Any, start_gateway: Any) -> None:
    sandbox = await make_sandbox(enforce_jti=True)
    gateway = await start_gateway(base_url=sandbox.url, apps=jti_app())
    for i in range(5):
        resp = await gateway.post(URL, json={"userId": f"u-{i}"}, headers=AUTH)
        assert resp.status == 200, await resp.text()
    jtis = {c.claims["jti"] for c in sandbox.calls}
    assert len(jtis) == len(sandbox.calls) == 5


async def test_a_replayed_token_is_refused_with_kores_message(
        make_sandbox: Any, start_gateway: Any, session: Any) -> None:
    """The very token the gateway sent once is refused a second time, as Kore.ai does."""
    sandbox = await make_sandbox()
    gateway = await start_gateway(base_url=sandbox.url, apps=jti_app())
    assert (await gateway.post(URL, json={"userId": "u-1"}, headers=AUTH)).status == 200
    [call] = sandbox.calls
    async with session.put(f"{sandbox.url}/api/public/bot/{BOT}/session",
                           json={"userId": "u-1"}, headers={"auth": call.headers["auth"]}
                           ) as again:
        assert again.status == 401
        assert await again.json() == {"errors": [{
            "msg": "error verifying the jwt: possibly a replay", "code": 401}]}
