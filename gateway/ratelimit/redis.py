"""Kore.ai's per-bot windows shared by every replica through Redis, with a local fallback.

Each bot's windows live in Redis as sliding-window logs (`kore-gateway:rl:{botId}:{window}`,
the last `calls` grant times of that window, oldest first). One Lua script reads Redis's own
clock, finds the earliest slot every window allows, and either reserves it or refuses without
reserving, atomically: any number of gateway processes on any number of hosts never hand out
more than the budget, and no two hosts' clocks are compared. The `{botId}` hash tag keeps one
bot's keys in one Redis Cluster slot (the client itself is a plain, non-cluster one).
Grants are paced and held a little past their window, so Kore.ai, which counts calls as they
arrive, never sees more than the budget either.

When Redis cannot answer within `redis_timeout_s`, the process keeps serving with a local
`MemoryRateLimiter` at `local_fallback_fraction` of the budget, probes Redis about once a
second, and hands its local grants to Redis before it uses Redis again.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable
from typing import Any

import structlog
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.config.model import RateLimitConfig
from gateway.errors import RateLimited
from gateway.metrics import Metrics
from gateway.ratelimit.memory import CALL_MARGIN_S, MemoryRateLimiter, Windows

log = structlog.get_logger(__name__)

KEY_PREFIX = "kore-gateway:rl:"
PROBE_INTERVAL_S = 1.0  # while Redis is lost, how often it is tried again
LOSS_CONFIRM_S = 1.0  # timeouts alone declare Redis lost only when they last this long
# A grant keeps its place in a window this much longer than `per_s`: the call reaches Kore.ai
# a little after its grant (event loop, audit fsync, network), so a call granted exactly
# `per_s` after an earlier one could land inside Kore.ai's window of that earlier call if the
# earlier one was slower to arrive. Costs 0.8 % of a 60 s window.
WINDOW_MARGIN_S = 0.5
MAX_REDIS_CONNECTIONS = 16  # per process, opened at start; more concurrent asks queue locally
REDIS_ERRORS = (RedisError, OSError, TimeoutError)

REDIS, FALLBACK, RESTORING = "redis", "local_fallback", "restoring"

# One bot's grants are paced `spacing` apart: its windows' average interval, capped at
# MAX_SPACING_S so a bot with a small budget still gets its few calls at once. A whole window's
# budget granted in one instant would reach Kore.ai over the time the gateways take to send it
# (a second or more for a bulk job over many bots), and the next window, granted on time,
# would then overlap the tail of that burst.
MAX_SPACING_S = 0.1

# KEYS: the bot's window logs. ARGV: max_wait_us, margin_us, spacing_us, then calls, per_us
# per window. Returns {1, wait_us} (reserved) or {0, wait_us} (refused, nothing reserved).
RESERVE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local max_wait, margin, spacing = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local slot, latest = now, nil
for i, key in ipairs(KEYS) do
  local calls, per = tonumber(ARGV[2 + 2 * i]), tonumber(ARGV[3 + 2 * i])
  local last = redis.call('LINDEX', key, -1)
  if last then
    latest = math.max(latest or 0, tonumber(last))
    if redis.call('LLEN', key) >= calls then
      slot = math.max(slot, tonumber(redis.call('LINDEX', key, -calls)) + per + margin)
    end
  end
end
if latest then
  slot = math.max(slot, latest + spacing)
end
local wait = slot - now
if wait > 0 and wait > max_wait then
  return {0, wait}
end
for i, key in ipairs(KEYS) do
  local calls, per = tonumber(ARGV[2 + 2 * i]), tonumber(ARGV[3 + 2 * i])
  redis.call('RPUSH', key, string.format('%.0f', slot))
  redis.call('LTRIM', key, -calls, -1)
  redis.call('PEXPIRE', key, math.ceil((wait + per + margin) / 1000) + 1000)
end
return {1, wait}
"""

