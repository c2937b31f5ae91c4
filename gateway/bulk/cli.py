"""`kore-gateway deactivate`: its flags, the rows and options they describe, and the run.

Turns the command line into rows (`rows.py`) and `Options`, runs `bulk.run_bulk` with Ctrl-C
and SIGTERM wired to a clean stop, and prints the outcome; the sending itself is `bulk.py`'s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gateway.bulk.progress import make_progress
from gateway.bulk.rows import BulkError, ResultsFile, Row, read_rows, unique
from gateway.bulk.sender import (
    DEFAULT_CONCURRENCY,
    DEFAULT_GRACE_S,
    DEFAULT_KEY_ENV,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MAX_WAIT_S,
    DEFAULT_TIMEOUT_S,
    DEFAULT_URL,
    Options,
    Stop,
    Summary,
    run_bulk,
)
from gateway.config.model import Secret, is_loopback


def add_arguments(parser: argparse.ArgumentParser) -> None:
    which = parser.add_argument_group("what to deactivate (one user, or a CSV)")
    which.add_argument("--bot", metavar="BOT_ID", help="one user: the bot")
    which.add_argument("--user", metavar="USER_ID", help="one user: the user")
    which.add_argument("--channel", help="one user: the channel (optional)")
    which.add_argument("--csv", type=Path, metavar="FILE",
                       help="a CSV with the header botId,userId[,channel]")
    parser.add_argument("--results", type=Path, metavar="FILE", help=(
        "results CSV, appended row by row; a rerun with it skips rows already done "
        "(default with --csv: FILE.results.csv)"))
    parser.add_argument("--url", default=DEFAULT_URL, help="the gateway (default %(default)s)")
    parser.add_argument("--key-env", default=DEFAULT_KEY_ENV, metavar="VAR",
                        help="environment variable holding the caller key (default %(default)s)")
    parser.add_argument("--no-key", action="store_true",
                        help='send no key (a gateway with server.auth = "none")')
    parser.add_argument("--concurrency", type=_positive(int, 1, 256), default=DEFAULT_CONCURRENCY,
                        metavar="N", help="rows in flight at once (default %(default)s)")
    parser.add_argument("--max-attempts", type=_positive(int, 1, 100),
                        default=DEFAULT_MAX_ATTEMPTS, metavar="N",
                        help="tries per row on 429/503/no answer (default %(default)s)")
    parser.add_argument("--max-wait-s", type=_positive(float, 0, 3600), default=DEFAULT_MAX_WAIT_S,
                        metavar="S", help="longest Retry-After honoured (default %(default)s)")
    parser.add_argument("--timeout-s", type=_positive(float, 0.1, 3600),
                        default=DEFAULT_TIMEOUT_S, metavar="S",
                        help="one request's time limit (default %(default)s)")
    parser.add_argument("--grace-s", type=_positive(float, 0, 600), default=DEFAULT_GRACE_S,
                        metavar="S", help="after Ctrl-C, how long in-flight rows may finish "
                        "(default %(default)s)")


def _positive(kind: type, low: float, high: float) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: not a number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text}: must be {low:g}–{high:g}")
        return value
    return parse


def plan(args: argparse.Namespace, env: Mapping[str, str]) -> tuple[list[Row], Options,
                                                                    Path | None]:
    """Rows, options and results path from the command line; raises BulkError."""
    single = args.bot is not None or args.user is not None
    if single == (args.csv is not None):
        raise BulkError("give either --bot and --user (one user) or --csv FILE")
    if single:
        if not args.bot or not args.user:
            raise BulkError("one user needs both --bot and --user")
        rows = [Row(args.bot, args.user, args.channel or None, 1)]
        results = args.results
    else:
        if args.channel is not None:
            raise BulkError("--channel goes with --bot/--user; a CSV has its own channel column")
        rows = read_rows(args.csv)
        results = args.results or args.csv.with_name(args.csv.name + ".results.csv")
    return rows, Options(url=_checked_url(args.url), key=_key(args, env),
                         concurrency=args.concurrency, max_attempts=args.max_attempts,
                         max_wait_s=args.max_wait_s, timeout_s=args.timeout_s,
                         grace_s=args.grace_s), results


def _key(args: argparse.Namespace, env: Mapping[str, str]) -> Secret | None:
    if args.no_key:
        return None
    value = env.get(args.key_env, "").strip()
    if not value:
        raise BulkError(f"set the caller key in ${args.key_env} (or name another variable with "
                        "--key-env; --no-key for a gateway with auth = \"none\")")
    return Secret(value)


def _checked_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BulkError(f"--url {url}: must be http(s)://HOST[:PORT]")
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        print(f"warning: {url} is plain http on a non-loopback host: the key travels "
              "unencrypted", file=sys.stderr)
    return url.rstrip("/")


def run_command(args: argparse.Namespace) -> int:
    """`kore-gateway deactivate`: 0 all rows succeeded, 1 some did not, 2 bad usage,
    128 + signal when stopped by Ctrl-C (130) or SIGTERM."""
    rows, options, results_path = plan(args, os.environ)
    rows, repeats = unique(rows)
    if repeats:
        print(f"{repeats} repeated row(s) ignored", file=sys.stderr)
    results = ResultsFile(results_path) if results_path is not None else None
    if results is not None:
        results.open()
    try:
        summary, signum = asyncio.run(_run(rows, options, results))
    finally:
        if results is not None:
            results.close()
    _report(summary, results_path, len(rows) == 1 and args.csv is None)
    return summary.exit_code(signum)


async def _run(rows: list[Row], options: Options, results: ResultsFile | None
               ) -> tuple[Summary, int | None]:
    stop = Stop()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.signal, signum)
    progress = make_progress() if len(rows) > 1 else None
    summary = await run_bulk(rows, options, results, stop, progress)
    return summary, stop.signum


def _report(summary: Summary, results: Path | None, single: bool) -> None:
    if summary.stopped_by:
        print(f"stopped: {summary.stopped_by}; rows not finished stay not done "
              "(run the same command again to continue)", file=sys.stderr)
    if single and summary.last is not None:
        bot, user, channel, status, code, request_id = summary.last.fields()
        print(f"{bot} {user}{' ' + channel if channel else ''}: {status} ({code}), "
              f"requestId {request_id or '-'}")
    else:
        print(summary.line())
    if results is not None:
        print(f"results: {results}")
