"""Learning Kore.ai's real per-bot limit from its refusals (contract §2, "When Kore.ai's limit
is lower than configured"): the pause, the budget in the shortest window and its recovery.

Pure rules over one bot's `Learned` state and the time; where the state lives (this process,
a table shared by the workers of one supervisor, Redis) is the backends' business. The Redis
backend runs the same rules inside its Lua scripts (`redis.py`); tests hold both to the same
cases. Spotting Kore.ai's rate-limit answer and reading its `Retry-After` is `kore/client.py`'s.

The rules, in the shortest configured window W:
- a refusal pauses the bot: Kore.ai's `Retry-After` (capped at `max_pause_s`), or else
  `backoff_s`, doubled for each refusal that follows within one window of the last pause;
- the budget drops to the calls Kore.ai accepted in the window before the refused call (at
  least 1). That is the level at which Kore.ai refused, so the budget is back at it as soon as
  the pause ends: the fast part of the recovery takes no window at all. The refused call
  itself is forgotten by the backends: as in Kore.ai's own count, it takes no place in a window;
- `PROBE_WINDOWS` windows after the refusal the configured budget applies again, also for a
  caller already waiting (its slot is never pushed past that time): one probe above the
  learned level per ten windows. Against a steady limit it costs one refused call
  (then the same learning again); after a one-off refusal the bot is back at its configured
  budget within ten windows;
- other calls of the same burst that Kore.ai refuses (granted before the first refusal came
  back) lower the budget further if they counted fewer accepted calls, but never extend the
  pause unless they carry a longer `Retry-After`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

PROBE_WINDOWS = 10  # windows a learned budget holds before the configured one is tried again


@dataclass(frozen=True, slots=True)
class Policy:
    """What learning needs of `[rate_limit]`: the shortest window and the two pause keys."""

    configured: int  # calls the config allows a bot in the shortest window
    window_s: float  # the shortest window
    backoff_s: float = 5.0
    max_pause_s: float = 3600.0

    @classmethod
    def of(cls, windows: Sequence[tuple[int, float]], backoff_s: float = 5.0,
           max_pause_s: float = 3600.0) -> Policy:
        calls, per_s = min(windows, key=lambda w: (w[1], w[0]))
        return cls(calls, per_s, backoff_s, max_pause_s)

    @property
    def probe_after_s(self) -> float:
        return PROBE_WINDOWS * self.window_s


@dataclass(slots=True)
class Learned:
    """One bot's learned state. Times are on the backend's clock."""

    budget: int  # calls Kore.ai accepted in the shortest window before it refused
    pause_until: float  # no call for the bot goes upstream before this
    pause_s: float  # the last pause without Retry-After: doubles while refusals continue
    refused_at: float  # when the refusal that started this pause came
    epoch: int = 1  # counts refusals: a grant made under an older epoch is void


def probe_at(state: Learned, policy: Policy) -> float:
    """When the configured budget applies again."""
    return max(state.pause_until, state.refused_at + policy.probe_after_s)


def budget_at(state: Learned | None, policy: Policy, now: float) -> int | None:
    """The bot's budget in the shortest window at `now`; None when the configured one applies."""
    if state is None or now >= probe_at(state, policy):
        return None
    return state.budget


def learned_slot(slot: float, state: Learned, policy: Policy) -> float:
    """A slot the learned budget pushed to `slot`: never past the time the configured budget
    applies again (a caller already waiting goes then, not a window later)."""
    return min(slot, probe_at(state, policy))


def shown(state: Learned, policy: Policy, now: float) -> int | None:
    """The learned budget as /metrics shows it: only while below the configured one."""
    budget = budget_at(state, policy, now)
    return budget if budget is not None and budget < policy.configured else None


def expired(state: Learned, policy: Policy, now: float) -> bool:
    """True once a whole window has passed at the configured budget: the state can go."""
    return now >= probe_at(state, policy) + policy.window_s


def refuse(state: Learned | None, policy: Policy, *, now: float, slot: float, accepted: int,
           retry_after_s: float | None) -> tuple[Learned, bool]:
    """The state after Kore.ai refused the call granted at `slot`, having accepted `accepted`
    calls in the shortest window before it. Returns it and whether a new pause started."""
    budget = max(1, min(accepted, policy.configured))
    retry = None if retry_after_s is None else min(retry_after_s, policy.max_pause_s)
    if state is not None and slot < state.refused_at:  # the same burst, already being learned
        until = state.pause_until if retry is None else max(state.pause_until, now + retry)
        return Learned(min(state.budget, budget), until, state.pause_s, state.refused_at,
                       state.epoch + 1), False
    continuing = state is not None and now < state.pause_until + policy.window_s
    pause_s = policy.backoff_s
    if state is not None and continuing:
        pause_s = state.pause_s * 2
    pause_s = min(pause_s, policy.max_pause_s)
    pause = pause_s if retry is None else retry
    epoch = 1 if state is None else state.epoch + 1
    return Learned(budget, now + pause, pause_s, now, epoch), True


def accepted_before(times: Sequence[float], slot: float, window_s: float) -> int:
    """Grants in the window that ends at `slot`, before it: what Kore.ai accepted. Backends
    count over the window as they pace it (with its margin): a refusal that only a late call
    of the window before caused then costs one call of budget, not the calls of that window."""
    return sum(1 for t in times if slot - window_s < t < slot)
