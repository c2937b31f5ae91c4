"""Kore.ai's per-bot windows shared by every replica through Redis, with a local fallback.

Each bot's windows live in Redis as sliding-window logs (`kore-gateway:rl:{botId}:{window}`,
the last `calls` grant times of that window, oldest first). One Lua script reads Redis's own
clock, finds the earliest slot every window allows, and either reserves it or refuses without
reserving, atomically: any number of gateway processes on any number of hosts never hand out
more than the budget, and no two hosts' clocks are compared. The `{botId}` hash tag keeps one
bot's keys in one Redis Cluster slot (the client itself is a plain, non-cluster one).
Grants are paced and held a little past their window, so Kore.ai, which counts calls as they
arrive, never sees more than the budget either.

What Kore.ai's refusals teach (`learning.py`) lives beside the logs in a hash
(`kore-gateway:rl:{botId}:learned`: budget, pause, epoch), read by the same reservation script
and written by `REFUSED_LUA`, which also voids the grants for slots still to come: every
replica follows the pause and the learned budget, atomically with its reservations. A caller
that waited for its slot checks the bot's epoch before it goes (one more round trip, only
after a wait), so a refusal seen by another replica meanwhile holds it back too.

When Redis cannot answer within `redis_timeout_s`, the process keeps serving with a local
`MemoryRateLimiter` at `local_fallback_fraction` of the budget (learning on its own), probes
Redis about once a second, and hands its local grants to Redis before it uses Redis again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, NamedTuple

import structlog
from cachetools import LRUCache
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.config.model import RateLimitConfig
from gateway.metrics import Metrics
from gateway.ratelimit.learning import Policy
from gateway.ratelimit.memory import (
    CALL_MARGIN_S,
    BotView,
    Grant,
    MemoryRateLimiter,
    Windows,
    rate_limited,
    spacing_of,
)

log = structlog.get_logger(__name__)

KEY_PREFIX = "kore-gateway:rl:"
PROBE_INTERVAL_S = 1.0  # while Redis is lost, how often it is tried again
LOSS_CONFIRM_S = 1.0  # timeouts alone declare Redis lost only when they last this long
# A grant keeps its place in a window this much longer than `per_s`: the call reaches Kore.ai
# a little after its grant (event loop, audit fsync, network), so a call granted exactly
# `per_s` after an earlier one could land inside Kore.ai's window of that earlier call if the
# earlier one was slower to arrive. A call later than RESTAMP_AFTER_S takes its place from when
# it leaves, so the margin covers only the usual delay. Costs 0.4 % of a 60 s window.
WINDOW_MARGIN_S = 0.25
MAX_REDIS_CONNECTIONS = 16  # per process, opened at start; more concurrent asks queue locally
# A call leaving this much later than its slot moves its grant to when it leaves (one more
# round trip, only then): a loaded gateway's first calls of a window must not count as earlier
# than Kore.ai sees them, or the next window's would arrive too soon.
RESTAMP_AFTER_S = 0.05
SEEN_BOTS = 4096  # bots with learned state this process remembers for /metrics and /readyz
REDIS_ERRORS = (RedisError, OSError, TimeoutError)

REDIS, FALLBACK, RESTORING = "redis", "local_fallback", "restoring"

# KEYS: the bot's window logs, then its learned hash. ARGV: max_wait_us, margin_us, spacing_us,
# then calls, per_us per window, then the shortest window's index and the probe delay (µs).
# Returns {granted (1/0, nothing reserved on 0), wait_us, slot_us, epoch, learned budget (-1:
# none), pause left (µs), time until the configured budget applies again (µs)}.
RESERVE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local max_wait, margin, spacing = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local n = #KEYS - 1
local short, probe = tonumber(ARGV[4 + 2 * n]), tonumber(ARGV[5 + 2 * n])
local s = redis.call('HMGET', KEYS[n + 1], 'b', 'p', 'r', 'e')
local budget, pause_until = tonumber(s[1]), tonumber(s[2]) or 0
local refused_at, epoch = tonumber(s[3]) or 0, tonumber(s[4]) or 0
local slot, latest = math.max(now, pause_until), nil
local probe_at = math.max(pause_until, refused_at + probe)
if budget and slot >= probe_at then budget = nil end
for i = 1, n do
  local key = KEYS[i]
  local calls, per = tonumber(ARGV[2 + 2 * i]), tonumber(ARGV[3 + 2 * i])
  local last = redis.call('LINDEX', key, -1)
  if last then
    latest = math.max(latest or 0, tonumber(last))
    local size = redis.call('LLEN', key)
    if size >= calls then
      slot = math.max(slot, tonumber(redis.call('LINDEX', key, -calls)) + per + margin)
    end
    -- the learned budget pushes a slot at most to probe_at, where the configured one applies
    if i == short and budget and budget < calls and size >= budget then
      slot = math.max(slot, math.min(tonumber(redis.call('LINDEX', key, -budget)) + per + margin,
                                     probe_at))
    end
  end
end
if latest then
  slot = math.max(slot, latest + spacing)
end
local wait = slot - now
local learned = {epoch, budget or -1, math.max(0, pause_until - now), math.max(0, probe_at - now)}
if wait > 0 and wait > max_wait then
  return {0, wait, slot, unpack(learned)}
end
for i = 1, n do
  local calls, per = tonumber(ARGV[2 + 2 * i]), tonumber(ARGV[3 + 2 * i])
  redis.call('RPUSH', KEYS[i], string.format('%.0f', slot))
  redis.call('LTRIM', KEYS[i], -calls, -1)
  redis.call('PEXPIRE', KEYS[i], math.ceil((wait + per + margin) / 1000) + 1000)
end
return {1, wait, slot, unpack(learned)}
"""

