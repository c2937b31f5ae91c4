"""gateway.jsoncodec: byte for byte what the standard library writes, whichever path runs."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import jsoncodec
from gateway.audit.log import canonical

SCALARS = (st.none() | st.booleans() | st.text()
           | st.integers(min_value=-(2**70), max_value=2**70)
           | st.floats(allow_nan=False, allow_infinity=False))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12)
RECORDS = st.dictionaries(st.text(max_size=12), VALUES, max_size=12)


def stdlib_canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class TestCanonical:
    @settings(max_examples=150, deadline=None)
    @given(RECORDS)
    def test_equals_the_contract_definition(self, record: dict[str, Any]) -> None:
        assert jsoncodec.canonical(record) == stdlib_canonical(record)

    def test_every_code_point_is_written_as_the_standard_library_writes_it(self) -> None:
        points = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
        for start in range(0, len(points), 4096):
            record = {"userId": "".join(map(chr, points[start:start + 4096]))}
            assert jsoncodec.canonical(record) == stdlib_canonical(record)

    @pytest.mark.parametrize("value", [
        0.0, -0.0, 1e-4, 9.5e-5, 1e-5, 1e15, 1e16, 1.5e16, 1e300, 5e-324, 4.358, 0.1 + 0.2,
        2**63 - 1, -(2**63), 2**64 - 1, 2**64, -(2**63) - 1, 10**40, True, None,
    ])
    def test_numbers_at_the_edges(self, value: Any) -> None:
        record = {"durationMs": value, "nested": [value, {"v": value}]}
        assert jsoncodec.canonical(record) == stdlib_canonical(record)

    @pytest.mark.parametrize("value", [
        0.0, -0.0, 1e-4, 9.5e-5, 1e-5, 1e15, 1e16, 1.5e16, 1e300, 5e-324, 4.358, 2**64, 10**40,
    ])
    def test_numbers_at_the_edges_in_a_flat_record(self, value: Any) -> None:
        """A record of scalars only, as the audit's are, is judged by its values' types and
        then each float alone: every float is looked at, wherever it stands."""
        record = {"event": "deactivate.completed", "durationMs": 1.5, "seq": 7, "ok": True,
                  "error": None, "z": value}
        assert jsoncodec.canonical(record) == stdlib_canonical(record)
        assert jsoncodec.canonical([value, "a", 1.5]) == stdlib_canonical([value, "a", 1.5])

    def test_nan_and_infinity_follow_the_standard_library(self) -> None:
        record = {"a": math.nan, "b": math.inf, "c": -math.inf}
        assert jsoncodec.canonical(record) == stdlib_canonical(record) == \
            '{"a":NaN,"b":Infinity,"c":-Infinity}'

    def test_subclasses_and_odd_keys_fall_back(self) -> None:
        class Text(str):
            pass

        record: dict[Any, Any] = {Text("k"): Text("v"), "é": "ü", "𝄞": "z", "~": 1}
        assert jsoncodec.canonical(record) == stdlib_canonical(record)
        int_keys = {2: "b", 1: "a"}
        assert jsoncodec.canonical(int_keys) == stdlib_canonical(int_keys) == '{"1":"a","2":"b"}'

    def test_audit_canonical_leaves_out_the_hash(self) -> None:
        record = {"seq": 1, "prev": "0" * 64, "hash": "abc", "durationMs": 1.25}
        assert canonical(record) == '{"durationMs":1.25,"prev":"' + "0" * 64 + '","seq":1}'


class TestCanonicalLine:
    @settings(max_examples=150, deadline=None)
    @given(RECORDS)
    def test_equals_the_contract_definition_encoded(self, record: dict[str, Any]) -> None:
        assert jsoncodec.canonical_line(record) == stdlib_canonical(record).encode("utf-8")

    def test_sorts_the_keys(self) -> None:
        assert jsoncodec.canonical_line({"ts": "t", "seq": 1, "a": None}) == \
            b'{"a":null,"seq":1,"ts":"t"}'

    @pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
    def test_refuses_nan_and_infinity(self, value: float) -> None:
        with pytest.raises(ValueError):
            jsoncodec.canonical_line({"durationMs": value})

    def test_refuses_a_lone_surrogate(self) -> None:
        with pytest.raises(ValueError):
            jsoncodec.canonical_line({"userId": "a\ud800b"})

    def test_refuses_what_json_cannot_encode(self) -> None:
        with pytest.raises(TypeError):
            jsoncodec.canonical_line({"x": object()})


class TestCompact:
    @settings(max_examples=100, deadline=None)
    @given(RECORDS)
    def test_equals_the_standard_library(self, record: dict[str, Any]) -> None:
        expected = json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        assert jsoncodec.compact(record) == expected

    def test_the_upstream_body(self) -> None:
        body = {"userId": "jane@example.com", "status": "inactive", "channel": "rtm"}
        assert jsoncodec.compact(body) == \
            b'{"userId":"jane@example.com","status":"inactive","channel":"rtm"}'


UNSAFE = ["\u2028", "\u2029", *map(chr, range(0x202A, 0x202F)), *map(chr, range(0x2066, 0x206A)),
          "\x85"]


class TestOneLine:
    @pytest.mark.parametrize("char", UNSAFE, ids=[f"U+{ord(c):04X}" for c in UNSAFE])
    def test_escapes_line_breaks_and_bidi_controls(self, char: str) -> None:
        record = {"userId": f"a{char}b", f"k{char}": char}
        line = jsoncodec.one_line(jsoncodec.canonical_line(record))
        assert line.decode("utf-8").splitlines() == [line.decode("utf-8").rstrip("\n")]
        assert f"\\u{ord(char):04x}".encode() in line and char.encode() not in line
        assert json.loads(line) == record  # the same values: the chain hash is unchanged

    @settings(max_examples=150, deadline=None)
    @given(RECORDS)
    def test_parses_to_the_same_values(self, record: dict[str, Any]) -> None:
        line = jsoncodec.one_line(stdlib_canonical(record).encode("utf-8"))
        assert json.loads(line) == json.loads(stdlib_canonical(record))
        assert not any(char.encode() in line for char in UNSAFE)

    def test_neighbours_are_kept_as_they_are(self) -> None:
        text = "\u2027\u202f\u2065\u206a\u0084\u0086’é"
        line = jsoncodec.canonical_line({"u": text})
        assert jsoncodec.one_line(line) == line

    def test_ascii_is_returned_unchanged(self) -> None:
        line = jsoncodec.canonical_line({"userId": "u-1"})
        assert jsoncodec.one_line(line) is line
