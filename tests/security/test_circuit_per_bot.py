"""One caller's broken bot never refuses another bot's call (issue 11, item 5).

Caller B (narrow-service) sends call after call to a bot for which Kore.ai fails; its circuit
opens and B gets fast 502s, while caller A's calls to other bots, sent at the same time, all
stay 200. Failing probes after the cool-down re-open B's bot only.
"""

from __future__ import annotations

import asyncio
from typing import Any

from tests.conftest import OTHER_KEY
from tests.faults.kore import AUTH, calls_for, inject
from tests.integration.sides import AuditTrail, expect_error, retry_after

B_AUTH = {"Authorization": f"Bearer {OTHER_KEY}"}
BROKEN = "st-own-broken"  # within caller B's globs (st-own-*)
OTHERS = [f"st-healthy-{n}" for n in range(5)]
B_CALLS = 20
COOLDOWN_S = 0.3


def url(bot: str) -> str:
    return f"/v1/bots/{bot}/sessions/deactivate"


async def call(gateway: Any, bot: str, headers: dict[str, str], rid: str) -> Any:
    resp = await gateway.post(url(bot), json={"userId": "u-1"},
                              headers={**headers, "X-Request-ID": rid})
    await resp.read()
    return resp


async def test_broken_bot_of_one_caller_leaves_other_bots_at_200(
        start_gateway: Any, sandbox: Any, audit: AuditTrail) -> None:
    inject(sandbox, error_rate=1.0, error_status=503, bots=[BROKEN])
    gateway = await start_gateway(upstream={"max_attempts": 1, "breaker_failures": 5,
                                            "breaker_cooldown_s": 60})

    async def caller_b() -> list[int]:
        return [(await call(gateway, BROKEN, B_AUTH, f"b-{n}")).status for n in range(B_CALLS)]

    async def caller_a() -> list[int]:
        statuses = []
        for n in range(B_CALLS):
            resp = await call(gateway, OTHERS[n % len(OTHERS)], AUTH, f"a-{n}")
            statuses.append(resp.status)
        return statuses

    b_statuses, a_statuses = await asyncio.gather(caller_b(), caller_a())
    assert a_statuses == [200] * B_CALLS
    assert set(b_statuses) == {502}
    sent_for_b = [c for c in sandbox.calls if c.bot_id == BROKEN]
    assert len(sent_for_b) == 5, "B's bot stops being called once its circuit opens"
    resp = await call(gateway, BROKEN, B_AUTH, "b-fast")
    await expect_error(resp, 502, "upstream_unavailable")
    assert retry_after(resp) >= 1 and calls_for(sandbox, "b-fast") == []
    detail = (await (await gateway.get("/readyz")).json())["circuit"]
    assert detail["state"] == "closed" and detail["openBotIds"] == [BROKEN]
    audit.expect_chain()


async def test_failing_probes_reopen_only_the_broken_bot(start_gateway: Any,
                                                         sandbox: Any) -> None:
    inject(sandbox, error_rate=1.0, error_status=503, bots=[BROKEN])
    gateway = await start_gateway(upstream={"max_attempts": 1, "breaker_failures": 2,
                                            "breaker_host_bots": 2,
                                            "breaker_cooldown_s": COOLDOWN_S})
    for n in range(2):
        assert (await call(gateway, BROKEN, B_AUTH, f"open-{n}")).status == 502
    for round_ in range(4):  # B keeps probing, and keeps failing
        await asyncio.sleep(COOLDOWN_S + 0.05)
        assert (await call(gateway, BROKEN, B_AUTH, f"probe-{round_}")).status == 502
        assert len(calls_for(sandbox, f"probe-{round_}")) == 1
        for bot in OTHERS:
            assert (await call(gateway, bot, AUTH, f"a-{round_}-{bot}")).status == 200
    detail = (await (await gateway.get("/readyz")).json())["circuit"]
    assert detail["state"] == "closed" and detail["openBotIds"] == [BROKEN]


async def test_metric_names_the_open_bot_only(start_gateway: Any, sandbox: Any) -> None:
    inject(sandbox, error_rate=1.0, error_status=503, bots=[BROKEN])
    gateway = await start_gateway(upstream={"max_attempts": 1, "breaker_failures": 1})
    assert (await call(gateway, BROKEN, B_AUTH, "x")).status == 502
    for bot in OTHERS:
        assert (await call(gateway, bot, AUTH, bot)).status == 200
    text = await (await gateway.get("/metrics")).text()
    series = [line for line in text.splitlines()
              if line.startswith("kore_gateway_circuit_state{")]
    assert len(series) == 2, series  # the host's (bot="*") and the broken bot's
    assert any(f'bot="{BROKEN}"' in line and line.endswith(" 2.0") for line in series)
    assert any('bot="*"' in line and line.endswith(" 0.0") for line in series)
