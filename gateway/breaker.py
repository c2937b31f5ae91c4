"""Circuit breakers for the upstream: one per bot, and one for the host as a whole.

A bot's circuit: closed → (`failures` failed calls in a row) → open → (cool-down) → half-open:
one probe goes through; its success closes the circuit, its failure opens it again. It only
ever refuses calls to that bot, so one caller's broken bot never refuses another bot's call.

The host's circuit opens only when failures span many bots: `host_bots` distinct bots had a
failed call within `window_s`, and no call to any bot succeeded in between (one success shows
Kore.ai answers). While open it refuses every call; after the cool-down it is half-open and
lets one probe per bot through, at most `host_bots` at a time: any success closes it, and it
opens again only by the same rule, so no single bot's failing probe can keep it open.

Memory stays bounded: only bots with a failed call or a circuit not closed are kept, at most
`max_bots`, the least recently failed evicted first, and none idle past `idle_s`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from gateway.errors import UpstreamCircuitOpen
from gateway.metrics import Metrics

log = structlog.get_logger(__name__)

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
HOST = "*"  # the `bot` of the host-wide circuit in logs and metrics
DEFAULT_HOST_BOTS = 5
DEFAULT_WINDOW_S = 60.0
MAX_BOTS = 10_000  # bots whose failures are remembered; about 200 bytes each
MIN_IDLE_S = 600.0  # a bot with no failed call for this long (and the cool-down) is forgotten
DETAIL_BOTS = 20  # bot IDs named in /readyz
MAX_BOT_SERIES = 100  # bots with a kore_gateway_circuit_state series of their own, at most


@dataclass(frozen=True, slots=True)
class Pass:
    """What `before_call` let through; hand it back to `record` or `release`."""

    bot: str
    bot_probe: bool = False  # the one probe of the bot's half-open circuit
    host_probe: bool = False  # one of the probes of the host's half-open circuit


@dataclass(slots=True)
class _Circuit:
    state: str = CLOSED
    failures: int = 0  # failed calls in a row
    opened_at: float = 0.0
    probing: bool = False
    seen: float = 0.0  # last failed call

    def wait_s(self, now: float, cooldown_s: float) -> float:
        """Seconds until an open circuit turns half-open (≤ 0: now)."""
        return self.opened_at + cooldown_s - now

    def admit(self, now: float, cooldown_s: float) -> float:
        """0 when a call may go now (taking a half-open circuit's probe), else Retry-After."""
        if self.state == CLOSED:
            return 0.0
        remaining = self.wait_s(now, cooldown_s)
        if self.state == OPEN and remaining <= 0:
            self.state = HALF_OPEN
        if self.state == HALF_OPEN and not self.probing:
            self.probing = True
            return 0.0
        return max(remaining, 1.0)

    def settle(self, ok: bool, probe: bool, now: float, threshold: int) -> None:
        """A call's result: only the probe's failure reopens a half-open circuit."""
        if probe:
            self.probing = False
        if ok:
            self.state, self.failures = CLOSED, 0
            return
        self.failures += 1
        self.seen = now
        if (self.state == HALF_OPEN and probe) or (
                self.state == CLOSED and self.failures >= threshold):
            self.state, self.opened_at = OPEN, now


class CircuitBreaker:
    """The circuits of one upstream host: per bot, and host-wide across bots."""

    def __init__(self, host: str, *, failures: int, cooldown_s: float,
                 host_bots: int = DEFAULT_HOST_BOTS, window_s: float = DEFAULT_WINDOW_S,
                 max_bots: int = MAX_BOTS, clock: Callable[[], float] = time.monotonic,
                 metrics: Metrics | None = None) -> None:
        self.host = host
        self.threshold = failures
        self.cooldown_s = cooldown_s
        self.host_bots, self.window_s = host_bots, window_s
        self.max_bots, self.idle_s = max_bots, max(MIN_IDLE_S, 2 * cooldown_s)
        self._clock = clock
        self._bots: dict[str, _Circuit] = {}  # in order of their last failed call
        self._not_closed: set[str] = set()
        self._series: set[str] = set()  # the bots of _not_closed shown in the metric
        self._host = _Circuit()
        self._failing: dict[str, float] = {}  # bot → its last failure since the last success
        self._host_probes: set[str] = set()
        self._metrics = metrics if metrics is not None else Metrics()
        self._metrics.circuit_state(host, HOST, CLOSED)
        self._metrics.circuit_open_bots(0)

    @property
    def state(self) -> str:
        """The host-wide circuit's state."""
        return self._host.state

    def bot_state(self, bot: str) -> str:
        circuit = self._bots.get(bot)
        return CLOSED if circuit is None else circuit.state

    def bot_failures(self, bot: str) -> int:
        circuit = self._bots.get(bot)
        return 0 if circuit is None else circuit.failures

    def before_call(self, bot: str) -> Pass:
        """A `Pass` when a call to `bot` may go out now; raises `UpstreamCircuitOpen` if not."""
        if self._host.state == CLOSED and bot not in self._bots:
            return Pass(bot, False, False)  # the common case: nothing is failing for it
        now = self._clock()
        circuit = self._bots.get(bot)
        bot_probe = False
        if circuit is not None:
            wait = self._admit(bot, circuit, now)
            if wait:
                raise self._refusal(bot, wait)
            bot_probe = circuit.state == HALF_OPEN
        try:
            host_probe = self._admit_host(bot, now)
        except UpstreamCircuitOpen:
            if circuit is not None and bot_probe:
                circuit.probing = False
            raise
        return Pass(bot, bot_probe, host_probe)

    def record(self, ticket: Pass, ok: bool) -> None:
        """The result of one caller request that went upstream (after its retries)."""
        if ok and not ticket.host_probe and self._host.state == CLOSED and (
                ticket.bot not in self._bots):
            self._failing.clear()  # the common case: what `_settle_host` and `_settle_bot`
            self._host.failures = 0  # do for a success of a bot that is not failing
            return
        now = self._clock()
        self._settle_host(ticket, ok, now)
        self._settle_bot(ticket, ok, now)

    def release(self, ticket: Pass) -> None:
        """The pass is given back unused (the call never went out): its probe slots free."""
        self._host_probes.discard(ticket.bot)
        circuit = self._bots.get(ticket.bot)
        if ticket.bot_probe and circuit is not None:
            circuit.probing = False

    def detail(self) -> dict[str, object]:
        """For /readyz: the host-wide circuit, and the bots whose circuit is not closed."""
        return {"host": self.host, "state": self._host.state,
                "consecutiveFailures": self._host.failures,
                "failingBots": len(self._recent_failing(self._clock())),
                "openBots": len(self._not_closed),
                "openBotIds": sorted(self._not_closed)[:DETAIL_BOTS]}

    # -- the host ---------------------------------------------------------------------------

    def _admit_host(self, bot: str, now: float) -> bool:
        """True when the call is a probe of the half-open host circuit; raises if refused."""
        host = self._host
        if host.state == CLOSED:
            return False
        wait = host.wait_s(now, self.cooldown_s)
        if host.state == OPEN and wait <= 0:
            self._failing.clear()
            self._change(HOST, host, HALF_OPEN)
        if host.state == OPEN:
            raise self._refusal(None, max(wait, 1.0))
        if bot in self._host_probes or len(self._host_probes) >= self.host_bots:
            raise self._refusal(None, 1.0)
        self._host_probes.add(bot)
        return True

    def _settle_host(self, ticket: Pass, ok: bool, now: float) -> None:
        host = self._host
        if ticket.host_probe:
            self._host_probes.discard(ticket.bot)
        if ok:
            self._failing.clear()
            self._change(HOST, host, CLOSED)
            host.failures = 0
            return
        host.failures += 1
        self._failing.pop(ticket.bot, None)
        self._failing[ticket.bot] = now
        if host.state != OPEN and len(self._recent_failing(now)) >= self.host_bots:
            host.opened_at = now
            self._failing.clear()
            self._host_probes.clear()
            self._change(HOST, host, OPEN)

    def _recent_failing(self, now: float) -> dict[str, float]:
        failing = self._failing
        while failing:
            bot, when = next(iter(failing.items()))
            if when >= now - self.window_s:
                break
            del failing[bot]
        return failing

    # -- the bots ---------------------------------------------------------------------------

    def _admit(self, bot: str, circuit: _Circuit, now: float) -> float:
        before = circuit.state
        wait = circuit.admit(now, self.cooldown_s)
        if circuit.state != before:
            self._changed(bot, circuit, before)
        return wait

    def _settle_bot(self, ticket: Pass, ok: bool, now: float) -> None:
        circuit = self._bots.pop(ticket.bot, None)
        if circuit is None:
            if ok:
                return  # the common case: a healthy bot costs no memory
            circuit = _Circuit()
        before = circuit.state
        circuit.settle(ok, ticket.bot_probe, now, self.threshold)
        if circuit.state != before:
            self._changed(ticket.bot, circuit, before)
        if not ok or circuit.state != CLOSED:
            self._bots[ticket.bot] = circuit  # to the end: the most recently failed
        self._evict(now)

    def _evict(self, now: float) -> None:
        bots = self._bots
        while bots:
            bot, circuit = next(iter(bots.items()))
            if len(bots) <= self.max_bots and circuit.seen >= now - self.idle_s:
                return
            del bots[bot]
            if circuit.state != CLOSED:
                self._show(bot, CLOSED)

    def _change(self, bot: str, circuit: _Circuit, state: str) -> None:
        before = circuit.state
        circuit.state = state
        if state != before:
            self._changed(bot, circuit, before)

    def _changed(self, bot: str, circuit: _Circuit, before: str) -> None:
        log.warning("upstream.circuit_" + circuit.state, host=self.host, bot=bot,
                    failures=circuit.failures, previous=before)
        if bot == HOST:
            self._metrics.circuit_state(self.host, HOST, circuit.state)
        else:
            self._show(bot, circuit.state)

    def _show(self, bot: str, state: str) -> None:
        """Metrics of a bot's new state: a series only while not closed, and for at most
        MAX_BOT_SERIES bots at a time (the open-bots gauge counts them all)."""
        if state == CLOSED:
            self._not_closed.discard(bot)
        else:
            self._not_closed.add(bot)
        if bot in self._series or (state != CLOSED and len(self._series) < MAX_BOT_SERIES):
            self._metrics.circuit_state(self.host, bot, state)
            if state == CLOSED:
                self._series.discard(bot)
            else:
                self._series.add(bot)
        self._metrics.circuit_open_bots(len(self._not_closed))

    def _refusal(self, bot: str | None, wait_s: float) -> UpstreamCircuitOpen:
        what = f"for bot {bot}" if bot is not None else "for many bots"
        return UpstreamCircuitOpen(
            f"Kore.ai at {self.host} is failing {what}; the gateway is not calling it for now",
            retry_after_s=wait_s)
