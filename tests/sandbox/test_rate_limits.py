"""The sandbox's rate limiting as Kore.ai documents it: the per-bot presets enforced as sliding
logs, scaled windows, and Kore.ai's rate-limit answer (its message, no Retry-After) on 429 or
another status. A settable clock: nothing sleeps."""

from __future__ import annotations

import argparse
from typing import Any

import jwt
import pytest

from gateway.sandbox.cli import add_arguments, sandbox_from_args
from gateway.sandbox.faults import KORE_RATE_LIMIT_MESSAGE, LIMIT_PRESETS, Faults
from gateway.sandbox.server import KoreSandbox, SandboxApp

APP_ID, SECRET = "cs-limits", "limits-secret-loopback-only-0123456789"
START = 1_800_000_000.0
SESSION = "/api/public/bot/st-limited/session"


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def sandbox(clock: Clock) -> KoreSandbox:
    return KoreSandbox([SandboxApp(APP_ID, SECRET)], clock=clock)


@pytest.fixture
async def client(aiohttp_client: Any, sandbox: KoreSandbox) -> Any:
    return await aiohttp_client(sandbox.create_app())


async def put(client: Any, clock: Clock, path: str = SESSION) -> Any:
    token = jwt.encode({"appId": APP_ID, "sub": "s", "iat": int(clock.now),
                        "exp": int(clock.now + 600)}, SECRET, "HS256")
    return await client.put(path, json={"userId": "u-1"}, headers={"auth": token})


async def statuses(client: Any, clock: Clock, count: int) -> list[int]:
    return [(await put(client, clock)).status for _ in range(count)]


class TestPresets:
    def test_the_documented_rows(self) -> None:
        assert LIMIT_PRESETS == {"kore-runtime": [(600, 60.0), (18000, 3600.0)],
                                 "kore-bot-sessions": [(60, 60.0), (1800, 3600.0)]}

    async def test_bot_sessions_is_a_sliding_minute(self, client: Any, sandbox: KoreSandbox,
                                                    clock: Clock) -> None:
        sandbox.faults.limits = LIMIT_PRESETS["kore-bot-sessions"]
        assert await statuses(client, clock, 60) == [200] * 60
        assert await statuses(client, clock, 1) == [429]
        clock.now += 59.9
        assert await statuses(client, clock, 1) == [429]  # a rolling window, not a clock minute
        clock.now += 0.1
        assert await statuses(client, clock, 61) == [200] * 60 + [429]

    async def test_the_hour_binds_once_the_minutes_add_up(self, client: Any,
                                                          sandbox: KoreSandbox,
                                                          clock: Clock) -> None:
        sandbox.faults.limits = LIMIT_PRESETS["kore-bot-sessions"]
        for _ in range(30):
            assert await statuses(client, clock, 60) == [200] * 60
            clock.now += 60
        assert await statuses(client, clock, 1) == [429]  # 1,800 in the hour
        clock.now += 3600 - 30 * 60
        assert await statuses(client, clock, 1) == [200]

    async def test_scale_shortens_every_window(self, client: Any, sandbox: KoreSandbox,
                                               clock: Clock) -> None:
        sandbox.faults.limits = LIMIT_PRESETS["kore-bot-sessions"]
        sandbox.faults.limit_scale = 0.1  # 60 per 6 s, 1,800 per 360 s
        assert await statuses(client, clock, 61) == [200] * 60 + [429]
        clock.now += 6
        assert await statuses(client, clock, 1) == [200]

    async def test_a_refused_call_counts_in_no_window(self, client: Any, sandbox: KoreSandbox,
                                                      clock: Clock) -> None:
        sandbox.faults.limits = [(2, 10.0)]
        assert await statuses(client, clock, 5) == [200, 200, 429, 429, 429]
        clock.now += 10
        assert await statuses(client, clock, 3) == [200, 200, 429]


    @pytest.mark.parametrize(("headers", "body", "status"), [
        pytest.param({}, {"userId": "u-1"}, 401, id="no-token"),
        pytest.param({"auth": "not-a-jwt"}, {"userId": "u-1"}, 401, id="bad-token"),
        pytest.param(None, {}, 400, id="bad-body"),
    ])
    async def test_a_call_refused_for_another_reason_counts_in_no_window(
            self, client: Any, sandbox: KoreSandbox, clock: Clock, headers: dict[str, str] | None,
            body: dict[str, Any], status: int) -> None:
        sandbox.faults.limits = [(1, 60.0)]
        if headers is None:
            token = jwt.encode({"appId": APP_ID, "sub": "s", "iat": int(clock.now),
                                "exp": int(clock.now + 600)}, SECRET, "HS256")
            headers = {"auth": token}
        refused = [await client.put(SESSION, json=body, headers=headers) for _ in range(3)]
        assert [r.status for r in refused] == [status] * 3
        assert await statuses(client, clock, 2) == [200, 429]

