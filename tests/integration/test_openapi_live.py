"""Live answers of the real gateway (in front of the real sandbox) match the schemas that its
own `GET /openapi.json` documents for that route and status."""

from __future__ import annotations

import json
from typing import Any

from gateway.http.openapi import document
from gateway.sandbox.server import KoreSandbox, SandboxApp
from tests.conftest import BOT, CLIENT_ID, CLIENT_SECRET, OTHER_KEY
from tests.http.test_openapi import documented_schema, schema_errors
from tests.integration.conftest import StartGateway

SIMPLE = "/v1/bots/{botId}/sessions/deactivate"
BATCH = "/v1/sessions/deactivate"
KORE = "/api/public/bot/{botId}/session"


async def served_document(client: Any) -> dict[str, Any]:
    resp = await client.get("/openapi.json")  # no caller key
    assert resp.status == 200 and resp.content_type == "application/json"
    return dict(await resp.json())


async def conforms(doc: dict[str, Any], resp: Any, path: str, method: str,
                   status: int) -> Any:
    """`resp` has `status` and a body valid against the documented schema; returns the body."""
    text = await resp.text()
    assert resp.status == status, text
    media_type = resp.content_type
    body = json.loads(text) if media_type == "application/json" else text
    schema = documented_schema(doc, path, method, status, media_type)
    assert schema_errors(doc, schema, body) == [], (path, status, body)
    request_id = {"$ref": "#/components/schemas/RequestId"}
    assert schema_errors(doc, request_id, resp.headers["X-Request-ID"]) == []
    return body


async def test_served_document_is_the_built_one(gateway: Any, config: Any) -> None:
    assert await served_document(gateway) == document(config)


async def test_probe_answers_match(gateway: Any) -> None:
    doc = await served_document(gateway)
    for path in ("/healthz", "/readyz", "/openapi.json"):
        await conforms(doc, await gateway.get(path), path, "get", 200)
    text = await conforms(doc, await gateway.get("/metrics"), "/metrics", "get", 200)
    assert "kore_gateway_requests_total" in text


async def test_simple_route_answers_match(gateway: Any, sandbox: Any,
                                          auth_headers: dict[str, str]) -> None:
    doc = await served_document(gateway)
    url = f"/v1/bots/{BOT}/sessions/deactivate"

    async def post(status: int, **kwargs: Any) -> Any:
        kwargs.setdefault("headers", auth_headers)
        return await conforms(doc, await gateway.post(url, **kwargs), SIMPLE, "post", status)

    body = await post(200, json={"userId": "u-1", "channel": "rtm"})
    assert body["success"] is True
    await post(200, json={"userId": "u-2"})
    assert (await post(400, json={"userId": ""}))["error"]["code"] == "invalid_request"
    assert (await post(401, json={"userId": "u-1"}, headers={}))["error"]["code"] == \
        "unauthenticated"
    forbidden = await post(403, json={"userId": "u-1"},
                           headers={"Authorization": f"Bearer {OTHER_KEY}"})
    assert forbidden["error"]["code"] == "forbidden"
    await post(413, data=b"{" + b" " * 70_000 + b"}",
               headers={**auth_headers, "Content-Type": "application/json"})
    await post(415, data=b"userId=u-1", headers={**auth_headers, "Content-Type": "text/plain"})
    sandbox.faults.error_status, sandbox.faults.error_rate = 503, 1.0
    assert (await post(502, json={"userId": "u-1"}))["error"]["code"] == "upstream_unavailable"


async def test_upstream_rejection_and_rate_limit_match(
        start_gateway: StartGateway, aiohttp_server: Any,
        auth_headers: dict[str, str]) -> None:
    kore = KoreSandbox([SandboxApp(client_id=CLIENT_ID, key=CLIENT_SECRET)],
                       known_bots=("st-known-*",))
    server = await aiohttp_server(kore.create_app(), host="127.0.0.1")
    client = await start_gateway(base_url=str(server.make_url("")).rstrip("/"),
                                 rate_limit={"windows": [{"calls": 1, "per_s": 3600}]})
    doc = await served_document(client)
    resp = await client.post("/v1/bots/st-unknown/sessions/deactivate", json={"userId": "u-1"},
                             headers=auth_headers)
    assert (await conforms(doc, resp, SIMPLE, "post", 404))["error"]["code"] == \
        "upstream_rejected"
    resp = await client.put("/api/public/bot/st-unknown-2/session", json={"userId": "u-1"},
                            headers=auth_headers)
    await conforms(doc, resp, KORE, "put", 404)  # Kore.ai's own body, passed through
    resp = await client.post("/v1/bots/st-unknown/sessions/deactivate", json={"userId": "u-1"},
                             headers=auth_headers)
    assert (await conforms(doc, resp, SIMPLE, "post", 429))["error"]["code"] == "rate_limited"
    assert int(resp.headers["Retry-After"]) >= 1


async def test_batch_answers_match(gateway: Any, auth_headers: dict[str, str]) -> None:
    doc = await served_document(gateway)
    items = [{"botId": BOT, "userId": "u-1"}, {"botId": "xx-bad", "userId": "u-2"},
             {"botId": BOT}, {"botId": BOT, "userId": "u-3", "channel": "msteams"}]
    resp = await gateway.post("/v1/sessions/deactivate", json={"items": items},
                              headers=auth_headers)
    body = await conforms(doc, resp, BATCH, "post", 200)
    assert [r["success"] for r in body["results"]] == [True, False, False, True]
    assert body["summary"] == {"succeeded": 2, "failed": 2}
    resp = await gateway.post("/v1/sessions/deactivate", json={"items": []},
                              headers=auth_headers)
    await conforms(doc, resp, BATCH, "post", 400)
    resp = await gateway.post("/v1/sessions/deactivate", json={"items": items})
    await conforms(doc, resp, BATCH, "post", 401)


async def test_kore_compatible_answers_match(gateway: Any,
                                             auth_headers: dict[str, str]) -> None:
    doc = await served_document(gateway)
    url = f"/api/public/bot/{BOT}/session"
    resp = await gateway.put(url, json={"userId": "u-1", "status": "inactive"},
                             headers=auth_headers)
    assert await conforms(doc, resp, KORE, "put", 200) == {"success": True}
    resp = await gateway.put(url, json={"userId": "u-1", "status": "active"},
                             headers=auth_headers)
    assert (await conforms(doc, resp, KORE, "put", 400))["error"]["code"] == "invalid_request"


async def test_unknown_route_and_wrong_method_use_the_documented_envelope(
        gateway: Any) -> None:
    doc = await served_document(gateway)
    envelope = {"$ref": "#/components/schemas/Error"}
    for resp, code in [(await gateway.get("/v2/nothing"), "not_found"),
                       (await gateway.delete("/healthz"), "method_not_allowed")]:
        body = await resp.json()
        assert schema_errors(doc, envelope, body) == [] and body["error"]["code"] == code
