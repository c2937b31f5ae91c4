"""A real `redis-server` on a free loopback port for the tests that need one.

Without the binary the tests skip with the reason, except in CI (`CI=true`), where a missing
`redis-server` is a failure: `.ci/run` installs it.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from benchmarks.redis_scenario import RedisServer, redis_binary

__all__ = ["RedisServer", "redis_server", "redis_server_binary", "silent_port"]


@pytest.fixture(scope="session")
def redis_server_binary() -> str:
    binary = redis_binary()
    if binary is None:
        reason = ("redis-server is not installed (apt-get install redis-server); the Redis "
                  "rate-limit tests need a real server")
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason}, and CI must run them (.ci/run installs it)")
        pytest.skip(reason)
    return binary


@pytest.fixture
def redis_server(redis_server_binary: str, tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh, empty Redis (no persistence) that a test may kill and start again."""
    server = RedisServer(redis_server_binary, tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
async def silent_port() -> AsyncIterator[int]:
    """A loopback port that accepts connections and never answers: a hung Redis."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()
