"""Who knocked and what was asked (issue 11, finding 10; contract §3 additions): `client` in
every record, X-Forwarded-For believed only from trusted proxies, a 403 keeps the userId and
channel, and keyless requests are audited one by one up to a budget, then summed."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from gateway.audit.log import hash_user_id
from gateway.deactivation import ROUTE_SIMPLE, Ask
from gateway.errors import Unauthenticated
from gateway.http.app import RUNTIME, create_app
from tests.conftest import BOT, OTHER_KEY, read_records

URL = f"/v1/bots/{BOT}/sessions/deactivate"
KORE_URL = f"/api/public/bot/{BOT}/session"
NARROW = {"Authorization": f"Bearer {OTHER_KEY}"}


def audit_of(gateway: Any) -> list[dict[str, Any]]:
    return read_records(Path(gateway.server.app[RUNTIME].config.audit.path))


async def records_after(gateway: Any, *calls: Any) -> list[dict[str, Any]]:
    for call in calls:
        async with call as resp:
            await resp.read()
    return audit_of(gateway)


class TestClient:
    async def test_every_record_names_the_peer(self, gateway_for: Any, make_config: Any,
                                               sandbox: Any, auth_headers: dict[str, str]
                                               ) -> None:
        gw = await gateway_for(make_config(sandbox.url))
        records = await records_after(
            gw,
            gw.post(URL, json={"userId": "u-ok"}, headers=auth_headers),
            gw.post(URL, json={"userId": "u-keyless"}),
            gw.post(URL, json={"userId": "u-forbidden"}, headers=NARROW),
            gw.post(URL, json={"userId": ""}, headers=auth_headers),
            gw.put(KORE_URL, json={"userId": "u-kore"}, headers=auth_headers),
            gw.post("/v1/sessions/deactivate", headers=auth_headers,
                    json={"items": [{"botId": BOT, "userId": "u-b"}, {"botId": "x"}]}),
            gw.post("/v1/sessions/deactivate", headers=auth_headers, data=b"not json"),
        )
        assert len(records) == 11
        assert all(record["client"] == "127.0.0.1" for record in records), records

    @pytest.mark.parametrize(("trusted", "forwarded", "client"), [
        pytest.param([], ["203.0.113.9"], "127.0.0.1", id="peer-not-trusted"),
        pytest.param(["10.0.0.0/8"], ["203.0.113.9"], "127.0.0.1", id="other-network-trusted"),
        pytest.param(["127.0.0.1/32"], ["203.0.113.9"], "203.0.113.9", id="trusted-peer"),
        pytest.param(["127.0.0.0/8"], ["198.51.100.7, 203.0.113.9"], "203.0.113.9",
                     id="right-most-untrusted"),
        pytest.param(["127.0.0.0/8", "10.0.0.0/8"], ["203.0.113.9, 10.1.2.3"], "203.0.113.9",
                     id="trusted-hops-skipped"),
        pytest.param(["127.0.0.0/8"], ["198.51.100.7", "203.0.113.9"], "203.0.113.9",
                     id="two-headers-read-as-one-list"),
        pytest.param(["127.0.0.0/8"], ["203.0.113.9, not-an-address"], "127.0.0.1",
                     id="garbage-stops-at-the-last-trusted-hop"),
        pytest.param(["127.0.0.0/8"], ["[2001:db8::1]:443"], "2001:db8::1", id="ipv6-port"),
        pytest.param(["127.0.0.0/8"], [], "127.0.0.1", id="no-header"),
    ])
    async def test_x_forwarded_for_only_from_trusted_proxies(
            self, gateway_for: Any, make_config: Any, sandbox: Any,
            auth_headers: dict[str, str], trusted: list[str], forwarded: list[str],
            client: str) -> None:
        gw = await gateway_for(make_config(sandbox.url, server={"trusted_proxies": trusted}))
        headers = [*auth_headers.items(), *(("X-Forwarded-For", f) for f in forwarded)]
        [requested, completed] = await records_after(
            gw, gw.post(URL, json={"userId": "u-1"}, headers=headers))
        assert requested["client"] == completed["client"] == client


class TestRefusalKeepsWhatWasAsked:
    @pytest.mark.parametrize("kore_route", [False, True], ids=["simplified", "kore"])
    async def test_forbidden_record_keeps_user_id_and_channel(
            self, gateway_for: Any, make_config: Any, sandbox: Any, kore_route: bool) -> None:
        gw = await gateway_for(make_config(sandbox.url))
        body = {"userId": "u-asked", "channel": "ivrVoice"}
        call = gw.put(KORE_URL, json=body, headers=NARROW) if kore_route else gw.post(
            URL, json=body, headers=NARROW)
        [record] = await records_after(gw, call)
        assert {k: record[k] for k in ("event", "status", "error", "caller", "userId",
                                       "channel")} == {
            "event": "deactivate.denied", "status": 403, "error": "forbidden",
            "caller": "narrow-service", "userId": "u-asked", "channel": "ivrVoice"}

    async def test_forbidden_record_keeps_the_hash_when_user_ids_are_hashed(
            self, gateway_for: Any, make_config: Any, sandbox: Any) -> None:
        gw = await gateway_for(make_config(sandbox.url, audit={"hash_user_ids": True}))
        [record] = await records_after(
            gw, gw.post(URL, json={"userId": "u-asked"}, headers=NARROW))
        assert record["userIdHash"] == hash_user_id("u-asked") and "userId" not in record

    async def test_invalid_bot_record_keeps_the_user_id(
            self, gateway_for: Any, make_config: Any, sandbox: Any,
            auth_headers: dict[str, str]) -> None:
        gw = await gateway_for(make_config(sandbox.url))
        [record] = await records_after(gw, gw.post(
            "/v1/bots/not-a-bot/sessions/deactivate", json={"userId": "u-asked"},
            headers=auth_headers))
        assert (record["status"], record["userId"]) == (400, "u-asked")


def keyless_summary(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]],
                                                            list[dict[str, Any]]]:
    own = [r for r in records if r["event"] == "deactivate.denied" and r["status"] == 401]
    return own, [r for r in records if r["event"] == "audit.unauthenticated_suppressed"]


class TestKeylessAudit:
    async def test_beyond_the_budget_keyless_requests_are_summed_by_address(
            self, gateway_for: Any, make_config: Any, sandbox: Any) -> None:
        gw = await gateway_for(make_config(sandbox.url,
                                           audit={"max_unauthenticated_per_s": 3}))
        for n in range(12):
            headers = {} if n % 2 else {"Authorization": "Bearer kgw_unknown"}
            async with gw.post(URL, json={"userId": "u"}, headers=headers) as resp:
                assert resp.status == 401
        await asyncio.sleep(1.3)  # the summary of a second is written when it ends
        own, summaries = keyless_summary(audit_of(gw))
        assert 3 <= len(own) <= 6  # 3 a second: the burst may straddle a second
        assert len(own) + sum(s["count"] for s in summaries) == 12
        for summary in summaries:
            assert set(summary) == {"ts", "seq", "event", "client", "count", "clients",
                                    "prev", "hash"}
            assert summary["client"] is None
            assert summary["clients"] == {"127.0.0.1": summary["count"]}

    async def test_with_a_zero_budget_every_keyless_request_is_only_counted(
            self, gateway_for: Any, make_config: Any, sandbox: Any,
            auth_headers: dict[str, str]) -> None:
        """…and callers with a valid key are audited one by one, whatever the budget."""
        gw = await gateway_for(make_config(sandbox.url,
                                           audit={"max_unauthenticated_per_s": 0}))
        for _ in range(5):
            async with gw.post(URL, json={"userId": "u"}) as resp:
                assert resp.status == 401
            async with gw.post(URL, json={"userId": "u"}, headers=auth_headers) as resp:
                assert resp.status == 200
        await asyncio.sleep(1.3)
        records = audit_of(gw)
        own, summaries = keyless_summary(records)
        assert own == [] and sum(s["count"] for s in summaries) == 5
        assert [r["event"] for r in records if r.get("caller")] == [
            "deactivate.requested", "deactivate.completed"] * 5
        metrics = await (await gw.get("/metrics")).text()
        assert "kore_gateway_audit_unauthenticated_suppressed_total 5.0" in metrics

    async def test_the_last_summary_is_written_at_shutdown(
            self, make_config: Any, sandbox: Any) -> None:
        config = make_config(sandbox.url, audit={"max_unauthenticated_per_s": 0})
        app = create_app(config)
        runtime = app[RUNTIME]
        await runtime.start()
        await runtime.deactivator.deny(Ask("r-1", ROUTE_SIMPLE, client="192.0.2.1"),
                                       Unauthenticated("no key"))
        await runtime.close()
        [summary] = read_records(Path(config.audit.path))
        assert (summary["count"], summary["clients"]) == (1, {"192.0.2.1": 1})