# Merges grants made elsewhere (µs offsets from Redis's now, oldest first) into the logs.
# KEYS: the bot's window logs. ARGV: margin_us, n, then calls, per_us per window, then offsets.
SEED_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local margin, n = tonumber(ARGV[1]), tonumber(ARGV[2])
local first = 3 + 2 * n
for i, key in ipairs(KEYS) do
  local calls, per = tonumber(ARGV[1 + 2 * i]), tonumber(ARGV[2 + 2 * i])
  local old = redis.call('LRANGE', key, 0, -1)
  local merged, a, b = {}, 1, first
  while a <= #old or b <= #ARGV do
    local x = old[a] and tonumber(old[a])
    local y = ARGV[b] and now + tonumber(ARGV[b])
    if y == nil or (x ~= nil and x <= y) then
      merged[#merged + 1] = x; a = a + 1
    else
      merged[#merged + 1] = y; b = b + 1
    end
  end
  redis.call('DEL', key)
  for j = math.max(1, #merged - calls + 1), #merged do
    redis.call('RPUSH', key, string.format('%.0f', merged[j]))
  end
  if #merged > 0 then
    local ttl = math.ceil((merged[#merged] - now + per + margin) / 1000) + 1000
    if ttl > 0 then redis.call('PEXPIRE', key, ttl) else redis.call('DEL', key) end
  end
end
return #ARGV - first + 1
"""


def window_name(calls: int, per_s: float) -> str:
    return f"{calls}/{per_s:g}s"


def window_keys(bot_id: str, windows: Windows) -> list[str]:
    return [f"{KEY_PREFIX}{{{bot_id}}}:{window_name(c, p)}" for c, p in windows]


def _us(seconds: float) -> int:
    return round(seconds * 1_000_000)


def connect(url: str, timeout_s: float) -> Redis:
    """A client whose every connect and command gives up after `timeout_s`, never retried."""
    return Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                          retry=Retry(NoBackoff(), 0), max_connections=MAX_REDIS_CONNECTIONS,
                          health_check_interval=0)


class RedisWindows:
    """The windows of every bot, kept in Redis; raises a `REDIS_ERRORS` member on failure."""

    def __init__(self, client: Redis, windows: Windows, margin_s: float = WINDOW_MARGIN_S) -> None:
        self.client = client
        self.windows = tuple(windows)
        self.margin_s = margin_s
        self.spacing_s = min(MAX_SPACING_S, *(per_s / calls for calls, per_s in self.windows))
        self._reserve = client.register_script(RESERVE_LUA)
        self._seed = client.register_script(SEED_LUA)
        self._shape = [x for calls, per_s in self.windows for x in (calls, _us(per_s))]

    async def reserve(self, bot_id: str, max_wait_s: float) -> tuple[bool, float]:
        """(True, wait) when a slot `wait` seconds from now is reserved; (False, wait) if not."""
        granted, wait_us = await self._reserve(
            keys=window_keys(bot_id, self.windows),
            args=[_us(max_wait_s), _us(self.margin_s), _us(self.spacing_s), *self._shape])
        return bool(granted), int(wait_us) / 1_000_000

    async def seed(self, offsets: dict[str, list[float]]) -> None:
        """Adds grants made without Redis (seconds from now, oldest first) to the logs."""
        if not offsets:
            return
        async with self.client.pipeline(transaction=False) as pipe:
            for bot_id, times in offsets.items():
                await self._seed(keys=window_keys(bot_id, self.windows), client=pipe, args=[
                    _us(self.margin_s), len(self.windows), *self._shape,
                    *(_us(t) for t in times)])
            await pipe.execute()

    async def ping(self) -> None:
        await self.client.ping()

    async def warm(self) -> None:
        """Opens every pooled connection now, so a burst of asks never waits on connects."""
        await asyncio.gather(*(self.client.ping() for _ in range(MAX_REDIS_CONNECTIONS)))

    async def reset(self) -> None:
        """Drops pooled connections (after an outage they lead to a Redis that is gone)."""
        await self.client.connection_pool.disconnect()


class RedisRateLimiter:
    """The `RateLimiter` of `backend = "redis"`: Redis first, a local share while it is lost."""

    def __init__(self, config: RateLimitConfig, *, fallback_share: float,
                 client: Redis | None = None, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Any] = asyncio.sleep,
                 metrics: Metrics | None = None) -> None:
        if client is None:
            if config.redis_url is None:
                raise ValueError("backend = \"redis\" needs redis_url")
            client = connect(config.redis_url.reveal(), config.redis_timeout_s)
        self.redis = RedisWindows(client, config.windows)
        self._metrics = metrics if metrics is not None else Metrics()
        self.fallback = MemoryRateLimiter(config.windows, share=fallback_share, clock=clock,
                                          sleep=sleep, metrics=self._metrics)
        self.fallback_share = fallback_share
        self.timeout_s = config.redis_timeout_s
        self._longest_s = max(per_s for _, per_s in config.windows) + WINDOW_MARGIN_S
        self._clock, self._sleep = clock, sleep
        self._gate = asyncio.Semaphore(MAX_REDIS_CONNECTIONS)
        self.mode = REDIS
        self.lost_at: float | None = None
        self.outages = 0
        self.waits = self.rejections = 0  # of Redis grants; the fallback counts its own
        self._metrics.ratelimit_redis_fallback(False)
        self._failing_since: float | None = None
        self._probe: asyncio.Task[None] | None = None
        self._restored = asyncio.Event()

    async def start(self) -> None:
        """Connects to Redis, so a start-up without it is reported at once."""
        try:
            await asyncio.wait_for(self.redis.warm(), self.timeout_s * 4)
        except REDIS_ERRORS as exc:
            self._lose(exc)

    async def acquire(self, bot_id: str, deadline: float) -> float:
        if self.mode == RESTORING:
            # Local grants are being handed to Redis; wait (briefly) so none is missed.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._restored.wait(), self.timeout_s * 4)
        if self.mode != REDIS:
            return await self.fallback.acquire(bot_id, deadline)
        async with self._gate:
            if self.mode != REDIS:  # lost while this ask waited for a connection
                return await self.fallback.acquire(bot_id, deadline)
            try:
                granted, wait = await self.redis.reserve(
                    bot_id, deadline - self._clock() - CALL_MARGIN_S)
            except REDIS_ERRORS as exc:
                self._failed(exc)
                return await self.fallback.acquire(bot_id, deadline)
        self._failing_since = None
        if not granted:
            self.rejections += 1
            self._metrics.ratelimit_rejected()
            raise RateLimited(
                f"the Kore.ai rate limit for bot {bot_id} is spent; retry in {math.ceil(wait)} s",
                retry_after_s=wait)
        if wait > 0:
            self.waits += 1
            self._metrics.ratelimit_waited()
            await self._sleep(wait)
        return wait

    def detail(self) -> dict[str, Any]:
        detail: dict[str, Any] = {"backend": "redis", "state": self.mode,
                                  "outages": self.outages}
        if self.mode != REDIS:
            detail["localShare"] = self.fallback_share
            detail["lostForS"] = round(self._clock() - (self.lost_at or self._clock()), 3)
        return detail

    async def aclose(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)
        await self.redis.client.aclose()

    # --- losing Redis and getting it back --------------------------------------------------

    def _failed(self, exc: BaseException) -> None:
        """One ask could not use Redis (it is served locally). A refused or broken connection
        or an error answer loses Redis at once; timeouts only once they persist, as a busy
        event loop can make a healthy Redis look slow for a moment."""
        now = self._clock()
        if self._failing_since is None:
            self._failing_since = now
        if not isinstance(exc, TimeoutError | RedisTimeoutError) or (
                now - self._failing_since >= LOSS_CONFIRM_S):
            self._lose(exc)

    def _lose(self, exc: BaseException) -> None:
        if self.mode == FALLBACK:
            return
        if self.mode == REDIS:
            self.outages += 1
            self.lost_at = self._clock()
            log.error("ratelimit.redis_unavailable", error=type(exc).__name__,
                      detail=str(exc)[:200], local_share=self.fallback_share,
                      probe_every_s=PROBE_INTERVAL_S)
        self.mode = FALLBACK
        self._metrics.ratelimit_redis_fallback(True)
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._probe_until_back())

    async def _probe_until_back(self) -> None:
        while self.mode == FALLBACK:
            await self._sleep(PROBE_INTERVAL_S)
            try:
                await self.redis.ping()
            except REDIS_ERRORS:
                continue
            await self._restore()

    async def _restore(self) -> None:
        """Hands this process's recent local grants to Redis, then uses Redis again."""
        self.mode = RESTORING
        self._restored.clear()
        try:
            await self.redis.reset()
            await self.redis.seed(self._local_offsets())
            await self.redis.warm()
        except REDIS_ERRORS as exc:
            log.warning("ratelimit.redis_restore_failed", error=type(exc).__name__)
            self.mode = FALLBACK
        else:
            self.mode = REDIS
            self._failing_since = None
            self._metrics.ratelimit_redis_fallback(False)
            log.warning("ratelimit.redis_restored",
                        lost_for_s=round(self._clock() - (self.lost_at or self._clock()), 3))
        finally:
            self._restored.set()

    def _local_offsets(self) -> dict[str, list[float]]:
        """Each bot's local grants still inside a window, as seconds from now."""
        now = self._clock()
        return {bot: [t - now for t in times if t - now > -self._longest_s]
                for bot, times in self.fallback.history().items()
                if times and times[-1] - now > -self._longest_s}
