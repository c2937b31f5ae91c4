"""The Kore.ai emulator, driven over real loopback sockets with JWTs minted by PyJWT."""

from __future__ import annotations

import argparse
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp.test_utils import TestClient
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from yarl import URL

from gateway.config.model import KoreApp, Secret
from gateway.sandbox.cli import add_arguments, sandbox_from_args
from gateway.sandbox.server import Faults, KoreSandbox, SandboxApp

HS_ID, RS_ID = "cs-test", "cs-rsa"
SECRET = "test-secret-" + "0123456789abcdef" * 4  # ≥ 64 bytes: no PyJWT key-length warning
SESSION = "/api/public/bot/st-demo/session"
START = 1_700_000_000.0

Client = TestClient[Any, Any]
ClientFactory = Callable[[KoreSandbox], Awaitable[Client]]


class FakeClock:
    """A settable clock: window and expiry tests never sleep."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def rsa_pem() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def apps(rsa_pem: str) -> list[SandboxApp]:
    rs_app = KoreApp(name="rsa", client_id=RS_ID, algorithm="RS256", private_key=Secret(rsa_pem))
    return [SandboxApp(HS_ID, SECRET), SandboxApp.from_kore_app(rs_app)]


@pytest.fixture
def sandbox(apps: list[SandboxApp], clock: FakeClock) -> KoreSandbox:
    return KoreSandbox(apps, clock=clock)


@pytest.fixture
def connect(aiohttp_client: Any) -> ClientFactory:
    async def factory(sandbox: KoreSandbox) -> Client:
        client: Client = await aiohttp_client(sandbox.create_app())
        return client

    return factory


@pytest.fixture
async def client(connect: ClientFactory, sandbox: KoreSandbox) -> Client:
    return await connect(sandbox)


def mint(
    clock: FakeClock,
    *,
    app_id: str = HS_ID,
    key: Any = SECRET,
    algorithm: str = "HS256",
    ttl_s: float = 600,
    **claims: Any,
) -> str:
    payload = {"appId": app_id, "sub": "kore-session-gateway", "iat": int(clock.now)}
    payload["exp"] = int(clock.now + ttl_s)
    payload.update(claims)
    return jwt.encode({k: v for k, v in payload.items() if v is not None}, key, algorithm)


async def put(
    client: Client,
    token: str | None,
    body: Any = None,
    path: str = SESSION,
    headers: dict[str, str] | None = None,
) -> aiohttp.ClientResponse:
    headers = {**({} if token is None else {"auth": token}), **(headers or {})}
    json_body = {"userId": "u-1", "status": "inactive", "channel": "rtm"} if body is None else body
    return await client.put(path, json=json_body, headers=headers)


async def error_msg(resp: aiohttp.ClientResponse) -> str:
    body = await resp.json()
    [error] = body["errors"]
    assert error["code"] == resp.status
    return str(error["msg"])


class TestAccepted:
    async def test_hs256_token_answers_success_and_records_claims(
        self, client: Client, sandbox: KoreSandbox, clock: FakeClock
    ) -> None:
        resp = await put(client, mint(clock), headers={"X-Request-ID": "req-1"})
        assert resp.status == 200
        assert await resp.json() == {"success": True}
        [call] = sandbox.calls
        assert (call.method, call.path, call.bot_id, call.status) == (
            "PUT",
            SESSION,
            "st-demo",
            200,
        )
        assert call.claims is not None and call.claims["appId"] == HS_ID
        assert call.body == {"userId": "u-1", "status": "inactive", "channel": "rtm"}
        assert call.headers["X-Request-ID"] == call.headers["x-request-id"] == "req-1"
        assert call.at == clock.now

    async def test_rs256_token_from_kore_app_private_key(
        self, client: Client, sandbox: KoreSandbox, clock: FakeClock, rsa_pem: str
    ) -> None:
        token = mint(clock, app_id=RS_ID, key=rsa_pem, algorithm="RS256")
        resp = await put(client, token)
        assert resp.status == 200
        assert sandbox.calls[0].claims == jwt.decode(token, options={"verify_signature": False})

    async def test_minimal_body_is_enough(self, client: Client, clock: FakeClock) -> None:
        assert (await put(client, mint(clock), {"userId": "u-1"})).status == 200

    async def test_percent_encoded_bot_id_is_decoded_and_path_kept(
        self, client: Client, sandbox: KoreSandbox, clock: FakeClock
    ) -> None:
        path = "/api/public/bot/st-a%2Fb/session"
        resp = await client.put(
            URL(path, encoded=True),
            json={"userId": "u"},
            headers={"auth": mint(clock)},
        )
        assert resp.status == 200
        assert (sandbox.calls[0].path, sandbox.calls[0].bot_id) == (path, "st-a/b")

    async def test_custom_session_path(
        self, connect: ClientFactory, apps: list[SandboxApp], clock: FakeClock
    ) -> None:
        sandbox = KoreSandbox(apps, session_paths=["/api/public/{botId}/sessions"], clock=clock)
        client = await connect(sandbox)
        assert (await put(client, mint(clock), path="/api/public/st-x/sessions")).status == 200
        assert (await put(client, mint(clock))).status == 404


class TestTokenRejected:
    @pytest.mark.parametrize(
        ("claims", "msg"),
        [
            ({"ttl_s": 0}, "Token expired"),
            ({"ttl_s": -5}, "Token expired"),
            ({"algorithm": "HS512"}, "Algorithm mismatch"),
            ({"iat": int(START) + 61}, "Token issued in the future"),
            ({"exp": None}, "Missing claim: exp"),
            ({"iat": None}, "Missing claim: iat"),
            ({"nbf": int(START) + 10}, "Token not yet valid"),
        ],
        ids=[
            "expires-now",
            "expired",
            "alg-mismatch",
            "iat-future",
            "no-exp",
            "no-iat",
            "nbf-future",
        ],
    )
    async def test_bad_token_is_401(
        self, client: Client, clock: FakeClock, claims: dict[str, Any], msg: str
    ) -> None:
        resp = await put(client, mint(clock, **claims))
        assert resp.status == 401
        assert await error_msg(resp) == msg

    @pytest.mark.parametrize(
        "claims",
        [{"key": "wrong-secret-that-is-long-enough-0123456789"}, {"app_id": "cs-unknown"}],
        ids=["wrong-secret", "unknown-app-id"],
    )
    async def test_kores_invalid_sdk_credentials(
        self, client: Client, clock: FakeClock, claims: dict[str, Any]
    ) -> None:
        resp = await put(client, mint(clock, **claims))
        assert resp.status == 401
        assert await resp.json() == {"errors": [{"msg": "Invalid SDK credentials", "code": 4002}]}

    @pytest.mark.parametrize("appended", ["a", "ab", "abc", "abcd", "AAAA", ".x"])
    async def test_characters_appended_to_a_valid_token(
        self, client: Client, clock: FakeClock, appended: str
    ) -> None:
        """S6: a valid token with characters appended is "Invalid SDK credentials", whether
        or not its signature segment still decodes."""
        resp = await put(client, mint(clock) + appended)
        assert resp.status == 401
        assert await resp.json() == {"errors": [{"msg": "Invalid SDK credentials", "code": 4002}]}

    @pytest.mark.parametrize("token", ["not-a-jwt", "a.b", "e30.!!!.x"])
    async def test_what_is_not_a_jwt_is_invalid_jwt_token(self, client: Client,
                                                           token: str) -> None:
        resp = await put(client, token)
        assert resp.status == 401
        assert await resp.json() == {"errors": [{"msg": "Invalid JWT token", "code": 4002}]}

    async def test_iat_up_to_60_s_ahead_is_accepted(self, client: Client, clock: FakeClock) -> None:
        assert (await put(client, mint(clock, iat=int(START) + 60))).status == 200

    async def test_missing_auth_header_is_401(self, client: Client) -> None:
        resp = await put(client, None)
        assert resp.status == 401
        assert await resp.json() == {"errors": [{"msg": "Invalid SDK credentials", "code": 4002}]}

    async def test_authorization_header_is_not_auth(self, client: Client, clock: FakeClock) -> None:
        resp = await client.put(
            SESSION, json={"userId": "u"}, headers={"Authorization": f"Bearer {mint(clock)}"}
        )
        assert resp.status == 401

    async def test_alg_none_is_401(self, client: Client, clock: FakeClock) -> None:
        payload = {"appId": HS_ID, "iat": int(START), "exp": int(START) + 60}
        resp = await put(client, jwt.encode(payload, "", algorithm="none"))
        assert (resp.status, await error_msg(resp)) == (401, "Algorithm mismatch")

    async def test_garbage_token_is_401(self, client: Client) -> None:
        resp = await put(client, "not.a.jwt")
        assert resp.status == 401
        assert await resp.json() == {"errors": [{"msg": "Invalid JWT token", "code": 4002}]}

    async def test_rs_app_rejects_hs_token_signed_with_the_secret(
        self, client: Client, clock: FakeClock
    ) -> None:
        resp = await put(client, mint(clock, app_id=RS_ID))
        assert (resp.status, await error_msg(resp)) == (401, "Algorithm mismatch")

    async def test_rejected_call_is_recorded_without_claims(
        self, client: Client, sandbox: KoreSandbox
    ) -> None:
        await put(client, None)
        [call] = sandbox.calls
        assert (call.status, call.claims) == (401, None)


REPLAY = {"errors": [{"msg": "error verifying the jwt: possibly a replay", "code": 401}]}
EXP_TOO_FAR = {"errors": [{"msg": 'error verifying the jwt: if "jti" claim "exp" must be '
                                  "<= 1 hour(s)", "code": 401}]}


class TestJti:
    """Kore.ai's jti validations (its SDK security page), whether or not Enforce JTI is on."""

    @pytest.mark.parametrize("enforce", [True, False], ids=["enforced", "not-enforced"])
    async def test_replay_is_refused_with_kores_message(
        self, connect: ClientFactory, apps: list[SandboxApp], clock: FakeClock, enforce: bool
    ) -> None:
        client = await connect(KoreSandbox(apps, enforce_jti=enforce, clock=clock))
        token = mint(clock, jti="j-1")
        assert (await put(client, token)).status == 200
        resp = await put(client, token)
        assert (resp.status, await resp.json()) == (401, REPLAY)
        assert (await put(client, mint(clock, jti="j-2"))).status == 200

    async def test_a_replay_with_a_new_signature_is_still_a_replay(
        self, client: Client, clock: FakeClock
    ) -> None:
        assert (await put(client, mint(clock, jti="j-1"))).status == 200
        clock.now += 1  # another iat: another token, the same jti
        assert (await (await put(client, mint(clock, jti="j-1"))).json()) == REPLAY

    async def test_kore_jti_is_the_jti_kore_reads(self, client: Client, clock: FakeClock) -> None:
        assert (await put(client, mint(clock, jti="a", kore_jti="k"))).status == 200
        resp = await put(client, mint(clock, jti="b", kore_jti="k"))
        assert (resp.status, await resp.json()) == (401, REPLAY)

    @pytest.mark.parametrize("enforce", [True, False], ids=["enforced", "not-enforced"])
    async def test_exp_more_than_an_hour_ahead_is_refused(
        self, connect: ClientFactory, apps: list[SandboxApp], clock: FakeClock, enforce: bool
    ) -> None:
        client = await connect(KoreSandbox(apps, enforce_jti=enforce, clock=clock))
        resp = await put(client, mint(clock, jti="far", ttl_s=3601))
        assert (resp.status, await resp.json()) == (401, EXP_TOO_FAR)
        assert (await put(client, mint(clock, jti="edge", ttl_s=3600))).status == 200

    async def test_the_cap_is_read_on_kores_clock_not_from_iat(
        self, client: Client, clock: FakeClock
    ) -> None:
        token = mint(clock, jti="skew", ttl_s=3600)
        clock.now -= 5  # Kore.ai's clock 5 s behind the issuer's
        assert (await (await put(client, token)).json()) == EXP_TOO_FAR

    async def test_without_a_jti_a_long_exp_is_fine(self, client: Client, clock: FakeClock) -> None:
        assert (await put(client, mint(clock, ttl_s=86400))).status == 200

    async def test_a_jti_is_forgotten_once_its_token_expired(
        self, client: Client, clock: FakeClock
    ) -> None:
        assert (await put(client, mint(clock, jti="j-1", ttl_s=60))).status == 200
        clock.now += 61
        assert (await put(client, mint(clock, jti="j-1", ttl_s=60))).status == 200

    async def test_missing_jti_is_401_when_enforced(
        self, connect: ClientFactory, apps: list[SandboxApp], clock: FakeClock
    ) -> None:
        client = await connect(KoreSandbox(apps, enforce_jti=True, clock=clock))
        resp = await put(client, mint(clock))
        assert (resp.status, await error_msg(resp)) == (401, "Missing claim: jti")

    async def test_tokens_without_jti_may_repeat_when_not_enforced(
        self, client: Client, clock: FakeClock
    ) -> None:
        token = mint(clock)
        assert [(await put(client, token)).status for _ in range(2)] == [200, 200]


