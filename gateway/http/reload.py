"""Live configuration reload: SIGHUP or a polled file watch re-reads the config file, and the
running `Runtime` takes the new callers and apps (secrets read from `*_file` included).

Owns what may change without a restart, the checks a new config must pass before it is used,
the change summary that is logged, the last reload's verdict (`ReloadStatus`: the
`kgw_config_reload_failed` gauge and the `configReload` detail of /readyz), and the watch.
A refused reload keeps the whole running config, including callers meant to be removed. The swap itself is `Runtime.reload`
(`app.py`); dropping tokens of changed apps is `TokenCache.reload` (`tokens.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import structlog

from gateway.config.loader import load_config
from gateway.config.model import Config, ConfigError
from gateway.kore.tokens import MintError, mint
from gateway.metrics import Metrics

log = structlog.get_logger(__name__)

LIVE_KEYS = ("callers", "apps")  # everything else keeps its running value until a restart
RESTART_TABLES = ("server", "upstream", "audit", "rate_limit", "logging")
DEFAULT_WATCH_S = 2.0
MIN_WATCH_S = 0.1  # the watch never polls faster than this …
MAX_WATCH_S = 3600.0  # … nor slower
MAX_WATCHED_FILES = 64  # the config file plus at most this many secret files it names
_KEY = re.compile(r"[A-Za-z_][\w]*(\[\d+\])?(\.[A-Za-z_][\w]*(\[\d+\])?)*")
MAX_ERROR_CHARS = 500  # of the /readyz error text
UNEXPECTED = "the reload failed unexpectedly (config.reload_error in the log); nothing changed"


@dataclass(frozen=True, slots=True)
class ConfigChange:
    """What a reload changed (names only, never a value)."""

    callers_added: tuple[str, ...] = ()
    callers_removed: tuple[str, ...] = ()
    callers_changed: tuple[str, ...] = ()
    apps_added: tuple[str, ...] = ()
    apps_removed: tuple[str, ...] = ()
    apps_changed: tuple[str, ...] = ()  # settings or secret changed: cached token dropped
    restart_required: tuple[str, ...] = ()  # dotted keys that differ but kept their value

    @property
    def live(self) -> bool:
        """True when callers or apps changed."""
        return any(getattr(self, f.name) for f in dataclasses.fields(self)
                   if f.name != "restart_required")

    def log_fields(self) -> dict[str, list[str]]:
        return {f.name: list(getattr(self, f.name)) for f in dataclasses.fields(self)
                if getattr(self, f.name)}


def diff(old: Config, new: Config) -> ConfigChange:
    callers = _named_diff(old.callers, new.callers)
    apps = _named_diff(old.apps, new.apps)
    return ConfigChange(*callers, *apps, restart_required=restart_only_changes(old, new))


def _named_diff(old: Sequence[Any], new: Sequence[Any]
                ) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    before = {item.name: item for item in old}
    after = {item.name: item for item in new}
    added = tuple(n for n in after if n not in before)
    removed = tuple(n for n in before if n not in after)
    changed = tuple(n for n in after if n in before and after[n] != before[n])
    return added, removed, changed


def restart_only_changes(old: Config, new: Config) -> tuple[str, ...]:
    """Dotted keys outside callers and apps whose value differs (listen, audit path, …)."""
    keys = []
    for table in RESTART_TABLES:
        before, after = getattr(old, table), getattr(new, table)
        keys += [f"{table}.{f.name}" for f in dataclasses.fields(before)
                 if getattr(before, f.name) != getattr(after, f.name)]
    return tuple(keys)


def live_config(old: Config, new: Config) -> Config:
    """The config a process runs with after a reload: new callers and apps, the rest kept."""
    return dataclasses.replace(old, callers=new.callers, apps=new.apps)


def reload_problems(old: Config, new: Config, now: float | None = None) -> list[str]:
    """Why `new` must not replace `old` in a running process (beyond `load_config`'s checks)."""
    problems = []
    if old.server.auth == "api-key" and not new.callers:
        problems.append('callers: at least one [[callers]] entry is required while the running '
                        'server.auth is "api-key"')
    when = time.time() if now is None else now
    for index, app in enumerate(new.apps):
        try:
            mint(app, when)  # a throw-away token: the new key must sign before it is used
        except MintError as exc:
            field = "client_secret" if app.algorithm.startswith("HS") else "private_key"
            problems.append(f"apps[{index}].{field}: {exc}")
    return problems


def problem_keys(problems: Sequence[str]) -> list[str]:
    """The config keys named by `ConfigError` problems (`<file>` for whole-file problems)."""
    keys = []
    for problem in problems:
        head = problem.split(": ", 1)[0]
        keys.append(head if _KEY.fullmatch(head) else "<file>")
    return keys


class ReloadStatus:
    """The verdict of the last reload: 1 in `kgw_config_reload_failed` and the error in
    /readyz while it failed (never a secret: problems name keys and files, not values)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self.error: str | None = None
        self.keys: list[str] = []
        self.failed_at: str | None = None
        metrics.config_reload_failed(False)

    def failed(self, path: str, problems: Sequence[str]) -> None:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        first = problems[0] if problems else "refused"
        self.error = f"{path}: {first}"[:MAX_ERROR_CHARS] + more
        self.keys = problem_keys(problems)
        self.failed_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self._metrics.config_reload_failed(True)

    def succeeded(self) -> None:
        self.error, self.keys, self.failed_at = None, [], None
        self._metrics.config_reload_failed(False)

    def detail(self) -> dict[str, Any]:
        if self.error is None:
            return {"ok": True}
        return {"ok": False, "error": self.error, "keys": self.keys, "failedAt": self.failed_at,
                "kept": "the running config, whole: callers and apps meant to be removed or "
                        "changed are still in use"}


class Reloadable(Protocol):
    """What a reload acts on: `Runtime` in `app.py`."""

    config: Config
    reload_status: ReloadStatus

    def reload(self, new: Config) -> ConfigChange: ...


Loader = Callable[[str], Config]


class Reloader:
    """Re-reads the config file on request (SIGHUP) or when a watched file changes.

    A new config that fails any check is rejected as a whole with one `config.reload_failed`
    error line naming the keys and the file, `kgw_config_reload_failed` 1 and the error in
    /readyz until a reload succeeds; the running config keeps serving, unchanged. Reloads run one at a time;
    requests arriving during one are coalesced into one more.
    """

    def __init__(self, target: Reloadable, *, path: str | None = None,
                 watch_s: float | None = None, load: Loader = load_config) -> None:
        self.target = target
        self.path = path or target.config.source
        self.watch_s = None if watch_s is None else min(max(watch_s, MIN_WATCH_S), MAX_WATCH_S)
        self._load = load
        self._wanted = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._seen = file_signature(self.path)
        self.attempts = 0

    def request(self) -> None:
        """Asks for a reload; safe to call from a signal handler on the loop."""
        log.info("config.reload_requested", file=self.path)
        self._wanted.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="config-reloader")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def reload(self) -> ConfigChange | None:
        """One reload now; the change applied, or None when the new config was rejected."""
        self.attempts += 1
        self._seen = file_signature(self.path)
        try:
            new = await asyncio.to_thread(self._load, self.path)
            problems = reload_problems(self.target.config, new)
            if problems:
                raise ConfigError(self.path, problems)
        except ConfigError as exc:
            log.error("config.reload_failed", file=self.path, keys=problem_keys(exc.problems),
                      problems=exc.problems, kept="the running config, whole: callers and "
                      "apps meant to be removed or changed are still in use")
            self.target.reload_status.failed(self.path, exc.problems)
            return None
        change = self.target.reload(new)
        self.target.reload_status.succeeded()
        _log_change(self.path, change)
        return change

    async def _loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wanted.wait(), timeout=self.watch_s)
            except TimeoutError:
                if file_signature(self.path) == self._seen:
                    continue
                log.info("config.changed_on_disk", file=self.path)
            self._wanted.clear()
            try:
                await self.reload()
            except Exception:  # a reload must never stop the reloader (nor the gateway)
                log.exception("config.reload_error", file=self.path)
                self.target.reload_status.failed(self.path, [UNEXPECTED])


def _log_change(path: str, change: ConfigChange) -> None:
    if change.restart_required:
        log.warning("config.restart_required", file=path, keys=list(change.restart_required),
                    kept="the running values; restart the gateway to apply them")
    log.info("config.reloaded", file=path, changed=change.live, **{
        k: v for k, v in change.log_fields().items() if k != "restart_required"})


# --- the watch --------------------------------------------------------------------------

Signature = tuple[tuple[str, int, int, int] | tuple[str], ...]


def file_signature(path: str) -> Signature:
    """(path, mtime_ns, size, inode) of the config file and every `*_file` it names.

    Following symlinks, so that a Kubernetes Secret volume, which swaps a `..data` link,
    counts as a change of the secret file.
    """
    return tuple(_stat(p) for p in watched_files(path))


def _stat(path: Path) -> tuple[str, int, int, int] | tuple[str]:
    try:
        st = os.stat(path)
    except OSError:
        return (str(path),)
    return (str(path), st.st_mtime_ns, st.st_size, st.st_ino)


def watched_files(path: str) -> list[Path]:
    """The config file, then the secret files it names (relative to its directory)."""
    config = Path(path)
    try:
        raw = tomllib.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return [config]
    base = config.resolve().parent
    files = sorted({(base / value).resolve() for value in _file_values(raw)})
    return [config, *files[:MAX_WATCHED_FILES]]


def _file_values(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for name, value in node.items():
            if name.endswith("_file") and isinstance(value, str) and value:
                yield value
            else:
                yield from _file_values(value)
    elif isinstance(node, list):
        for item in node:
            yield from _file_values(item)
