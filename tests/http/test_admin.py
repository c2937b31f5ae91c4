"""The admin application of `server.admin_listen`: probes, metrics and the OpenAPI document on a
second address, nothing else, and /metrics leaves the API address (in-process, real sockets)."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from gateway.config.model import Config
from gateway.http.app import RUNTIME, create_admin_app, create_app
from tests.conftest import BOT, CALLER_KEY, ConfigFactory, Sandbox

OPERATIONS = ("/healthz", "/readyz", "/metrics", "/openapi.json")
DEACTIVATIONS = [
    ("POST", f"/v1/bots/{BOT}/sessions/deactivate", {"userId": "u-1"}),
    ("POST", "/v1/sessions/deactivate", {"items": [{"botId": BOT, "userId": "u-1"}]}),
    ("PUT", f"/api/public/bot/{BOT}/session", {"userId": "u-1"}),
]
AUTH = {"Authorization": f"Bearer {CALLER_KEY}"}


@pytest.fixture
def admin_config(make_config: ConfigFactory, sandbox: Sandbox) -> Config:
    return make_config(sandbox.url, server={"admin_listen": "127.0.0.1:0"})


@pytest.fixture
async def api(aiohttp_client: Any, admin_config: Config) -> TestClient:
    return await aiohttp_client(create_app(admin_config), server_kwargs={"host": "127.0.0.1"})


@pytest.fixture
async def admin(aiohttp_client: Any, api: TestClient) -> TestClient:
    """The admin app on its own loopback port, sharing the API app's runtime."""
    return await aiohttp_client(create_admin_app(api.server.app[RUNTIME]),
                                server_kwargs={"host": "127.0.0.1"})


class TestAdminApp:
    async def test_operations_routes_answer_without_a_key(self, admin: TestClient) -> None:
        for path in OPERATIONS:
            resp = await admin.get(path, headers={"Authorization": "Bearer not-a-key"})
            assert resp.status == 200, (path, await resp.text())
            assert "X-Request-ID" in resp.headers

    @pytest.mark.parametrize(("method", "path", "body"), DEACTIVATIONS,
                             ids=["simple", "batch", "kore"])
    async def test_no_deactivation_route(self, admin: TestClient, sandbox: Sandbox,
                                         method: str, path: str, body: Any) -> None:
        resp = await admin.request(method, path, json=body, headers=AUTH)
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "not_found"
        assert sandbox.calls == []

    async def test_metrics_count_the_api_traffic(self, api: TestClient,
                                                 admin: TestClient) -> None:
        resp = await api.post(f"/v1/bots/{BOT}/sessions/deactivate", json={"userId": "u-1"},
                              headers=AUTH)
        assert resp.status == 200
        text = await (await admin.get("/metrics")).text()
        assert ('kore_gateway_requests_total{caller="crm-service",'
                'route="/v1/bots/{botId}/sessions/deactivate",status="200"} 1.0') in text

    async def test_readiness_is_the_runtimes(self, api: TestClient, admin: TestClient) -> None:
        """Draining shows on both addresses at once: they share one runtime."""
        api.server.app[RUNTIME].draining = True
        for client in (api, admin):
            resp = await client.get("/readyz")
            assert resp.status == 503
            assert (await resp.json())["checks"]["draining"] is True


class TestApiAppWithAdminListener:
    async def test_metrics_are_not_served_on_the_api_address(self, api: TestClient) -> None:
        resp = await api.get("/metrics")
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "not_found"

    @pytest.mark.parametrize("path", ["/healthz", "/readyz", "/openapi.json"])
    async def test_probes_and_document_stay_on_the_api_address(self, api: TestClient,
                                                               path: str) -> None:
        assert (await api.get(path)).status == 200

    async def test_deactivations_stay_on_the_api_address(self, api: TestClient) -> None:
        resp = await api.post(f"/v1/bots/{BOT}/sessions/deactivate", json={"userId": "u-1"},
                              headers=AUTH)
        assert resp.status == 200

    async def test_without_admin_listener_metrics_stay(self, gateway: TestClient) -> None:
        assert (await gateway.get("/metrics")).status == 200