class TestRequestRejected:
    @pytest.mark.parametrize(
        ("kwargs", "field"),
        [
            ({"data": b'{"userId": "u"}'}, "Content-Type"),
            ({"data": b"{", "headers": {"Content-Type": "application/json"}}, "body"),
            ({"json": ["u"]}, "body"),
            ({"json": {}}, "userId"),
            ({"json": {"userId": 7}}, "userId"),
            ({"json": {"userId": ""}}, "userId"),
            ({"json": {"userId": "u", "status": "active"}}, "status"),
            ({"json": {"userId": "u", "channel": 5}}, "channel"),
            ({"json": {"userId": "u", "sessionId": "s"}}, "sessionId"),
        ],
        ids=[
            "no-json-type",
            "not-json",
            "not-object",
            "no-user",
            "user-not-str",
            "user-empty",
            "bad-status",
            "channel-not-str",
            "unknown-field",
        ],
    )
    async def test_bad_body_is_400_naming_the_field(
        self, client: Client, clock: FakeClock, kwargs: dict[str, Any], field: str
    ) -> None:
        headers = {"auth": mint(clock), **kwargs.pop("headers", {})}
        resp = await client.put(SESSION, headers=headers, **kwargs)
        assert resp.status == 400
        assert (await error_msg(resp)).startswith(f"{field}:")

    async def test_unknown_bot_is_404(self, client: Client, clock: FakeClock) -> None:
        resp = await put(client, mint(clock), path="/api/public/bot/xx-demo/session")
        assert (resp.status, await error_msg(resp)) == (404, "Bot not found")

    async def test_other_path_is_404(self, client: Client, sandbox: KoreSandbox) -> None:
        resp = await client.get("/api/public/bots")
        assert (resp.status, await error_msg(resp)) == (404, "Not found")
        assert sandbox.calls == []

    async def test_other_method_is_405_and_recorded(
        self, client: Client, sandbox: KoreSandbox, clock: FakeClock
    ) -> None:
        resp = await client.post(SESSION, json={"userId": "u"}, headers={"auth": mint(clock)})
        assert resp.status == 405
        assert resp.headers["Allow"] == "PUT"
        assert [c.status for c in sandbox.calls] == [405]