# Kore.ai refused the call granted at `slot`: learning.refuse(), in Redis. KEYS: the bot's
# window logs, then its learned hash. ARGV: slot_us, retry_after_us (-1: none), backoff_us,
# max_pause_us, configured calls and window_us of the shortest window, probe_us, the shortest
# window's index, margin_us (calls are counted over the window as it is paced). Forgets the refused grant (as Kore.ai, a refused call counts in no window)
# and voids the grants for slots still to come. Returns {pause left (µs), budget, epoch, 1 when
# a new pause started}.
REFUSED_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n = #KEYS - 1
local learn = KEYS[n + 1]
local slot, retry = tonumber(ARGV[1]), tonumber(ARGV[2])
local backoff, max_pause = tonumber(ARGV[3]), tonumber(ARGV[4])
local configured, window = tonumber(ARGV[5]), tonumber(ARGV[6])
local probe, short, margin = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local s = redis.call('HMGET', learn, 'b', 'p', 'ps', 'r', 'e')
local b, p, ps, r = tonumber(s[1]), tonumber(s[2]), tonumber(s[3]), tonumber(s[4])
local e = tonumber(s[5]) or 0
if b and now >= math.max(p, r + probe) + window then b = nil end
local accepted = 0
for _, v in ipairs(redis.call('LRANGE', KEYS[short], 0, -1)) do
  local at = tonumber(v)
  if at > slot - window - margin and at < slot then accepted = accepted + 1 end
end
local budget = math.max(1, math.min(accepted, configured))
if retry >= 0 then retry = math.min(retry, max_pause) end
local started = 0
if b and slot < r then
  b = math.min(b, budget)
  if retry >= 0 then p = math.max(p, now + retry) end
else
  local pause_s = backoff
  if b and now < p + window then pause_s = ps * 2 end
  ps = math.min(pause_s, max_pause)
  if retry >= 0 then p = now + retry else p = now + ps end
  r, b, started = now, budget, 1
end
e = e + 1
redis.call('HSET', learn, 'b', b, 'p', string.format('%.0f', p), 'ps', string.format('%.0f', ps),
           'r', string.format('%.0f', r), 'e', e)
redis.call('PEXPIRE', learn, math.ceil((math.max(p, r + probe) + window - now) / 1000) + 1000)
for i = 1, n do
  redis.call('LREM', KEYS[i], -1, string.format('%.0f', slot))
  local last = redis.call('LINDEX', KEYS[i], -1)
  while last and tonumber(last) > now do
    redis.call('RPOP', KEYS[i])
    last = redis.call('LINDEX', KEYS[i], -1)
  end
