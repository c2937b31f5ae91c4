"""The event loop the gateway serves on: uvloop when it is installed, asyncio's own otherwise.

uvloop (a dependency on Linux and macOS) roughly halves the loop's own share of a request's
CPU time: its transports, timers and `call_soon` are written in C over libuv. Nothing in the
gateway depends on which loop runs it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

_T = TypeVar("_T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """`uvloop.new_event_loop`, or None (asyncio's default) when uvloop is not installed."""
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run(main: Coroutine[Any, Any, _T]) -> _T:
    """`asyncio.run(main)` on the fastest loop available."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)


def loop_name() -> str:
    return "uvloop" if loop_factory() is not None else "asyncio"