class TestKoreAnswer:
    async def test_kores_message_without_retry_after(self, client: Any, sandbox: KoreSandbox,
                                                     clock: Clock) -> None:
        sandbox.faults.limits, sandbox.faults.limit_answer = [(1, 60.0)], "kore"
        await put(client, clock)
        resp = await put(client, clock)
        assert resp.status == 429 and "Retry-After" not in resp.headers
        assert await resp.json() == {"errors": [{"msg": KORE_RATE_LIMIT_MESSAGE, "code": 429}]}
        assert KORE_RATE_LIMIT_MESSAGE == ("Rate limit for this API has been reached. "
                                           "Please try again after some time.")

    @pytest.mark.parametrize("status", [400, 200, 503])
    async def test_the_message_on_another_status(self, client: Any, sandbox: KoreSandbox,
                                                 clock: Clock, status: int) -> None:
        sandbox.faults.rate_429 = 1.0
        sandbox.faults.limit_answer, sandbox.faults.limit_status = "kore", status
        resp = await put(client, clock)
        assert resp.status == status and "Retry-After" not in resp.headers
        assert (await resp.json())["errors"][0]["msg"] == KORE_RATE_LIMIT_MESSAGE
        assert sandbox.stats()["by_status"] == {str(status): 1}

    async def test_retry_after_header_is_sent_verbatim(self, client: Any, sandbox: KoreSandbox,
                                                       clock: Clock) -> None:
        sandbox.faults.rate_429, sandbox.faults.retry_after_header = 1.0, "1e999"
        resp = await put(client, clock)
        assert (resp.status, resp.headers["Retry-After"]) == (429, "1e999")

    async def test_the_default_answer_is_unchanged(self, client: Any, sandbox: KoreSandbox,
                                                   clock: Clock) -> None:
        sandbox.faults.limits = [(1, 60.0)]
        await put(client, clock)
        resp = await put(client, clock)
        assert (resp.status, resp.headers["Retry-After"]) == (429, "60")


class TestControlRoute:
    async def test_presets_and_modes_over_http(self, client: Any, sandbox: KoreSandbox) -> None:
        resp = await client.put("/__sandbox/faults", json={
            "limits": "kore-runtime", "limit_scale": 0.5, "limit_answer": "kore",
            "limit_status": 400, "retry_after_header": None})
        assert resp.status == 200
        assert (sandbox.faults.limits, sandbox.faults.limit_scale) == (
            [(600, 60.0), (18000, 3600.0)], 0.5)
        assert (sandbox.faults.limit_answer, sandbox.faults.limit_status) == ("kore", 400)

    @pytest.mark.parametrize("patch", [
        {"limits": "kore-everything"}, {"limit_answer": "polite"}, {"limit_status": 100},
        {"limit_scale": 0}, {"retry_after_header": "a\r\nb"}, {"retry_after_header": 5},
    ], ids=["preset", "answer", "status", "scale", "crlf", "not-text"])
    async def test_bad_values_are_400(self, client: Any, sandbox: KoreSandbox,
                                      patch: dict[str, Any]) -> None:
        resp = await client.put("/__sandbox/faults", json=patch)
        assert resp.status == 400 and sandbox.faults == Faults()


class TestCommandLine:
    @staticmethod
    def sandbox(*argv: str) -> KoreSandbox:
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        return sandbox_from_args(parser.parse_args(argv), [SandboxApp(APP_ID, SECRET)])

    def test_limits_preset_scale_and_answer(self) -> None:
        faults = self.sandbox("--limits", "kore-bot-sessions", "--limit-scale", "0.1",
                              "--limit-answer", "kore", "--limit-status", "400").faults
        assert faults == Faults(limits=[(60, 60.0), (1800, 3600.0)], limit_scale=0.1,
                                limit_answer="kore", limit_status=400)

    def test_a_preset_adds_to_explicit_windows(self) -> None:
        faults = self.sandbox("--limit", "5/1", "--limits", "kore-runtime").faults
        assert faults.limits == [(5, 1.0), (600, 60.0), (18000, 3600.0)]

    @pytest.mark.parametrize("argv", [("--limits", "kore-all"), ("--limit-answer", "nice"),
                                      ("--limit-scale", "-1")],
                             ids=["preset", "answer", "scale"])
    def test_bad_flags_exit(self, argv: tuple[str, ...]) -> None:
        with pytest.raises(SystemExit):
            self.sandbox(*argv)
