"""The audit file's own thread (`Writer`): one call at a time, in order, off the event loop.

`AuditLog` runs every write, fsync, rotation and reopening here, so none of them blocks the
event loop and none runs concurrently with another. Each result goes back to the loop with
one wake-up: a queue in, `call_soon_threadsafe` out, about half the CPU of a
`ThreadPoolExecutor` round trip.
"""

from __future__ import annotations

import asyncio
import functools
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from gateway.logs import running_loop

_T = TypeVar("_T")


def set_exception(future: asyncio.Future[Any], error: BaseException) -> None:
    """Fails `future`, already marked as retrieved: a caller cancelled after this, before it
    resumed, would otherwise leave "exception was never retrieved" behind. The caller that
    awaits it still gets `error`. (Cheaper than a done-callback on every future.)"""
    future.set_exception(error)
    future.exception()


class Writer:
    """A thread started with the first call; `stop()` ends it after the calls queued."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        # Calls given and not yet handed back to the event loop; moved on the loop only.
        self.running = 0

    @property
    def idle(self) -> bool:
        """No call queued, running, or finished without the loop having taken its result:
        the thread touches nothing of its caller's until the next `run`."""
        return self.running == 0

    async def run(self, func: Callable[..., _T], *args: Any) -> _T:
        return await self.submit(func, *args)

    def submit(self, func: Callable[..., _T], *args: Any) -> asyncio.Future[_T]:
        """Queues the call now; the future resolves on the loop with its result."""
        future: asyncio.Future[_T] = running_loop().create_future()
        self.call(func, *args, done=functools.partial(_resolve, future))
        return future

    def call(self, func: Callable[..., _T], *args: Any,
             done: Callable[[_T | None, BaseException | None], None]) -> None:
        """Queues the call now; `done(result, None)`, or `done(None, error)`, then runs on
        the loop once it is over, with one wake-up and no future: a caller that needs no
        awaitable (the audit log's flusher) goes on from there on the same turn. Nothing runs
        when the loop has closed meanwhile."""
        loop = running_loop()
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="audit", daemon=True)
            self._thread.start()
        self.running += 1
        self._jobs.put((loop, func, args, done))

    def stop(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread = None

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            loop, func, args, done = job
            try:
                result, error = func(*args), None
            except Exception as exc:  # noqa: BLE001 - handed to `done`
                result, error = None, exc
            try:
                loop.call_soon_threadsafe(self._settle, done, result, error)
            except RuntimeError:
                pass  # the loop is closed: nobody waits any more

    def _settle(self, done: Callable[[Any, BaseException | None], None], result: Any,
                error: BaseException | None) -> None:
        self.running -= 1  # on the loop, once the call is over
        done(result, error)


def _resolve(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # cancelled: its caller has given up
        return
    if error is not None:
        set_exception(future, error)
    else:
        future.set_result(result)
