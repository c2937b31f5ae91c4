"""Tests for gateway.validation: the contract's input rules and strict JSON parsing."""

from __future__ import annotations

import json
import re
import unicodedata
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.config.model import DEFAULT_BOT_ID_PATTERN
from gateway.errors import InvalidRequest
from gateway.validation import MAX_JSON_DEPTH, Deactivation, Validator, parse_json

CHANNEL_RULE = re.compile(r"[A-Za-z0-9_-]{1,64}")  # matched in full
BOT = "st-test-bot"


@pytest.fixture
def validator() -> Validator:
    return Validator(DEFAULT_BOT_ID_PATTERN)


def is_cc(ch: str) -> bool:
    return unicodedata.category(ch) == "Cc"


def nested_list(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value


# Unicode category Cc is exactly C0, DEL and C1.
CC_CHARS = [chr(c) for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))]


def rejected(call: Any, *args: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        call(*args)
    assert caught.value.status == 400 and caught.value.code == "invalid_request"
    return caught.value


class TestBotId:
    @pytest.mark.parametrize("bot_id", [
        "st-a", "st-" + "a" * 100, "st-0123-ABC-def", "st--",
    ], ids=["short", "longest", "mixed", "dashes"])
    def test_accepted(self, validator: Validator, bot_id: str) -> None:
        assert validator.bot_id(bot_id) == bot_id

    @pytest.mark.parametrize("bot_id", [
        "", "st-", "st-" + "a" * 101, "xt-abc", "ST-abc", "st-a/b", "st-a b", "st-a.b",
        "st-abc\n", "\nst-abc", "st-abc%2F", "st-ä", ".", "..", None, 42, ["st-a"],
    ], ids=["empty", "no-suffix", "too-long", "wrong-prefix", "upper-prefix", "slash", "space",
            "dot", "trailing-newline", "leading-newline", "percent", "non-ascii", "dot-only",
            "dot-dot", "none", "int", "list"])
    def test_rejected_naming_the_field(self, validator: Validator, bot_id: Any) -> None:
        exc = rejected(validator.bot_id, bot_id)
        assert exc.message.startswith("botId: ")

    @pytest.mark.parametrize("pattern", [".*", "^.*$", r"[.]{1,2}", r"\.+", ".{0,5}"])
    @pytest.mark.parametrize("bot_id", [".", ".."])
    def test_dot_segments_always_rejected(self, pattern: str, bot_id: str) -> None:
        rejected(Validator(pattern).bot_id, bot_id)

    def test_configured_pattern_is_used(self) -> None:
        validator = Validator(r"^bot_[0-9]+$")
        assert validator.bot_id("bot_42") == "bot_42"
        rejected(validator.bot_id, "st-abc")

    def test_pattern_must_match_whole_value(self) -> None:
        """A pattern without anchors still has to match the whole botId."""
        validator = Validator(r"st-[a-z]+")
        rejected(validator.bot_id, "st-abc/../x")
        rejected(validator.bot_id, "xx-st-abc")

    def test_custom_field_name(self, validator: Validator) -> None:
        assert rejected(validator.bot_id, "bad", "items[2].botId").message.startswith(
            "items[2].botId: ")


# (id, body, the field named in the message) for the simplified route
SIMPLE_REJECTED: list[tuple[str, Any, str]] = [
    ("not-object-list", [], "body"),
    ("not-object-string", "u-1", "body"),
    ("not-object-null", None, "body"),
    ("user-id-missing", {}, "userId"),
    ("user-id-null", {"userId": None}, "userId"),
    ("user-id-int", {"userId": 7}, "userId"),
    ("user-id-bool", {"userId": True}, "userId"),
    ("user-id-list", {"userId": ["u"]}, "userId"),
    ("user-id-empty", {"userId": ""}, "userId"),
    ("user-id-257", {"userId": "u" * 257}, "userId"),
    ("user-id-nul", {"userId": "u\x00"}, "userId"),
    ("user-id-newline", {"userId": "u\n"}, "userId"),
    ("user-id-cr", {"userId": "a\rb"}, "userId"),
    ("user-id-tab", {"userId": "a\tb"}, "userId"),
    ("user-id-esc", {"userId": "\x1b[31m"}, "userId"),
    ("user-id-del", {"userId": "a\x7f"}, "userId"),
    ("user-id-c1", {"userId": "a\x85"}, "userId"),
    ("user-id-c1-last", {"userId": "a\x9f"}, "userId"),
    ("user-id-lone-surrogate", {"userId": "a\ud800"}, "userId"),
    ("channel-empty", {"userId": "u", "channel": ""}, "channel"),
    ("channel-65", {"userId": "u", "channel": "a" * 65}, "channel"),
    ("channel-dot", {"userId": "u", "channel": "ms.teams"}, "channel"),
    ("channel-slash", {"userId": "u", "channel": "ivr/voice"}, "channel"),
    ("channel-fullwidth", {"userId": "u", "channel": "ｒｔｍ"}, "channel"),
    ("channel-trailing-newline", {"userId": "u", "channel": "rtm\n"}, "channel"),
    ("channel-space", {"userId": "u", "channel": "rtm "}, "channel"),
    ("channel-non-ascii", {"userId": "u", "channel": "rtmé"}, "channel"),
    ("channel-int", {"userId": "u", "channel": 5}, "channel"),
    ("channel-bool", {"userId": "u", "channel": False}, "channel"),
    ("unknown-field", {"userId": "u", "user": "x"}, "user"),
    ("status-on-simple-route", {"userId": "u", "status": "inactive"}, "status"),
    ("bot-id-in-body", {"userId": "u", "botId": BOT}, "botId"),
]

SIMPLE_ACCEPTED: list[tuple[str, Any, Deactivation]] = [
    ("user-only", {"userId": "u-1"}, Deactivation(BOT, "u-1")),
    ("with-channel", {"userId": "u-1", "channel": "rtm"}, Deactivation(BOT, "u-1", "rtm")),
    ("user-256", {"userId": "u" * 256}, Deactivation(BOT, "u" * 256)),
    ("user-unicode", {"userId": "ユーザー😀"}, Deactivation(BOT, "ユーザー😀")),
    ("user-spaces", {"userId": " a b "}, Deactivation(BOT, " a b ")),
    ("user-format-char", {"userId": "a\u200bb"}, Deactivation(BOT, "a\u200bb")),
    ("user-line-separator", {"userId": "a\u2028b"}, Deactivation(BOT, "a\u2028b")),
    ("channel-32", {"userId": "u", "channel": "a_1" * 10 + "xy"},
     Deactivation(BOT, "u", "a_1" * 10 + "xy")),
    ("channel-one-char", {"userId": "u", "channel": "_"}, Deactivation(BOT, "u", "_")),
    ("channel-64", {"userId": "u", "channel": "a-" * 32}, Deactivation(BOT, "u", "a-" * 32)),
    ("channel-camel-case", {"userId": "u", "channel": "ivrVoice"},
     Deactivation(BOT, "u", "ivrVoice")),
    ("channel-upper", {"userId": "u", "channel": "RTM"}, Deactivation(BOT, "u", "RTM")),
    ("channel-dash", {"userId": "u", "channel": "web-sdk"}, Deactivation(BOT, "u", "web-sdk")),
    ("channel-webhook-instance",
     {"userId": "u", "channel": "ivrInst-6ad846f2-75b0-55a1-8029-aab86de09817"},
     Deactivation(BOT, "u", "ivrInst-6ad846f2-75b0-55a1-8029-aab86de09817")),
]


class TestSimplifiedRoute:
    @pytest.mark.parametrize(("body", "field"), [c[1:] for c in SIMPLE_REJECTED],
                             ids=[c[0] for c in SIMPLE_REJECTED])
    def test_rejected_naming_the_field(self, validator: Validator, body: Any, field: str) -> None:
        exc = rejected(validator.simplified, BOT, body)
        assert exc.message.startswith(f"{field}: ")

    @pytest.mark.parametrize(("body", "expected"), [c[1:] for c in SIMPLE_ACCEPTED],
                             ids=[c[0] for c in SIMPLE_ACCEPTED])
    def test_accepted(self, validator: Validator, body: Any, expected: Deactivation) -> None:
        assert validator.simplified(BOT, body) == expected

    def test_message_never_echoes_the_value(self, validator: Validator) -> None:
        exc = rejected(validator.simplified, BOT, {"userId": "secret-ish\x00value"})
        assert "secret-ish" not in exc.message


class TestKoreCompatibleRoute:
    @pytest.mark.parametrize(("body", "expected"), [
        ({"userId": "u"}, Deactivation(BOT, "u")),
        ({"userId": "u", "status": "inactive"}, Deactivation(BOT, "u")),
        ({"userId": "u", "status": "inactive", "channel": "rtm"}, Deactivation(BOT, "u", "rtm")),
        ({"userId": "u", "channel": "ivrVoice"}, Deactivation(BOT, "u", "ivrVoice")),
    ], ids=["no-status", "status-inactive", "all-fields", "camel-case-channel"])
    def test_accepted(self, validator: Validator, body: Any, expected: Deactivation) -> None:
        assert validator.kore_compatible(BOT, body) == expected

    @pytest.mark.parametrize(("body", "field"), [
        ({"userId": "u", "status": "active"}, "status"),
        ({"userId": "u", "status": "INACTIVE"}, "status"),
        ({"userId": "u", "status": ""}, "status"),
        ({"userId": "u", "status": None}, "status"),
        ({"userId": "u", "status": True}, "status"),
        ({"userId": "u", "auth": "jwt"}, "auth"),
        ({"status": "inactive"}, "userId"),
        ({"userId": "u", "channel": "Web sdk"}, "channel"),
        ([{"userId": "u"}], "body"),
    ], ids=["active", "upper-case", "empty", "null", "bool", "unknown-field", "no-user",
            "bad-channel", "list-body"])
    def test_rejected_naming_the_field(self, validator: Validator, body: Any, field: str) -> None:
        assert rejected(validator.kore_compatible, BOT, body).message.startswith(f"{field}: ")


class TestBatchItem:
    @pytest.mark.parametrize("channel", ["rtm", "ivrVoice",
                                         "ivrInst-6ad846f2-75b0-55a1-8029-aab86de09817"])
    def test_accepted(self, validator: Validator, channel: str) -> None:
        item = {"botId": BOT, "userId": "u", "channel": channel}
        assert validator.batch_item(item, 0) == Deactivation(BOT, "u", channel)

    @pytest.mark.parametrize(("item", "field"), [
        ({"userId": "u"}, "items[3].botId"),
        ({"botId": "..", "userId": "u"}, "items[3].botId"),
        ({"botId": "bad", "userId": "u"}, "items[3].botId"),
        ({"botId": BOT}, "items[3].userId"),
        ({"botId": BOT, "userId": "u\n"}, "items[3].userId"),
        ({"botId": BOT, "userId": "u", "channel": "X.Y"}, "items[3].channel"),
        ({"botId": BOT, "userId": "u", "status": "inactive"}, "items[3].status"),
        ("st-a", "items[3]"),
        (None, "items[3]"),
    ], ids=["no-bot", "dot-dot-bot", "bad-bot", "no-user", "control-user", "bad-channel",
            "unknown-field", "string-item", "null-item"])
    def test_rejected_naming_index_and_field(self, validator: Validator, item: Any,
                                             field: str) -> None:
        assert rejected(validator.batch_item, item, 3).message.startswith(f"{field}: ")


class TestParseJson:
    @pytest.mark.parametrize(("raw", "expected"), [
        (b'{"userId": "u"}', {"userId": "u"}),
        (b'  {"userId":"\\u00e9"}\n', {"userId": "é"}),
        ('{"userId": "ü"}'.encode(), {"userId": "ü"}),
        (b"[]", []),
        (b'"text"', "text"),
        (b"1" * 4000, int("1" * 4000)),
        (b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH, nested_list(MAX_JSON_DEPTH)),
        (json.dumps({"userId": "[" * 500}).encode(), {"userId": "[" * 500}),
        (json.dumps({"userId": '\\"[[[[' * 50}).encode(), {"userId": '\\"[[[[' * 50}),
    ], ids=["object", "escape", "utf8", "list", "string", "4000-digits", "max-depth",
            "brackets-in-string", "escaped-quotes-in-string"])
    def test_accepted(self, raw: bytes, expected: Any) -> None:
        assert parse_json(raw) == expected

    @pytest.mark.parametrize("raw", [
        b"",
        b"   ",
        b"not json",
        b'{"userId": "u"',
        b'{"userId": "u"} x',
        b"{'userId': 'u'}",
        b'{"userId": NaN}',
        b'{"n": Infinity}',
        b'{"n": -Infinity}',
        b'{"userId": "\xff"}',
        b"\xef\xbb\xbf{}",
        '{"userId": "u"}'.encode("utf-16"),
        b"1" * 5000,
        b'{"n": ' + b"9" * 5000 + b"}",
        b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1),
        b"[" * 100_000,
        b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    ], ids=["empty", "blank", "text", "truncated", "trailing-garbage", "single-quotes", "nan",
            "infinity", "minus-infinity", "bad-utf8", "bom", "utf16", "5000-digit-int",
            "5000-digit-member", "depth-plus-one", "deep-open", "deep-objects"])
    def test_rejected(self, raw: bytes) -> None:
        exc = rejected(parse_json, raw)
        assert exc.message.startswith("body: ")

    def test_cc_is_c0_del_c1(self) -> None:
        assert [chr(c) for c in range(0x110000) if is_cc(chr(c))] == CC_CHARS

    def test_huge_number_message_is_short(self) -> None:
        exc = rejected(parse_json, b"7" * 5000)
        assert "number too large" in exc.message and len(exc.message) < 120