end
return {math.max(0, p - now), b, e, started}
"""

# A call left later than its slot: its grant moves to Redis's now, keeping each log in order.
# KEYS: the bot's window logs. ARGV: the grant's slot_us. Returns the new slot_us.
RESTAMP_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
for _, key in ipairs(KEYS) do
  if redis.call('LREM', key, -1, ARGV[1]) > 0 then
    local later = {}
    local last = redis.call('LINDEX', key, -1)
    while last and tonumber(last) > now do
      table.insert(later, 1, redis.call('RPOP', key))
      last = redis.call('LINDEX', key, -1)
    end
    redis.call('RPUSH', key, string.format('%.0f', now), unpack(later))
  end
end
return now
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


def learned_key(bot_id: str) -> str:
    return f"{KEY_PREFIX}{{{bot_id}}}:learned"


class Reservation(NamedTuple):
    """One answer of RESERVE_LUA, in seconds (`slot` on Redis's clock)."""

    granted: bool
    wait: float
    slot: float = 0.0
    epoch: int = 0
    budget: int | None = None  # learned, in the shortest window
    pause_s: float = 0.0  # left
    probe_s: float = 0.0  # until the configured budget applies again


class Refusal(NamedTuple):
    pause_s: float
    budget: int
    epoch: int
    started: bool


def _us(seconds: float) -> int:
    return round(seconds * 1_000_000)


def connect(url: str, timeout_s: float) -> Redis:
    """A client whose every connect and command gives up after `timeout_s`, never retried."""
    return Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                          retry=Retry(NoBackoff(), 0), max_connections=MAX_REDIS_CONNECTIONS,
                          health_check_interval=0)


