"""`kore-gateway sandbox`: its flags, the `KoreSandbox` they describe, and serving it on loopback.

The emulator itself is `sandbox.py`'s, the fault values and their checks `sandbox_faults.py`'s.
"""

from __future__ import annotations

import argparse
import socket
from collections.abc import Callable, Sequence
from typing import Any

from aiohttp import web

from gateway.config.model import is_loopback
from gateway.errors import ListenError
from gateway.sandbox.faults import (
    FAULT_CHECKS,
    LIMIT_ANSWERS,
    LIMIT_PRESETS,
    Faults,
    integer_in,
    limit_preset,
    parse_limit,
)
from gateway.sandbox.server import (
    DEFAULT_KNOWN_BOTS,
    DEFAULT_SESSION_PATH,
    KoreSandbox,
    SandboxApp,
    compile_path,
)

DEFAULT_LISTEN = "127.0.0.1:9090"

_FAULT_FLAGS = {
    "latency_ms": "milliseconds added before answering each call",
    "error_status": "status of --fail-first and --error-rate answers (default 500)",
    "error_rate": "fraction of calls answered with --error-status",
    "fail_first": "the first N calls are answered with --error-status",
    "rate_429": "fraction of calls answered 429 with Retry-After",
    "retry_after_s": "Retry-After sent with --rate-429 (default 1)",
    "drop_rate": "fraction of calls whose connection is closed without an answer",
    "reject_token_next": "the next N calls get 401 as if the token were rejected",
    "limit_status": "status of rate-limit answers (default 429; e.g. 400 or 200: Kore.ai's "
                    "message on another status)",
    "retry_after_header": "Retry-After text sent verbatim with rate-limit answers (e.g. 1e999)",
    "limit_scale": "every --limit/--limits window lasts PER_S times this (e.g. 0.1: 60/6 s)",
    "odd_success": "answer accepted calls with an odd 2xx: empty, no_content (204) or "
                   "string_true ({\"success\": \"true\"})",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `kore-gateway sandbox` flags; `--listen` stays "HOST:PORT" text, checked for loopback."""
    parser.add_argument(
        "--listen",
        type=_arg(_listen_address),
        default=DEFAULT_LISTEN,
        metavar="HOST:PORT",
        help="loopback address (default 127.0.0.1:9090)",
    )
    parser.add_argument(
        "--enforce-jti",
        action="store_true",
        help='Kore.ai\'s "Enforce JTI": also reject a token without a "jti" (one seen before '
             'is always rejected)',
    )
    for name, help_text in _FAULT_FLAGS.items():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, type=_arg(FAULT_CHECKS[name]), help=help_text)
    parser.add_argument(
        "--echo-token",
        action="store_true",
        default=None,
        help="error answers quote the JWT they were sent (to test that it is scrubbed)",
    )
    parser.add_argument(
        "--limit",
        dest="limits",
        action="append",
        type=_arg(parse_limit),
        metavar="CALLS/PER_S",
        help="per-bot window, repeatable (e.g. 600/60)",
    )
    parser.add_argument(
        "--limits",
        dest="limit_preset",
        type=_arg(limit_preset),
        metavar="PRESET",
        help="Kore.ai's documented per-bot windows: " + ", ".join(
            f"{name} ({' + '.join(f'{c}/{p:g}s' for c, p in windows)})"
            for name, windows in LIMIT_PRESETS.items()) + "; adds to --limit",
    )
    parser.add_argument(
        "--limit-answer",
        type=_arg(FAULT_CHECKS["limit_answer"]),
        metavar="STYLE",
        help=f"how --rate-429 and the limits answer: {' or '.join(LIMIT_ANSWERS)} (Kore.ai's "
             "documented message, no Retry-After); default retry-after",
    )
    parser.add_argument(
        "--known-bot",
        action="append",
        metavar="GLOB",
        help="botId glob that exists, repeatable (default st-*)",
    )
    parser.add_argument(
        "--session-path",
        action="append",
        type=_arg(_session_path),
        metavar="TEMPLATE",
        help=f"repeatable (default {DEFAULT_SESSION_PATH})",
    )
    parser.add_argument("--seed", type=_arg(FAULT_CHECKS["seed"]), help="seed of the fault dice")
    parser.add_argument(
        "--fault-bot",
        dest="bots",
        action="append",
        metavar="GLOB",
        help="faults fire only for botIds matching GLOB, repeatable (default: every bot)",
    )


def sandbox_from_args(args: argparse.Namespace, apps: Sequence[SandboxApp]) -> KoreSandbox:
    given = {name: getattr(args, name, None) for name in FAULT_CHECKS}
    preset = getattr(args, "limit_preset", None)
    if preset is not None:
        given["limits"] = [*(given["limits"] or []), *preset]
    faults = Faults(**{name: value for name, value in given.items() if value is not None})
    return KoreSandbox(
        apps,
        enforce_jti=args.enforce_jti,
        session_paths=args.session_path or (DEFAULT_SESSION_PATH,),
        known_bots=args.known_bot or DEFAULT_KNOWN_BOTS,
        faults=faults,
    )


def run_sandbox(sandbox: KoreSandbox, host: str, port: int) -> None:
    """Serve until interrupted; the socket is bound first so the printed URL is real."""
    address = f"[{host}]" if ":" in host else host
    if not is_loopback(host):
        raise ListenError(f"cannot listen on {address}:{port}: not a loopback address")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family)
    except OSError as exc:
        raise ListenError(f"cannot listen on {address}:{port}: {exc.strerror or exc}") from None
    url = f"http://{address}:{sock.getsockname()[1]}"
    web.run_app(
        sandbox.create_app(),
        sock=sock,
        print=lambda _banner: print(f"sandbox listening on {url}", flush=True),
    )


def _arg(check: Callable[[Any], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return check(text)
        except (TypeError, ValueError) as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse


def _listen_address(text: str) -> str:
    host, _, port = text.rpartition(":")
    if not is_loopback(host.removeprefix("[").removesuffix("]")):
        raise ValueError(f"{text!r}: must be HOST:PORT on loopback (127.0.0.0/8, ::1, localhost)")
    integer_in(0, 65535)(port)
    return text


def _session_path(template: str) -> str:
    compile_path(template)
    return template