class TestTooLarge:
    async def test_a_body_over_a_mib_is_413_in_kores_shape(self, client: Client,
                                                           clock: FakeClock) -> None:
        resp = await client.put(SESSION, data=b"x" * (1024 * 1024 + 1),
                                headers={"auth": mint(clock), "Content-Type": "application/json"})
        assert resp.status == 413
        assert await error_msg(resp) == "Request Entity Too Large"


class TestFaults:
    async def test_drop_closes_the_connection_without_an_answer(
        self, client: Client, sandbox: KoreSandbox, clock: FakeClock
    ) -> None:
        sandbox.faults.drop_rate = 1.0
        with pytest.raises(aiohttp.ClientConnectionError):
            await put(client, mint(clock))
        # aiohttp's client silently resends an idempotent PUT once after a disconnect.
        assert sandbox.calls and all(call.status == 0 for call in sandbox.calls)
        assert sandbox.stats()["dropped"] == len(sandbox.calls)
        sandbox.faults.drop_rate = 0.0
        assert (await put(client, mint(clock))).status == 200

    async def test_latency_delays_the_answer(
        self, client: Client, sandbox: KoreSandbox, clock: FakeClock
    ) -> None:
        sandbox.faults.latency_ms = 150
        started = time.monotonic()
        assert (await put(client, mint(clock))).status == 200
        assert time.monotonic() - started >= 0.14

    async def test_error_rate_one_answers_error_status(
        self, client: Client, sandbox: KoreSandbox, clock: FakeClock
    ) -> None:
        sandbox.faults.error_rate, sandbox.faults.error_status = 1.0, 503
        resp = await put(client, mint(clock))
        assert (resp.status, await error_msg(resp)) == (503, "Service Unavailable")

    async def test_fail_first_then_normal(
        self, client: Client, sandbox: KoreSandbox, clock: FakeClock
    ) -> None:
        sandbox.faults.fail_first = 2
        statuses = [(await put(client, mint(clock))).status for _ in range(3)]
        assert statuses == [500, 500, 200]
        assert sandbox.faults.fail_first == 0

    async def test_rate_429_sends_retry_after_rounded_up(
        self, client: Client, sandbox: KoreSandbox, clock: FakeClock
    ) -> None:
        sandbox.faults.rate_429, sandbox.faults.retry_after_s = 1.0, 1.2
        resp = await put(client, mint(clock))
        assert (resp.status, resp.headers["Retry-After"]) == (429, "2")
        assert sandbox.stats()["upstream_429"] == 1

    async def test_reject_token_next_then_accepted(
        self, client: Client, sandbox: KoreSandbox, clock: FakeClock
    ) -> None:
        sandbox.faults.reject_token_next = 1
        resp = await put(client, mint(clock))
        assert await resp.json() == {"errors": [{"msg": "Invalid SDK credentials", "code": 4002}]}
        assert (await put(client, mint(clock))).status == 200

    @pytest.mark.parametrize(
        ("mode", "status", "body"),
        [("empty", 200, b""), ("no_content", 204, b""),
         ("string_true", 200, b'{"success": "true"}')],
    )
    async def test_odd_success_answers_an_accepted_call_oddly(
        self, client: Client, sandbox: KoreSandbox, clock: FakeClock, mode: str, status: int,
        body: bytes,
    ) -> None:
        sandbox.faults.odd_success = mode
        resp = await put(client, mint(clock))
        assert (resp.status, await resp.read()) == (status, body)
        assert sandbox.calls[-1].status == status
        assert (await put(client, None)).status == 401  # only calls Kore.ai would accept

    async def test_echo_token_quotes_the_jwt_in_error_answers(
        self, client: Client, sandbox: KoreSandbox, clock: FakeClock
    ) -> None:
        sandbox.faults.echo_token = True
        sandbox.faults.fail_first, sandbox.faults.error_status = 1, 400
        token = mint(clock)
        resp = await put(client, token)
        assert (resp.status, await error_msg(resp)) == (400, f"Bad Request (auth: {token})")
        assert (await put(client, mint(clock))).status == 200

    async def test_limits_429_past_budget_until_window_slides(
        self, client: Client, sandbox: KoreSandbox, clock: FakeClock
    ) -> None:
        sandbox.faults.limits = [(2, 60.0)]
        assert [(await put(client, mint(clock))).status for _ in range(2)] == [200, 200]
        resp = await put(client, mint(clock))
        assert (resp.status, resp.headers["Retry-After"]) == (429, "60")
        clock.now += 30.5
        resp = await put(client, mint(clock))
        assert (resp.status, resp.headers["Retry-After"]) == (429, "30")
        other_bot = "/api/public/bot/st-other/session"
        assert (await put(client, mint(clock), path=other_bot)).status == 200
        clock.now += 29.5
        assert (await put(client, mint(clock))).status == 200

    async def test_limits_apply_every_window(
        self, client: Client, sandbox: KoreSandbox, clock: FakeClock
    ) -> None:
        sandbox.faults.limits = [(5, 1.0), (2, 3600.0)]
        assert [(await put(client, mint(clock))).status for _ in range(3)] == [200, 200, 429]
        clock.now += 10
        assert (await put(client, mint(clock))).status == 429

    async def test_seed_makes_fault_rolls_repeatable(
        self, connect: ClientFactory, apps: list[SandboxApp], clock: FakeClock
    ) -> None:
        runs = []
        for _ in range(2):
            sandbox = KoreSandbox(apps, faults=Faults(error_rate=0.5, seed=7), clock=clock)
            client = await connect(sandbox)
            runs.append([(await put(client, mint(clock))).status for _ in range(8)])
        assert runs[0] == runs[1] and set(runs[0]) == {200, 500}


