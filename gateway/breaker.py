"""Circuit breaker for the upstream host: fail fast after a run of failed calls.

closed → (N failed calls in a row) → open → (cool-down) → half-open: one probe goes
through; its success closes the circuit, its failure opens it again.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog

from gateway.errors import UpstreamCircuitOpen
from gateway.metrics import Metrics

log = structlog.get_logger(__name__)

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class CircuitBreaker:
    def __init__(self, host: str, *, failures: int, cooldown_s: float,
                 clock: Callable[[], float] = time.monotonic,
                 metrics: Metrics | None = None) -> None:
        self.host = host
        self.threshold = failures
        self.cooldown_s = cooldown_s
        self._clock = clock
        self.state = CLOSED
        self.failures = 0
        self._opened_at = 0.0
        self._probing = False
        self._metrics = metrics if metrics is not None else Metrics()
        self._metrics.circuit_state(host, CLOSED)

    def before_call(self) -> None:
        """Raises `UpstreamCircuitOpen` unless a call may go out now."""
        if self.state == CLOSED:
            return
        remaining = self._opened_at + self.cooldown_s - self._clock()
        if self.state == OPEN and remaining <= 0:
            self._set(HALF_OPEN)
        if self.state == HALF_OPEN and not self._probing:
            self._probing = True
            return
        raise UpstreamCircuitOpen(
            f"Kore.ai at {self.host} is failing; the gateway is not calling it for now",
            retry_after_s=max(remaining, 1.0))

    def record(self, ok: bool) -> None:
        """The result of one caller request that went upstream (after its retries)."""
        self._probing = False
        if ok:
            self.failures = 0
            if self.state != CLOSED:
                self._set(CLOSED)
            return
        self.failures += 1
        if self.state == HALF_OPEN or self.failures >= self.threshold:
            self._opened_at = self._clock()
            self._set(OPEN)

    def release(self) -> None:
        """The probe slot is given back unused (the call never went out)."""
        self._probing = False

    def detail(self) -> dict[str, object]:
        return {"host": self.host, "state": self.state, "consecutiveFailures": self.failures}

    def _set(self, state: str) -> None:
        if state != self.state:
            log.warning("upstream.circuit_" + state, host=self.host, failures=self.failures)
        self.state = state
        self._metrics.circuit_state(self.host, state)