def _no_cc_text(min_size: int, max_size: int) -> st.SearchStrategy[str]:
    return st.text(st.characters(exclude_categories=("Cc", "Cs")),
                   min_size=min_size, max_size=max_size)


class TestProperties:
    @given(user=_no_cc_text(1, 256))
    @example(user="x" * 256)
    @example(user="\u00a0")
    @settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
    def test_any_user_id_without_control_chars_accepted(self, validator: Validator,
                                                        user: str) -> None:
        assert validator.simplified(BOT, {"userId": user}).user_id == user

    @given(before=_no_cc_text(0, 128),
           cc=st.sampled_from(CC_CHARS),
           after=_no_cc_text(0, 127))
    @example(before="", cc="\x00", after="")
    @example(before="a", cc="\x7f", after="")
    @example(before="a", cc="\x80", after="b")
    @settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
    def test_any_user_id_with_a_control_char_rejected(self, validator: Validator, before: str,
                                                      cc: str, after: str) -> None:
        assert is_cc(cc)
        exc = rejected(validator.simplified, BOT, {"userId": before + cc + after})
        assert exc.message.startswith("userId: ")

    @given(channel=st.one_of(
        st.text(max_size=70),
        st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True),
        st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True).map(lambda c: c + "\n"),
        st.text(alphabet="abcxyzIVR019_-.\n ", max_size=66),
    ))
    @example(channel="rtm\n")
    @example(channel="ivrVoice")
    @example(channel="a" * 64)
    @example(channel="a" * 65)
    @settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
    def test_channel_accepted_iff_it_matches_the_rule(self, validator: Validator,
                                                      channel: str) -> None:
        body = {"userId": "u", "channel": channel}
        if CHANNEL_RULE.fullmatch(channel):
            assert validator.simplified(BOT, body).channel == channel
        else:
            rejected(validator.simplified, BOT, body)

    @given(pattern=st.sampled_from([".*", "^.*$", ".+", r"[.]+", r"\.{1,2}", "(?s).*",
                                    DEFAULT_BOT_ID_PATTERN]),
           bot_id=st.sampled_from([".", ".."]))
    def test_dot_bot_ids_rejected_whatever_the_pattern(self, pattern: str, bot_id: str) -> None:
        rejected(Validator(pattern).bot_id, bot_id)

    @given(raw=st.binary(max_size=512))
    @example(raw=b"[" * 10_000)
    @example(raw=b"1" * 5000)
    @example(raw=b'"\\ud800"')
    @example(raw=b"\x00")
    def test_parse_json_raises_only_invalid_request(self, raw: bytes) -> None:
        try:
            parse_json(raw)
        except InvalidRequest:
            pass

    @given(text=st.text(max_size=200))
    def test_parse_json_text_raises_only_invalid_request(self, text: str) -> None:
        try:
            parse_json(text.encode("utf-8", "surrogatepass"))
        except InvalidRequest:
            pass

    @given(value=st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=20)
        | st.floats(allow_nan=False, allow_infinity=False),
        lambda children: st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=8), children, max_size=4),
        max_leaves=20))
    def test_parse_json_round_trips_ordinary_json(self, value: Any) -> None:
        assert parse_json(json.dumps(value).encode("utf-8")) == value


class TestCharacterScans:
    """The userId scans are regexes; they must agree with Unicode's own categories."""

    def test_control_chars_are_exactly_category_cc(self) -> None:
        import unicodedata

        from gateway.validation import CONTROL_CHARS

        for point in range(0x110000):
            ch = chr(point)
            assert bool(CONTROL_CHARS.match(ch)) == (unicodedata.category(ch) == "Cc"), point


def test_null_channel_is_refused_not_taken_for_none() -> None:
    """`channel` is optional as a key; when present it must be a string matching the rule."""
    with pytest.raises(InvalidRequest, match="channel"):
        Validator(r"^st-[A-Za-z0-9-]{1,100}$").simplified("st-1", {"userId": "u", "channel": None})