class TestControlRoutes:
    async def test_calls_round_trip_and_reset(
        self, client: Client, sandbox: KoreSandbox, clock: FakeClock
    ) -> None:
        await put(client, mint(clock))
        [call] = await (await client.get("/__sandbox/calls")).json()
        assert call["claims"]["appId"] == HS_ID and call["status"] == 200
        assert call["headers"]["auth"]
        stats = await (await client.get("/__sandbox/stats")).json()
        assert stats == {"total": 1, "by_status": {"200": 1}, "dropped": 0, "upstream_429": 0}
        assert (await client.delete("/__sandbox/calls")).status == 204
        assert await (await client.get("/__sandbox/calls")).json() == []
        assert sandbox.stats()["total"] == 0

    async def test_faults_partial_update(
        self, client: Client, sandbox: KoreSandbox, clock: FakeClock
    ) -> None:
        resp = await client.put("/__sandbox/faults", json={"error_rate": 1, "error_status": 502})
        assert resp.status == 200
        faults = await (await client.get("/__sandbox/faults")).json()
        assert (faults["error_rate"], faults["error_status"], faults["latency_ms"]) == (1, 502, 0)
        assert (await put(client, mint(clock))).status == 502
        await client.put("/__sandbox/faults", json={"error_rate": 0, "limits": ["1/60"]})
        assert sandbox.faults.limits == [(1, 60.0)]
        assert [(await put(client, mint(clock))).status for _ in range(2)] == [200, 429]

    async def test_faults_fire_only_for_the_bots_named(
        self, client: Client, sandbox: KoreSandbox, clock: FakeClock
    ) -> None:
        resp = await client.put("/__sandbox/faults",
                                json={"error_rate": 1, "error_status": 503, "bots": ["st-bad*"]})
        assert resp.status == 200
        bad = "/api/public/bot/st-bad-1/session"
        assert (await put(client, mint(clock), path=bad)).status == 503
        assert (await put(client, mint(clock))).status == 200  # st-demo: untouched
        await client.put("/__sandbox/faults", json={"bots": []})
        assert (await put(client, mint(clock))).status == 503  # [] = every bot

    @pytest.mark.parametrize(
        ("patch", "field"),
        [
            ({"latency": 5}, "latency"),
            ({"bots": "st-*"}, "bots"),
            ({"bots": [""]}, "bots"),
            ({"error_rate": 2}, "error_rate"),
            ({"error_status": 200}, "error_status"),
            ({"fail_first": 1.5}, "fail_first"),
            ({"drop_rate": True}, "drop_rate"),
            ({"limits": [[0, 60]]}, "limits"),
            ({"limits": "600/60"}, "limits"),
            ({"odd_success": "maybe"}, "odd_success"),
            ({"echo_token": "yes"}, "echo_token"),
        ],
        ids=["unknown", "bots-not-list", "bots-empty-glob", "rate", "status", "fraction", "bool",
             "zero-calls", "not-list", "odd-success", "echo-token"],
    )
    async def test_bad_faults_are_400_and_change_nothing(
        self, client: Client, sandbox: KoreSandbox, patch: dict[str, Any], field: str
    ) -> None:
        resp = await client.put("/__sandbox/faults", json={"latency_ms": 9, **patch})
        assert resp.status == 400
        assert (await error_msg(resp)).startswith(f"{field}:")
        assert sandbox.faults == Faults()

    async def test_healthz(self, client: Client) -> None:
        assert (await client.get("/healthz")).status == 200

    async def test_secret_never_shown(
        self, client: Client, sandbox: KoreSandbox, clock: FakeClock
    ) -> None:
        await put(client, mint(clock, key="wrong-secret-that-is-long-enough-0123456789"))
        await put(client, mint(clock))
        for route in ("/__sandbox/calls", "/__sandbox/faults", "/__sandbox/stats"):
            assert SECRET not in await (await client.get(route)).text()
        assert SECRET not in repr(SandboxApp(HS_ID, SECRET))


