"""One audit record, one line, for every reader (issue 11, item 8; contract §3).

A userId holding U+2028 or a bidi control is valid input; written raw, it made 28 records read
as 30 lines to any reader that splits on Unicode line breaks. They are written as `\\uXXXX`
escapes, and the chain, computed from the parsed values, still verifies.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.cli import main
from tests.faults.kore import AUTH
from tests.integration.sides import AuditTrail

URL = "/v1/bots/st-a/sessions/deactivate"
TRICKY = ["line\u2028break", "para\u2029graph", "rtl\u202eesrever", "iso\u2066late\u2069",
          "embed\u202a\u202b\u202c\u202d", "isolates\u2067\u2068"]


def verify_exit(*argv: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as done:
        main(["audit", "verify", *argv])
    out, err = capsys.readouterr()
    return int(done.value.code or 0), out + err


async def test_every_record_is_one_line_under_splitlines(
        start_gateway: Any, audit: AuditTrail, capsys: pytest.CaptureFixture[str]) -> None:
    gateway = await start_gateway()
    for user in TRICKY:
        resp = await gateway.post(URL, json={"userId": user}, headers=AUTH)
        assert resp.status == 200, await resp.text()
    # An invalid userId (U+0085 is a C1 control) is refused, and its denied record keeps it.
    resp = await gateway.post(URL, json={"userId": "nel\x85x"}, headers=AUTH)
    assert resp.status == 400
    records = audit.expect_chain()
    assert len(records) == 2 * len(TRICKY) + 1
    text = audit.path.read_text(encoding="utf-8")
    assert len(text.splitlines()) == len(records)
    assert [json.loads(line) for line in text.splitlines()] == records
    assert [r["userId"] for r in records if r["event"] == "deactivate.completed"] == TRICKY
    assert records[-1]["userId"] == "nel\x85x"
    assert "\\u2028" in text and "\\u202e" in text and "\\u0085" in text
    code, output = verify_exit(str(audit.path), capsys=capsys)
    assert code == 0 and "intact" in output
