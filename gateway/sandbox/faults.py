"""The sandbox's fault knobs: `Faults` and the check of every value, shared by
PUT /__sandbox/faults and the `kore-gateway sandbox` flags. Firing them is `sandbox.py`'s.

Rate limiting as Kore.ai documents it (docs/xo/apis/automation/rate-limit.md in the public
Koredotcom/docs repository): rolling 60 s and 1 h windows per bot, checked together, and a
refused call answered with "Rate limit for this API has been reached. Please try again after
some time." and no status or `Retry-After` documented. `LIMIT_PRESETS` are that page's two
per-bot rows that can apply to the session API; `limit_answer = "kore"` answers that message
without `Retry-After`, on `limit_status` (429 unless told).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Faults:
    """Injected faults; every default is "no fault". Mutable at run time."""

    latency_ms: float = 0.0
    error_status: int = 500  # the status of fail_first and error_rate
    error_rate: float = 0.0
    fail_first: int = 0  # counts down as it fires
    rate_429: float = 0.0
    retry_after_s: float = 1.0  # sent with rate_429, rounded up to whole seconds
    drop_rate: float = 0.0
    reject_token_next: int = 0  # counts down as it fires
    limits: list[tuple[int, float]] = field(default_factory=list)  # per bot: (calls, per_s)
    seed: int | None = None
    # How rate_429 and limits answer: "retry-after" (429 "Too Many Requests" + Retry-After)
    # or "kore" (Kore.ai's documented message, no Retry-After), on `limit_status`.
    limit_answer: str = "retry-after"
    limit_status: int = 429
    retry_after_header: str | None = None  # sent verbatim as Retry-After, not retry_after_s
    limit_scale: float = 1.0  # every window of `limits` lasts per_s * limit_scale (tests)
    odd_success: str = ""  # a call Kore.ai accepts is answered with an ODD_SUCCESS body instead
    echo_token: bool = False  # error answers quote the `auth` JWT they were sent
    bots: list[str] = field(default_factory=list)  # botId globs the faults fire for; [] = all


# Answers a gateway must not take for `{"success": true}`: an empty 200, a 204 and a string.
ODD_SUCCESS = ("empty", "no_content", "string_true")


class FaultError(Exception):
    """A fault value refused; the message names the field and the rule."""


def number_in(low: float, high: float = math.inf) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        if isinstance(value, bool):
            raise TypeError("must be a number")
        number = float(value)
        if not (math.isfinite(number) and low <= number <= high):
            raise ValueError(f"must be a number from {low:g} to {high:g}")
        return number

    return check


def integer_in(low: int, high: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError("must be an integer")
        number = int(value)
        if not low <= number <= high:
            raise ValueError(f"must be an integer from {low} to {high}")
        return number

    return check


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError("must be true or false")
    return value


def _odd_success(value: Any) -> str:
    if value not in ("", *ODD_SUCCESS):
        raise ValueError(f"must be one of {', '.join(ODD_SUCCESS)} (or \"\" for none)")
    return str(value)


def _seed(value: Any) -> int | None:
    return None if value is None else integer_in(-(2**63), 2**63 - 1)(value)


def parse_limit(item: Any) -> tuple[int, float]:
    """One window: "CALLS/PER_S", [calls, per_s] or {"calls": …, "per_s": …}."""
    if isinstance(item, str) and "/" in item:
        calls, _, per_s = item.partition("/")
    elif isinstance(item, Mapping) and set(item) == {"calls", "per_s"}:
        calls, per_s = item["calls"], item["per_s"]
    elif isinstance(item, list | tuple) and len(item) == 2:
        calls, per_s = item
    else:
        raise ValueError("a limit is CALLS/PER_S, [calls, per_s] or {calls, per_s}")
    return integer_in(1, 10**9)(calls), number_in(0.001)(per_s)


LIMIT_PRESETS: dict[str, list[tuple[int, float]]] = {
    # "Runtime API Rate Limits: 600 requests/60 seconds and 18,000 requests/3600 seconds"
    "kore-runtime": [(600, 60.0), (18000, 3600.0)],
    # Analytics APIs (Sessions History, scope "Bot Sessions"): 60 per minute, 1800 per hour
    "kore-bot-sessions": [(60, 60.0), (1800, 3600.0)],
}
LIMIT_ANSWERS = ("retry-after", "kore")
KORE_RATE_LIMIT_MESSAGE = ("Rate limit for this API has been reached. "
                           "Please try again after some time.")


def limit_preset(name: Any) -> list[tuple[int, float]]:
    if name not in LIMIT_PRESETS:
        raise ValueError("a preset is one of " + ", ".join(LIMIT_PRESETS))
    return list(LIMIT_PRESETS[name])


def _globs(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(g, str) and g for g in value):
        raise TypeError("must be a list of non-empty botId globs")
    return list(value)


def _limits(value: Any) -> list[tuple[int, float]]:
    if isinstance(value, str):
        return limit_preset(value)
    if not isinstance(value, list):
        raise TypeError("must be a list of limits or a preset (" + ", ".join(LIMIT_PRESETS) + ")")
    return [parse_limit(item) for item in value]


def _limit_answer(value: Any) -> str:
    if value not in LIMIT_ANSWERS:
        raise ValueError("must be one of " + ", ".join(LIMIT_ANSWERS))
    return str(value)


def _header_text(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.isprintable() or len(value) > 200:
        raise ValueError("must be printable text of at most 200 characters, or null")
    return value


_RATE = number_in(0.0, 1.0)
FAULT_CHECKS: dict[str, Callable[[Any], Any]] = {
    "latency_ms": number_in(0.0),
    "error_status": integer_in(400, 599),
    "error_rate": _RATE,
    "fail_first": integer_in(0, 10**9),
    "rate_429": _RATE,
    "retry_after_s": number_in(0.0),
    "drop_rate": _RATE,
    "reject_token_next": integer_in(0, 10**9),
    "limits": _limits,
    "seed": _seed,
    "limit_answer": _limit_answer,
    "limit_status": integer_in(200, 599),
    "retry_after_header": _header_text,
    "limit_scale": number_in(0.001, 1000.0),
    "bots": _globs,
    "odd_success": _odd_success,
    "echo_token": _flag,
}


def checked_faults(patch: Any) -> dict[str, Any]:
    """A partial update of `Faults`, every value checked; nothing is applied on an error."""
    if not isinstance(patch, dict):
        raise FaultError("body: must be a JSON object")
    checked = {}
    for name, value in patch.items():
        if name not in FAULT_CHECKS:
            raise FaultError(f"{name}: unknown field")
        try:
            checked[name] = FAULT_CHECKS[name](value)
        except (TypeError, ValueError) as error:
            raise FaultError(f"{name}: {error}") from None
    return checked