class TestSetup:
    def test_from_kore_app_hs_uses_the_secret(self) -> None:
        app = KoreApp(name="a", client_id=HS_ID, algorithm="HS512", client_secret=Secret(SECRET))
        assert SandboxApp.from_kore_app(app) == SandboxApp(HS_ID, SECRET, "HS512")

    def test_from_kore_app_without_credentials_fails(self) -> None:
        with pytest.raises(ValueError, match="client secret"):
            SandboxApp.from_kore_app(KoreApp(name="a", client_id=HS_ID))

    @pytest.mark.parametrize(
        "app",
        [SandboxApp(HS_ID, SECRET, "none"), SandboxApp(RS_ID, "not a pem", "RS256")],
        ids=["alg-none", "bad-pem"],
    )
    def test_bad_app_is_refused(self, app: SandboxApp) -> None:
        with pytest.raises(ValueError, match=app.client_id):
            KoreSandbox([app])

    def test_session_path_needs_bot_id(self) -> None:
        with pytest.raises(ValueError, match="botId"):
            KoreSandbox([], session_paths=["/api/public/session"])


class TestCommandLine:
    @staticmethod
    def parse(*argv: str) -> argparse.Namespace:
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        return parser.parse_args(argv)

    def test_defaults_are_no_faults_on_loopback(self, apps: list[SandboxApp]) -> None:
        args = self.parse()
        assert args.listen == "127.0.0.1:9090"
        assert sandbox_from_args(args, apps).faults == Faults()

    def test_flags_build_the_sandbox(self, apps: list[SandboxApp]) -> None:
        args = self.parse(
            *("--listen", "[::1]:0", "--enforce-jti", "--error-rate", "0.25"),
            *("--limit", "600/60", "--limit", "18000/3600", "--known-bot", "st-a*"),
            *("--session-path", "/api/public/{botId}/sessions", "--seed", "3"),
            *("--fault-bot", "st-bad-*"),
            *("--odd-success", "no_content", "--echo-token"),
        )
        sandbox = sandbox_from_args(args, apps)
        assert args.listen == "[::1]:0"
        assert sandbox.faults == Faults(error_rate=0.25, limits=[(600, 60), (18000, 3600)], seed=3,
                                        odd_success="no_content", echo_token=True,
                                        bots=["st-bad-*"])

    @pytest.mark.parametrize(
        "argv",
        [
            ("--listen", "0.0.0.0:9090"),
            ("--listen", "127.0.0.1"),
            ("--error-rate", "2"),
            ("--limit", "600"),
            ("--session-path", "/x"),
            ("--odd-success", "sometimes"),
        ],
        ids=["public-listen", "no-port", "rate", "limit", "path", "odd-success"],
    )
    def test_bad_flags_exit(self, argv: tuple[str, ...]) -> None:
        with pytest.raises(SystemExit):
            self.parse(*argv)