class RedisWindows:
    """The windows of every bot, kept in Redis; raises a `REDIS_ERRORS` member on failure."""

    def __init__(self, client: Redis, windows: Windows, margin_s: float = WINDOW_MARGIN_S,
                 policy: Policy | None = None) -> None:
        self.client = client
        self.windows = tuple(windows)
        self.margin_s = margin_s
        self.spacing_s = spacing_of(self.windows)
        self.policy = policy if policy is not None else Policy.of(self.windows)
        self._short = 1 + min(range(len(self.windows)),
                              key=lambda i: (self.windows[i][1], self.windows[i][0]))
        self._reserve = client.register_script(RESERVE_LUA)
        self._refused = client.register_script(REFUSED_LUA)
        self._restamp = client.register_script(RESTAMP_LUA)
        self._seed = client.register_script(SEED_LUA)
        self._shape = [x for calls, per_s in self.windows for x in (calls, _us(per_s))]

    def _keys(self, bot_id: str) -> list[str]:
        return [*window_keys(bot_id, self.windows), learned_key(bot_id)]

    async def reserve(self, bot_id: str, max_wait_s: float) -> Reservation:
        """Reserves a slot `wait` seconds from now (`granted`), or says when one would be."""
        got = await self._reserve(
            keys=self._keys(bot_id),
            args=[_us(max_wait_s), _us(self.margin_s), _us(self.spacing_s), *self._shape,
                  self._short, _us(self.policy.probe_after_s)])
        granted, wait, slot, epoch, budget, pause, probe = (int(x) for x in got)
        return Reservation(bool(granted), wait / 1e6, slot / 1e6, epoch,
                           None if budget < 0 else budget, pause / 1e6, probe / 1e6)

    async def refused(self, bot_id: str, slot: float, retry_after_s: float | None
                      ) -> Refusal:
        """Learns from Kore.ai's refusal of the call granted at `slot` (Redis's clock)."""
        p = self.policy
        got = await self._refused(keys=self._keys(bot_id), args=[
            _us(slot), -1 if retry_after_s is None else _us(retry_after_s), _us(p.backoff_s),
            _us(p.max_pause_s), p.configured, _us(p.window_s), _us(p.probe_after_s),
            self._short, _us(self.margin_s)])
        pause, budget, epoch, started = (int(x) for x in got)
        return Refusal(pause / 1e6, budget, epoch, bool(started))

    async def restamp(self, bot_id: str, slot: float) -> float:
        """Moves the grant at `slot` to Redis's now; returns that (seconds, Redis's clock)."""
        now_us = await self._restamp(keys=window_keys(bot_id, self.windows), args=[_us(slot)])
        return int(now_us) / 1e6

    async def epoch(self, bot_id: str) -> int:
        return int(await self.client.hget(learned_key(bot_id), "e") or 0)

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
        self.policy = Policy.of(config.windows, config.backoff_s, config.max_pause_s)
        self.redis = RedisWindows(client, config.windows, policy=self.policy)
        self._metrics = metrics if metrics is not None else Metrics()
        self.fallback = MemoryRateLimiter(config.windows, share=fallback_share, clock=clock,
                                          sleep=sleep, metrics=self._metrics,
                                          backoff_s=config.backoff_s,
                                          max_pause_s=config.max_pause_s)
        # What this process last heard of bots with learned state: bot → (budget, paused
        # until, configured again at), on this process's clock. For /metrics and /readyz.
        self._seen: LRUCache[str, tuple[int | None, float, float]] = LRUCache(SEEN_BOTS)
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

    async def acquire(self, bot_id: str, deadline: float) -> Grant:
        waited = 0.0
        while True:  # ends: each round sleeps until a slot, and a slot past the deadline raises
            grant = await self._reserve(bot_id, deadline)
            if grant.wait_s <= 0 or not grant.remote:
                return replace(grant, wait_s=waited + grant.wait_s)
            self.waits += 1
            self._metrics.ratelimit_waited()
            await self._sleep(grant.wait_s)
            waited += grant.wait_s
            if await self._still_valid(bot_id, grant):
                return replace(grant, wait_s=waited)

    async def _reserve(self, bot_id: str, deadline: float) -> Grant:
        """A Redis grant (not yet waited for), or the fallback's (already waited for)."""
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
                got = await self.redis.reserve(bot_id, deadline - self._clock() - CALL_MARGIN_S)
            except REDIS_ERRORS as exc:
                self._failed(exc)
                return await self.fallback.acquire(bot_id, deadline)
        self._failing_since = None
        self._heard(bot_id, got.budget, got.pause_s, got.probe_s)
        if not got.granted:
            self.rejections += 1
            self._metrics.ratelimit_rejected()
            raise rate_limited(bot_id, got.wait)
        return Grant(got.wait, got.slot, got.epoch, remote=True, due=self._clock() + got.wait)

    async def _still_valid(self, bot_id: str, grant: Grant) -> bool:
        """False when Kore.ai refused a call for the bot while this one waited: its grant was
        voided, and it must ask again."""
        try:
            async with self._gate:
                epoch = await asyncio.wait_for(self.redis.epoch(bot_id), self.timeout_s)
        except REDIS_ERRORS:
            return True  # Redis is gone: the local fallback takes over from the next ask
        return epoch == grant.epoch

    async def sending(self, bot_id: str, grant: Grant, deadline: float | None = None
                      ) -> Grant:
        """A Redis grant keeps its slot unless the call leaves `RESTAMP_AFTER_S` late: the
        logs' `WINDOW_MARGIN_S` covers the usual wait between grant and send."""
        if not grant.remote:
            return await self.fallback.sending(bot_id, grant, deadline)
        if self._clock() - grant.due < RESTAMP_AFTER_S or self.mode != REDIS:
            return grant
        try:
            async with self._gate:
                slot = await asyncio.wait_for(self.redis.restamp(bot_id, grant.slot),
                                              self.timeout_s)
        except REDIS_ERRORS:
            return grant
        return replace(grant, slot=slot, due=self._clock())

    async def refused(self, bot_id: str, grant: Grant, retry_after_s: float | None) -> float:
        if grant.remote and self.mode == REDIS:
            try:
                async with self._gate:
                    got = await asyncio.wait_for(
                        self.redis.refused(bot_id, grant.slot, retry_after_s), self.timeout_s)
            except REDIS_ERRORS as exc:
                self._failed(exc)
            else:
                self._heard(bot_id, got.budget, got.pause_s, self.policy.probe_after_s)
                if got.started:
                    self._metrics.ratelimit_paused()
                return got.pause_s
        local = grant if not grant.remote else Grant(slot=self._clock())
        return await self.fallback.refused(bot_id, local, retry_after_s)

    def _heard(self, bot_id: str, budget: int | None, pause_s: float, probe_s: float) -> None:
        if budget is None and pause_s <= 0:
            self._seen.pop(bot_id, None)
            return
        now = self._clock()
        self._seen[bot_id] = (budget, now + pause_s, now + probe_s)

    def learned(self) -> list[BotView]:
        now = self._clock()
        below = self.policy.configured
        views = [BotView(bot, budget if now < again and (budget or below) < below else None,
                         max(0.0, until - now))
                 for bot, (budget, until, again) in list(self._seen.items())
                 if now < max(until, again)]
        return views + self.fallback.learned()

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
