"""The whole path once: caller → gateway → sandbox, audited."""

from typing import Any


async def test_deactivate_reaches_kore_and_is_audited(gateway: Any, sandbox: Any,
                                                      auth_headers: dict[str, str],
                                                      audit_records: Any) -> None:
    resp = await gateway.post("/v1/bots/st-test-bot/sessions/deactivate",
                              json={"userId": "u-1", "channel": "rtm"}, headers=auth_headers)
    body = await resp.json()
    assert resp.status == 200, body
    assert body == {"success": True, "botId": "st-test-bot", "userId": "u-1", "channel": "rtm",
                    "requestId": resp.headers["X-Request-ID"]}
    [call] = sandbox.calls
    assert call.path == "/api/public/bot/st-test-bot/session"
    assert call.claims["appId"] == "cs-test-app"
    assert call.body == {"userId": "u-1", "status": "inactive", "channel": "rtm"}
    assert [r["event"] for r in audit_records()] == ["deactivate.requested",
                                                    "deactivate.completed"]
