"""The learned pause and budget of each bot, shared by the workers of one supervisor.

With `serve --workers N` and the memory backend, each worker paces its own share of the
configured windows (`memory.py`), but what Kore.ai's refusals teach holds for the bot as a
whole, whichever worker saw the refusal. So it lives in one table that every worker maps: a
file on tmpfs (`/dev/shm` where there is one), made by the supervisor before it starts the
workers (`shared_table`) and named to them in `KORE_GATEWAY_RATELIMIT_TABLE`, as the metrics
directory is. A slot holds a bot's `Learned` state and a ring of its last grants over all
workers, so a learned budget holds exactly across the workers, not per worker.

Why a mapped file and not a helper process or a manager: no extra process to supervise, no
socket round trip on the request path, nothing lost when a worker restarts, and a fixed size
(`CAPACITY` slots of at most ~4.2 KiB). Every read-modify-write holds an `flock` on the file
for microseconds, and only for bots in the table; a call for any other bot takes no lock at
all: it looks the bot up in this process's index of the table, rebuilt when the table's
generation changes. When the table is full, expired slots are reused first, then the one
refused longest ago. A learned budget above `MAX_RING` calls is held as `MAX_RING`.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import mmap
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from gateway.config.model import RateLimitConfig
from gateway.ratelimit.learning import (
    Learned,
    Policy,
    accepted_before,
    budget_at,
    expired,
    learned_slot,
    refuse,
    shown,
)
from gateway.ratelimit.memory import BotView, Fits, Grant

ENV = "KORE_GATEWAY_RATELIMIT_TABLE"
CAPACITY = 4096  # bots with learned state at one time
MAX_RING = 512  # grants remembered per bot
NAME_BYTES = 128  # of the botId, for /metrics labels
MAGIC = 0x4B47575F524C5432  # "KGW_RLT2"
TMPFS = Path("/dev/shm")


class _Header(ctypes.Structure):
    _fields_ = [("magic", ctypes.c_uint64), ("capacity", ctypes.c_uint32),
                ("ring", ctypes.c_uint32), ("generation", ctypes.c_uint64),
                # Slots are claimed lowest first and scanned only below `high`: a worker touches
                # (and so maps into its RSS) only the pages of slots ever used, not the table.
                ("high", ctypes.c_uint32), ("_pad", ctypes.c_uint32)]


def _slot_type(ring: int) -> Any:
    class Slot(ctypes.Structure):
        _fields_ = [("key", ctypes.c_ubyte * 16), ("name", ctypes.c_ubyte * NAME_BYTES),
                    ("name_len", ctypes.c_uint32), ("budget", ctypes.c_uint32),
                    ("epoch", ctypes.c_uint32), ("count", ctypes.c_uint32),
                    ("head", ctypes.c_uint32), ("_pad", ctypes.c_uint32),
                    ("pause_until", ctypes.c_double), ("pause_s", ctypes.c_double),
                    ("refused_at", ctypes.c_double),
                    # The slot of the refused grant that claimed this slot for the bot: the
                    # other workers' grants before it were not in the ring yet (`_merge`).
                    ("claimed_by", ctypes.c_double), ("ring", ctypes.c_double * ring)]
    return Slot


def ring_size(configured: int) -> int:
    return max(1, min(configured, MAX_RING))


def table_bytes(ring: int, capacity: int = CAPACITY) -> int:
    return ctypes.sizeof(_Header) + capacity * ctypes.sizeof(_slot_type(ring))


def bot_key(bot_id: str) -> bytes:
    return hashlib.blake2b(bot_id.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class Table:
    """The mapped table: a header and `capacity` slots; a zero key marks a free slot."""

    def __init__(self, buf: mmap.mmap, fd: int | None) -> None:
        self._buf, self._fd = buf, fd
        self.header = _Header.from_buffer(buf, 0)
        if self.header.magic != MAGIC:
            raise ValueError("not a kore-gateway rate-limit table")
        self.ring, self.capacity = int(self.header.ring), int(self.header.capacity)
        self.slots: Any = (_slot_type(self.ring) * self.capacity).from_buffer(
            buf, ctypes.sizeof(_Header))
        self._index: dict[bytes, int] = {}
        self._generation = -1

    @classmethod
    def anonymous(cls, ring: int, capacity: int = CAPACITY) -> Table:
        """A table of this process alone (tests, and a worker started without a supervisor)."""
        buf = mmap.mmap(-1, table_bytes(ring, capacity))
        _init(buf, ring, capacity)
        return cls(buf, None)

    @classmethod
    def create(cls, path: Path, ring: int, capacity: int = CAPACITY) -> None:
        size = table_bytes(ring, capacity)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            with mmap.mmap(fd, size) as buf:
                _init(buf, ring, capacity)
        finally:
            os.close(fd)

    @classmethod
    def open(cls, path: Path) -> Table:
        fd = os.open(path, os.O_RDWR)
        try:
            return cls(mmap.mmap(fd, os.fstat(fd).st_size), fd)
        except BaseException:
            os.close(fd)
            raise

    @property
    def nbytes(self) -> int:
        return len(self._buf)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        if self._fd is None:
            yield
            return
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def find(self, key: bytes) -> Any | None:
        """The bot's slot, or None. Without the lock, a miss may be a moment old."""
        if self.header.generation != self._generation:
            self._reindex()
        i = self._index.get(key)
        if i is None:
            return None
        slot = self.slots[i]
        if bytes(slot.key) != key:  # reused since this index was built
            self._reindex()
            return None if self._index.get(key) is None else self.slots[self._index[key]]
        return slot

    def live(self) -> list[Any]:
        if self.header.generation != self._generation:
            self._reindex()
        return [self.slots[i] for i in self._index.values()]

    def _reindex(self) -> None:
        self._generation = int(self.header.generation)
        size, base = ctypes.sizeof(_slot_type(self.ring)), ctypes.sizeof(_Header)
        keys = (bytes(self._buf[base + i * size: base + i * size + 16])
                for i in range(int(self.header.high)))
        self._index = {key: i for i, key in enumerate(keys) if any(key)}

    def claim(self, key: bytes, name: str, stale: Any) -> Any:
        """A zeroed slot for a new bot (under the lock): a free one, else a stale one (`stale`
        says which), else the one refused longest ago."""
        self.find(key)  # brings the index up to date
        used = set(self._index.values())
        high = int(self.header.high)
        free = next((i for i in range(high) if i not in used), None)
        if free is None and high < self.capacity:
            free = high
            self.header.high = high + 1
        if free is None:
            slots = [self.slots[i] for i in sorted(used)]
            victim = next((s for s in slots if stale(s)), None) or min(
                slots, key=lambda s: s.refused_at)
            free = self._index[bytes(victim.key)]
        slot = self.slots[free]
        ctypes.memset(ctypes.addressof(slot), 0, ctypes.sizeof(slot))
        raw = name.encode("utf-8", "surrogatepass")[:NAME_BYTES]
        slot.name[:len(raw)] = raw
        slot.name_len = len(raw)
        slot.key[:] = key
        self._changed()
        return slot

    def release(self, slot: Any) -> None:
        ctypes.memset(ctypes.addressof(slot), 0, ctypes.sizeof(slot))
        self._changed()

    def _changed(self) -> None:
        self.header.generation += 1
        self._reindex()

    def close(self) -> None:
        del self.slots, self.header
        self._buf.close()
        if self._fd is not None:
            os.close(self._fd)


