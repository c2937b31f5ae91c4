"""Input rules of the contract: path and JSON body → `Deactivation`, or `InvalidRequest`.

Every message names the field and the rule. Knows nothing of aiohttp.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.errors import InvalidRequest

MAX_USER_ID_CHARS = 256
MAX_JSON_DEPTH = 32
KNOWN_BOTS = 16_384  # valid bot IDs a `Validator` remembers (then it starts again)
# Kore.ai's channel types as it spells them (`rtm`, `ivrVoice`, `msteams`) and webhook instance
# IDs (`ivrInst-<uuid>`); passed upstream unchanged, case kept.
CHANNEL_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
# Unicode category Cc is exactly C0, DEL and C1; a regex scans in C, not a character at a time.
CONTROL_CHARS = re.compile("[\x00-\x1f\x7f-\x9f]")
_SURROGATES = re.compile("[\ud800-\udfff]")
_SIMPLE_KEYS = frozenset({"userId", "channel"})
_KORE_KEYS = frozenset({"userId", "status", "channel"})
_BATCH_ITEM_KEYS = frozenset({"botId", "userId", "channel"})


@dataclass(frozen=True, slots=True)
class Deactivation:
    bot_id: str
    user_id: str
    channel: str | None = None


def parse_json(raw: bytes) -> Any:
    """Strict JSON: UTF-8, no NaN/Infinity, bounded nesting and number size."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("body: not valid UTF-8") from None
    if _too_deep(text):
        raise InvalidRequest(f"body: JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    try:
        return _DECODER.decode(text)
    except (ValueError, RecursionError) as exc:
        raise InvalidRequest(f"body: not valid JSON ({_short(exc)})") from None


def _short(exc: Exception) -> str:
    text = str(exc)
    if "integer string conversion" in text:
        return "number too large"
    return text.split(":")[0][:80]


def _finite_float(text: str) -> float:
    # 1e999 would become inf: not JSON any more once echoed back or written to the audit.
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("number too large")
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


# json.loads with these arguments would build a new decoder for every body.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)


def _too_deep(text: str) -> bool:
    """Cheap bracket scan so a hostile body never reaches the recursive decoder."""
    if text.count("[") + text.count("{") <= MAX_JSON_DEPTH:
        return False  # too few brackets to nest that deep: no need to walk it character by character
    depth = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return True
        elif ch in "]}":
            depth -= 1
    return False


class Validator:
    """The contract's input rules, with the configured `bot_id_pattern`."""

    def __init__(self, bot_id_pattern: str) -> None:
        self._bot_id = re.compile(bot_id_pattern)
        self._known: dict[str, None] = {}  # bot IDs found valid (bounded: `KNOWN_BOTS`)

    def known_bot(self, value: Any) -> bool:
        """True when `value` is a valid bot ID (`bot_id` accepts it); remembered, so a bot
        called again costs one lookup. False for anything `bot_id` would refuse."""
        if type(value) is not str:
            return False
        if value in self._known:
            return True
        try:
            self.bot_id(value)
        except InvalidRequest:
            return False
        if len(self._known) >= KNOWN_BOTS:
            self._known.clear()
        self._known[value] = None
        return True

    def bot_id(self, value: Any, field: str = "botId") -> str:
        if not isinstance(value, str) or not value:
            raise InvalidRequest(f"{field}: required, a string")
        if value in (".", ".."):
            raise InvalidRequest(f'{field}: "." and ".." are never valid bot IDs')
        if not self._bot_id.fullmatch(value):
            raise InvalidRequest(f"{field}: must match {self._bot_id.pattern}")
        if _has_lone_surrogate(value):  # cannot be percent-encoded upstream, whatever the pattern
            raise InvalidRequest(f"{field}: must be valid Unicode (lone surrogate)")
        return value

    def simplified(self, bot_id: str, body: Any) -> Deactivation:
        """`POST /v1/bots/{botId}/sessions/deactivate` with `{"userId", "channel"?}`."""
        fields = _object(body, _SIMPLE_KEYS)
        return Deactivation(bot_id, user_id(fields), channel(fields))

    def kore_compatible(self, bot_id: str, body: Any) -> Deactivation:
        """Kore.ai's own body: `{"userId", "status"?: "inactive", "channel"?}`."""
        fields = _object(body, _KORE_KEYS)
        if "status" in fields and fields["status"] != "inactive":
            raise InvalidRequest('status: must be "inactive"')
        return Deactivation(bot_id, user_id(fields), channel(fields))

    def batch_item(self, item: Any, index: int,
                   authorize: Callable[[str], None] | None = None) -> Deactivation:
        """One batch item. `authorize(botId)` runs once its botId is valid and before the
        rest is checked, as on the single route (whose botId is in the path): an item the
        caller may not send gets the 403 it would get alone, whatever else is wrong in it."""
        prefix = f"items[{index}]."
        if not isinstance(item, dict):
            raise InvalidRequest(f"items[{index}]: must be a JSON object")
        bot = self.bot_id(item.get("botId"), prefix + "botId")
        if authorize is not None:
            authorize(bot)
        fields = _object(item, _BATCH_ITEM_KEYS, prefix)
        return Deactivation(bot, user_id(fields, prefix), channel(fields, prefix))


def plain_simplified(bot_id: str, raw: bytes) -> Deactivation | None:
    """The common body of the simplified route, `{"userId": "…", "channel": "…"}` (channel
    optional) and valid as it stands, read in one step; None for any other body, which the
    full rules (`parse_json`, `Validator.simplified`) then judge, with their own error.

    For a body it accepts, the result is what the full rules give: orjson reads such a document
    as the standard library does (a JSON object of strings; the last of repeated keys wins;
    no lone surrogate, which orjson refuses), and the checks are `user_id`'s and `channel`'s.
    """
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if type(body) is not dict:
        return None
    user_id, channel = body.get("userId"), body.get("channel")
    if (type(user_id) is not str or not 0 < len(user_id) <= MAX_USER_ID_CHARS
            or len(body) != (2 if "channel" in body else 1)
            or CONTROL_CHARS.search(user_id) is not None
            or channel is not None and (type(channel) is not str
                                        or CHANNEL_PATTERN.fullmatch(channel) is None)
            or channel is None and "channel" in body):
        return None
    return Deactivation(bot_id, user_id, channel)


def _object(body: Any, allowed: frozenset[str], prefix: str = "") -> dict[str, Any]:
    if not isinstance(body, dict):
        where = prefix.rstrip(".") or "body"
        raise InvalidRequest(f"{where}: must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise InvalidRequest(f"{prefix}{unknown[0]}: unknown field")
    return body


def user_id(fields: dict[str, Any], prefix: str = "") -> str:
    value = fields.get("userId")
    name = prefix + "userId"
    if not isinstance(value, str):
        raise InvalidRequest(f"{name}: required, a string of 1–{MAX_USER_ID_CHARS} characters")
    if not 1 <= len(value) <= MAX_USER_ID_CHARS:
        raise InvalidRequest(f"{name}: 1–{MAX_USER_ID_CHARS} characters")
    if CONTROL_CHARS.search(value):
        raise InvalidRequest(f"{name}: must not contain control characters")
    if _has_lone_surrogate(value):
        raise InvalidRequest(f"{name}: must be valid Unicode (lone surrogate)")
    return value


def _has_lone_surrogate(value: str) -> bool:
    return _SURROGATES.search(value) is not None


def channel(fields: dict[str, Any], prefix: str = "") -> str | None:
    if "channel" not in fields:
        return None
    value = fields["channel"]
    if not isinstance(value, str) or not CHANNEL_PATTERN.fullmatch(value):
        raise InvalidRequest(f"{prefix}channel: must match ^{CHANNEL_PATTERN.pattern}$")
    return value
