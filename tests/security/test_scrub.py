"""Kore.ai's answers are scrubbed of anything shaped like a JWT before they reach a caller,
a log or the audit: a sandbox that echoes the token it was sent, on every route and outcome,
and the response, the audit file and the captured logs scanned for it."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from gateway.kore.client import decode_answer
from gateway.kore.scrub import REDACTED, scrub
from tests.conftest import BOT, CALLER_KEY
from tests.integration.sides import set_faults

AUTH = {"Authorization": f"Bearer {CALLER_KEY}"}
SIMPLE = f"/v1/bots/{BOT}/sessions/deactivate"
KORE = f"/api/public/bot/{BOT}/session"
BATCH = "/v1/sessions/deactivate"
ANY_JWT = re.compile(r"e[w-z][A-Za-z0-9_-]{6,}\.[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]*")
SAMPLE_JWT = ("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJhcHBJZCI6ImNzLTEiLCJzdWIiOiJ4In0."
              "QMszvgE-NLEB-HqUN0f1oQxQCFJ9pdv9NZPDf4jepFE")


class TestScrub:
    @pytest.mark.parametrize(("text", "expected"), [
        (f"bad token {SAMPLE_JWT}", f"bad token {REDACTED}"),
        (f'{{"msg":"{SAMPLE_JWT}"}}', f'{{"msg":"{REDACTED}"}}'),
        (f"{SAMPLE_JWT},{SAMPLE_JWT}", f"{REDACTED},{REDACTED}"),
        ("ewogICJhbGciOiAiSFMyNTYiCn0.eyJzdWIiOiJ4In0.c2ln", REDACTED),  # pretty-printed header
        ("eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.", REDACTED),  # alg none: empty signature
        ("a" * 20 + "." + "b" * 20 + "." + "c" * 20, REDACTED),  # opaque three-part token
        ("Invalid SDK credentials", "Invalid SDK credentials"),
        ("see https://bots.kore.ai/api/1.1 v1.2.3", "see https://bots.kore.ai/api/1.1 v1.2.3"),
        ("st-1234.session.closed", "st-1234.session.closed"),
    ], ids=["in-text", "in-json", "two", "pretty-header", "alg-none", "opaque", "no-jwt",
            "hosts-and-versions", "dotted-words"])
    def test_scrub(self, text: str, expected: str) -> None:
        assert scrub(text) == expected


def sent_tokens(sandbox: Any) -> list[str]:
    tokens = [c.headers["auth"] for c in sandbox.calls if "auth" in c.headers]
    assert tokens
    return tokens


def assert_nowhere(tokens: list[str], *texts: str) -> None:
    for text in texts:
        assert not ANY_JWT.search(text), ANY_JWT.search(text)
        for token in tokens:
            assert token not in text


def audit_text(config: Any) -> str:
    return Path(config.audit.path).read_text(encoding="utf-8")


ECHOING_FAULTS = [
    pytest.param({"fail_first": 3, "error_status": 400}, 400, "upstream_rejected", id="400"),
    pytest.param({"fail_first": 3, "error_status": 404}, 404, "upstream_rejected", id="404"),
    pytest.param({"reject_token_next": 2}, 502, "upstream_auth_failed", id="401"),
    pytest.param({"fail_first": 2, "error_status": 403}, 502, "upstream_auth_failed", id="403"),
    pytest.param({"fail_first": 3, "error_status": 503}, 502, "upstream_unavailable",
                 id="503"),
    pytest.param({"fail_first": 3, "error_status": 429}, 429, "rate_limited", id="429"),
]


class TestKoreAnswersAreScrubbed:
    @pytest.mark.parametrize(("faults", "status", "code"), ECHOING_FAULTS)
    async def test_simplified_route(self, gateway: Any, sandbox: Any, config: Any,
                                    faults: dict[str, Any], status: int, code: str) -> None:
        set_faults(sandbox, echo_token=True, **faults)
        with capture_logs() as logs:
            resp = await gateway.post(SIMPLE, json={"userId": "u-1"}, headers=AUTH)
            text = await resp.text()
        assert (resp.status, json.loads(text)["error"]["code"]) == (status, code)
        if status in (400, 404) or code == "upstream_auth_failed":
            assert f"(auth: {REDACTED})" in text  # Kore.ai's message kept, the token not
        if code == "upstream_auth_failed":  # the log line of the refused token quotes Kore.ai
            assert f"(auth: {REDACTED})" in repr(logs)
        assert_nowhere(sent_tokens(sandbox), text, audit_text(config), repr(logs))

    @pytest.mark.parametrize("status", [400, 404])
    async def test_kore_route_passthrough_body(self, gateway: Any, sandbox: Any, config: Any,
                                               status: int) -> None:
        set_faults(sandbox, echo_token=True, fail_first=1, error_status=status)
        with capture_logs() as logs:
            resp = await gateway.put(KORE, json={"userId": "u-1"}, headers=AUTH)
            body = await resp.json()
        assert resp.status == status
        [error] = body["errors"]
        reason = "Bad Request" if status == 400 else "Not Found"
        assert error["msg"] == f"{reason} (auth: {REDACTED})"
        assert_nowhere(sent_tokens(sandbox), json.dumps(body), audit_text(config), repr(logs))

    async def test_batch_item_errors(self, gateway: Any, sandbox: Any, config: Any) -> None:
        set_faults(sandbox, echo_token=True, fail_first=1, error_status=400)
        with capture_logs() as logs:
            resp = await gateway.post(BATCH, json={"items": [{"botId": BOT, "userId": "u-1"}]},
                                      headers=AUTH)
            text = await resp.text()
        assert json.loads(text)["results"][0]["status"] == 400
        assert REDACTED in text
        assert_nowhere(sent_tokens(sandbox), text, audit_text(config), repr(logs))



class TestDecodeAnswer:
    def test_json_is_parsed_after_scrubbing(self) -> None:
        raw = json.dumps({"errors": [{"msg": f"token {SAMPLE_JWT}", "code": 401}]}).encode()
        assert decode_answer(raw) == {"errors": [{"msg": f"token {REDACTED}", "code": 401}]}

    def test_text_is_scrubbed(self) -> None:
        assert decode_answer(f"<html>{SAMPLE_JWT}</html>".encode()) == f"<html>{REDACTED}</html>"

    def test_json_nested_too_deep_is_text_not_an_error(self) -> None:
        raw = b"[" * 100_000
        assert decode_answer(raw) == raw.decode()