def _init(buf: mmap.mmap, ring: int, capacity: int) -> None:
    header = _Header.from_buffer(buf, 0)
    header.magic, header.ring, header.capacity, header.generation = MAGIC, ring, capacity, 1
    del header


# --- one slot's ring of grant times -----------------------------------------------------------

def ring_push(slot: Any, at: float) -> None:
    size = len(slot.ring)
    slot.ring[slot.head] = at
    slot.head = (slot.head + 1) % size
    slot.count = min(slot.count + 1, size)


def ring_at(slot: Any, k: int) -> float:
    """The k-th most recent grant (1: the latest)."""
    return float(slot.ring[(slot.head - k) % len(slot.ring)])


def ring_times(slot: Any) -> list[float]:
    return [ring_at(slot, k) for k in range(slot.count, 0, -1)]


def ring_forget(slot: Any, at: float) -> None:
    times = ring_times(slot)
    if at in times:
        times.remove(at)
        slot.count = slot.head = 0
        for t in times:
            ring_push(slot, t)


def ring_void_after(slot: Any, now: float) -> None:
    while slot.count and ring_at(slot, 1) > now:
        slot.head = (slot.head - 1) % len(slot.ring)
        slot.count -= 1


class SharedLearning:
    """A `LearnedStore` over a `Table`: what one worker learns, every worker follows.

    A bot's grants go into its slot's ring only once the bot has a slot, that is after its
    first refusal; the worker that saw it counted the calls Kore.ai accepted from its own grant
    log. Every other worker adds its own grants of that window the first time it touches the
    bot's slot afterwards (`_merge`), which raises the budget to what Kore.ai accepted from
    all of them."""

    def __init__(self, table: Table, policy: Policy, margin_s: float) -> None:
        self.table, self.policy, self.margin_s = table, policy, margin_s
        self.spacing_s = min(0.1, policy.window_s / policy.configured)
        self._merged: dict[bytes, float] = {}  # bot key → the `claimed_by` merged by this worker

    def _merge(self, key: bytes, entry: Any, times: Sequence[float]) -> None:
        """Under the lock: this worker's grants before the refusal that claimed the slot, into
        its ring and its budget (once per claim)."""
        claimed_by = float(entry.claimed_by)
        if self._merged.get(key) == claimed_by:
            return
        if len(self._merged) >= CAPACITY:
            self._merged.clear()
        self._merged[key] = claimed_by
        span = self.policy.window_s + self.margin_s
        mine = [t for t in times if claimed_by - span < t < claimed_by]
        if not mine:
            return
        ring = sorted(ring_times(entry) + mine)[-self.table.ring:]  # once per claim: no repeats
        entry.count = entry.head = 0
        for t in ring:
            ring_push(entry, t)
        # Refusals since the claim counted without these grants too: the budget is raised to
        # what Kore.ai had accepted when it first refused (a later, lower limit is learned
        # again when Kore.ai refuses at it).
        accepted = accepted_before(ring, claimed_by, span)
        entry.budget = max(int(entry.budget), min(accepted, self.policy.configured))

    def _load(self, slot: Any) -> Learned:
        return Learned(int(slot.budget), float(slot.pause_until), float(slot.pause_s),
                       float(slot.refused_at), int(slot.epoch))

    def _save(self, slot: Any, state: Learned) -> None:
        slot.budget, slot.pause_until, slot.pause_s = state.budget, state.pause_until, state.pause_s
        slot.refused_at, slot.epoch = state.refused_at, state.epoch

    def _live(self, key: bytes, now: float) -> Any | None:
        slot = self.table.find(key)
        if slot is not None and expired(self._load(slot), self.policy, now):
            self.table.release(slot)
            return None
        return slot

    def reserve(self, bot_id: str, slot: float, now: float, times: Sequence[float],
                fits: Fits) -> tuple[float, int, bool]:
        key = bot_key(bot_id)
        if self.table.find(key) is None:  # nothing learned: no lock taken
            return slot, 0, fits(slot)
        with self.table.locked():
            entry = self._live(key, now)
            if entry is None:
                return slot, 0, fits(slot)
            self._merge(key, entry, times)
            state = self._load(entry)
            slot = max(slot, state.pause_until)
            if entry.count:
                slot = max(slot, ring_at(entry, 1) + self.spacing_s)
            budget = budget_at(state, self.policy, slot)
            if budget is not None and entry.count >= min(budget, self.table.ring):
                slot = max(slot, learned_slot(ring_at(entry, min(budget, self.table.ring))
                                              + self.policy.window_s + self.margin_s,
                                              state, self.policy))
            granted = fits(slot)
            if granted:
                ring_push(entry, slot)
            return slot, state.epoch, granted

    def refused(self, bot_id: str, grant: Grant, retry_after_s: float | None, now: float,
                times: Sequence[float]) -> tuple[Learned, bool]:
        key, window = bot_key(bot_id), self.policy.window_s
        with self.table.locked():
            entry = self._live(key, now)
            if entry is not None:
                self._merge(key, entry, times)
            seen = times if entry is None else ring_times(entry)
            state, started = refuse(None if entry is None else self._load(entry), self.policy,
                                    now=now, slot=grant.slot, retry_after_s=retry_after_s,
                                    accepted=accepted_before(seen, grant.slot,
                                                             window + self.margin_s))
            if entry is None:
                entry = self.table.claim(key, bot_id, lambda s: expired(
                    self._load(s), self.policy, now))
                for at in [t for t in times if t > now - window - self.margin_s][-self.table.ring:]:
                    ring_push(entry, at)
                entry.claimed_by = grant.slot
                self._merged[key] = grant.slot  # its own grants are in the ring already
            self._save(entry, state)
            ring_forget(entry, grant.slot)
            ring_void_after(entry, now)
        return state, started

    def restamp(self, bot_id: str, at: float, now: float) -> None:
        key = bot_key(bot_id)
        if self.table.find(key) is None:
            return
        with self.table.locked():
            entry = self.table.find(key)
            if entry is None:
                return
            times = ring_times(entry)
            if at in times:
                times.remove(at)
                times.append(now)
                times.sort()
                entry.count = entry.head = 0
                for t in times:
                    ring_push(entry, t)

    def epoch(self, bot_id: str, now: float) -> int:
        slot = self.table.find(bot_key(bot_id))
        if slot is None or expired(self._load(slot), self.policy, now):
            return 0
        return int(slot.epoch)

    def views(self, now: float) -> list[BotView]:
        views = []
        with self.table.locked():
            for slot in self.table.live():
                state = self._load(slot)
                if expired(state, self.policy, now):
                    continue
                name = bytes(slot.name)[:slot.name_len].decode("utf-8", "replace")
                views.append(BotView(name, shown(state, self.policy, now),
                                     max(0.0, state.pause_until - now)))
        return views


def _table_dir() -> str | None:
    return str(TMPFS) if TMPFS.is_dir() and os.access(TMPFS, os.W_OK) else None


@contextlib.contextmanager
def shared_table(config: RateLimitConfig, workers: int) -> Iterator[Path | None]:
    """The table for the workers about to be started; enter it before starting them."""
    if workers <= 1 or not config.enabled or config.backend != "memory":
        yield None
        return
    directory = Path(tempfile.mkdtemp(prefix="kore-gateway-ratelimit-", dir=_table_dir()))
    path = directory / "learned.table"
    try:
        Table.create(path, ring_size(Policy.of(config.windows).configured))
        os.environ[ENV] = str(path)
        yield path
    finally:
        os.environ.pop(ENV, None)
        shutil.rmtree(directory, ignore_errors=True)


def attach(policy: Policy, margin_s: float) -> SharedLearning | None:
    """The supervisor's table, in a worker; None when this process was started without one."""
    path = os.environ.get(ENV)
    if not path:
        return None
    return SharedLearning(Table.open(Path(path)), policy, margin_s)
