"""JSON text byte-identical to the standard library's, produced by orjson where that is proven.

The audit chain hashes `json.dumps(record, sort_keys=True, separators=(",", ":"),
ensure_ascii=False)` (the contract's definition), so a faster encoder may only be used where
its output is the same, byte for byte. orjson's is for dicts (str keys, which both sort by code
point) and lists of `str`, `bool`, `None`, `int`, and `float` in the range where both print the
shortest round-trip digits in the same notation. Anything else, and any orjson error (an int
past 64 bits, a lone surrogate), goes to the standard library: results never depend on which
path ran. `tests/test_jsoncodec.py` checks the equivalence.

`one_line` escapes what some readers take for a line break, or a change of text direction,
in encoded JSON: the text still parses to the same values.
"""

from __future__ import annotations

import json
import re
from types import NoneType
from typing import Any

import orjson

_MAX_DEPTH = 16
_SCALARS = frozenset({str, int, bool, type(None)})  # an int past 64 bits makes orjson raise
_CONTAINERS = frozenset({dict, list})
_FLOAT_LOW, _FLOAT_HIGH = 1e-4, 1e16  # repr() switches to exponent notation outside this range


def canonical(obj: Any) -> str:
    """`json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)`."""
    if _plain(obj, 0):
        try:
            return str(orjson.dumps(obj, option=orjson.OPT_SORT_KEYS), "utf-8")
        except orjson.JSONEncodeError:
            pass
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical_line(obj: Any) -> bytes:
    """`canonical(obj)` UTF-8 encoded, refusing what a JSON line may not hold (NaN,
    infinities: ValueError) and what UTF-8 cannot carry (a lone surrogate)."""
    if _plain(obj, 0):
        try:
            return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)
        except orjson.JSONEncodeError:
            pass
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def compact(obj: Any) -> bytes:
    """`json.dumps(obj, ensure_ascii=False, separators=(",", ":"))`, UTF-8 encoded."""
    if _plain(obj, 0):
        try:
            return orjson.dumps(obj)
        except orjson.JSONEncodeError:
            pass
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


# U+2028, U+2029 (line and paragraph separators), the bidi controls U+202A–U+202E and
# U+2066–U+2069, and U+0085 (NEL, a line break to `str.splitlines()`), as UTF-8. Each starts
# with a lead byte (C2, E2), so a match is never part of another character.
_LINE_UNSAFE = re.compile(rb"\xe2\x80[\xa8-\xae]|\xe2\x81[\xa6-\xa9]|\xc2\x85")
_LINE_UNSAFE_LEADS = (b"\xe2\x80", b"\xe2\x81", b"\xc2\x85")


def one_line(data: bytes) -> bytes:
    """UTF-8 JSON `data` with the characters above written as `\\uXXXX` escapes.

    JSON's structure is ASCII, so they can only occur inside strings, where the escape parses
    to the same character. Nearly free for ASCII data, the common case."""
    if data.isascii() or not any(lead in data for lead in _LINE_UNSAFE_LEADS):
        return data
    return _LINE_UNSAFE.sub(_escape, data)


def _escape(found: re.Match[bytes]) -> bytes:
    return b"\\u%04x" % ord(found[0].decode("utf-8"))


def _plain(obj: Any, depth: int) -> bool:
    """True when orjson's output for `obj` is known to equal the standard library's.

    Keys need no check: orjson refuses a non-str key (and the standard library takes over)."""
    kind = type(obj)
    if kind is dict:
        values: Any = obj.values()
    elif kind is list:
        values = obj
    else:
        return kind in _SCALARS or kind is float and _same_float(obj)
    for value in values:  # a plain loop: this runs twice for every audit record
        kind = type(value)
        # `_SCALARS` spelled out: identity tests are cheaper than hashing the type for a set.
        if kind is str or kind is NoneType or kind is int or kind is bool:
            continue
        if kind is float:
            if not _same_float(value):
                return False
        elif kind not in _CONTAINERS or depth >= _MAX_DEPTH or not _plain(value, depth + 1):
            return False
    return True


def _same_float(value: float) -> bool:
    return value == 0.0 or _FLOAT_LOW <= abs(value) < _FLOAT_HIGH
