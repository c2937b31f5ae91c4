"""`kore-gateway`: serve, deactivate, sandbox, demo, hash-key, check-config, audit verify.

The only module that calls `sys.exit`. Exit codes: 0 ok, 1 a check failed (audit verify),
2 bad usage or configuration, 3 audit verify found no break but could not check every hash
(a keyed chain and no key given).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from gateway import __version__
from gateway.audit.anchors import read_anchors
from gateway.audit.log import AuditOpenError, ChainKey, verify_files
from gateway.auth import hash_key, new_key
from gateway.bulk.cli import add_arguments as add_bulk_arguments
from gateway.config.loader import load_config
from gateway.config.model import Config, ConfigError, Secret, upstream_host
from gateway.config.tables import config_warnings
from gateway.errors import ListenError
from gateway.http.reload import DEFAULT_WATCH_S, MAX_WATCH_S, MIN_WATCH_S

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "config" / "demo.toml"
DEMO_KEY = "kgw_demo_local_only"  # the demo caller's key; config/demo.toml holds its hash
DEMO_BOT = "st-demo-bot"
MAX_WORKERS = 256  # past it, a typo (--workers 100000) would fork until memory runs out


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        code = args.run(args)
    except ConfigError as exc:
        print(f"configuration error:\n{exc}", file=sys.stderr)
        code = 2
    except AuditOpenError as exc:
        print(f"audit log error: {exc}", file=sys.stderr)
        code = 2
    except ListenError as exc:
        print(f"listen error: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kore-gateway", description=(
        "Authenticating gateway that closes Kore.ai bot sessions for internal callers."))
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the gateway")
    _config_option(serve)
    serve.add_argument("--workers", type=int, default=1, metavar="N",
                       help="worker processes sharing the port (SO_REUSEPORT)")
    serve.add_argument("--watch-config", type=float, nargs="?", const=DEFAULT_WATCH_S,
                       default=None, metavar="SECONDS", help=(
                           "also reload when the config file or a secret file it names "
                           f"changes, checked every SECONDS (default {DEFAULT_WATCH_S:g}); "
                           "SIGHUP always reloads"))
    serve.set_defaults(run=cmd_serve)

    deactivate = commands.add_parser("deactivate", help=(
        "close sessions through a running gateway: one user, or a CSV (resumable)"))
    add_bulk_arguments(deactivate)
    deactivate.set_defaults(run=cmd_deactivate)

    sandbox = commands.add_parser("sandbox", help="run a local Kore.ai session API emulator")
    _sandbox_options(sandbox)
    sandbox.set_defaults(run=cmd_sandbox)

    demo = commands.add_parser("demo", help="gateway + sandbox on loopback, for a first look")
    demo.add_argument("--config", default=str(DEMO_CONFIG), help="demo config (default: %(default)s)")
    demo.add_argument("--sandbox-port", type=int, default=9090,
                      help="loopback port of the sandbox the demo starts (default: %(default)s)")
    demo.set_defaults(run=cmd_demo)

    hk = commands.add_parser("hash-key", help="print a new caller key and its key_sha256 line")
    hk.add_argument("--stdin", action="store_true", help="hash a key read from stdin instead")
    hk.set_defaults(run=cmd_hash_key)

    check = commands.add_parser("check-config", help="validate a config file and exit")
    _config_option(check)
    check.set_defaults(run=cmd_check_config)

    audit = commands.add_parser("audit", help="audit log tools")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    verify = audit_commands.add_parser("verify", help="verify the hash chain and seq order")
    verify.add_argument("paths", nargs="+", type=Path, metavar="PATH",
                        help="audit files, oldest first (rotated files, then the current one)")
    verify.add_argument("--key-env", action="append", default=[], metavar="NAME",
                        help="environment variable holding the chain key (repeatable: files "
                        "written before a key change)")
    verify.add_argument("--key-file", action="append", default=[], type=Path, metavar="PATH",
                        help="file holding the chain key (repeatable)")
    verify.add_argument("--anchors", action="extend", nargs="+", default=[], type=Path,
                        metavar="LOGFILE", help="gateway logs holding audit.anchor lines; the "
                        "files must agree with every anchor naming them (give it after PATH…)")
    verify.set_defaults(run=cmd_audit_verify)
    return parser


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, metavar="PATH",
                        help="config file (default: $GATEWAY_CONFIG)")


def _sandbox_options(parser: argparse.ArgumentParser) -> None:
    from gateway.sandbox.cli import add_arguments

    add_arguments(parser)
    parser.add_argument("--config", default=None, metavar="PATH",
                        help="take the Kore.ai apps (client IDs and keys) from a gateway config "
                        "(default: $GATEWAY_CONFIG)")
    parser.add_argument("--client-id", default=None, help="a Kore.ai app client ID to accept")
    parser.add_argument("--client-secret-env", default=None, metavar="VAR",
                        help="environment variable holding that app's client secret")


def resolve_config(path: str | None) -> Config:
    chosen = path or os.environ.get("GATEWAY_CONFIG")
    if not chosen:
        raise ConfigError("<none>", ["no config file: pass --config PATH or set GATEWAY_CONFIG"])
    return load_config(chosen)


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway.http.server import open_log_file, serve
    from gateway.logs import LogFileError, configure

    config = resolve_config(args.config)
    if not 1 <= args.workers <= MAX_WORKERS:
        print(f"--workers must be 1–{MAX_WORKERS}", file=sys.stderr)
        return 2
    watch = args.watch_config
    if watch is not None and not MIN_WATCH_S <= watch <= MAX_WATCH_S:
        print(f"--watch-config must be {MIN_WATCH_S:g}–{MAX_WATCH_S:g} seconds", file=sys.stderr)
        return 2
    try:
        log_file = open_log_file(config)
    except LogFileError as exc:
        raise ConfigError(config.source, [f"logging.file: {exc}"]) from None
    configure(config.logging.level, config.logging.format, log_file)
    try:
        return serve(config, args.workers, watch_s=watch)
    except AuditOpenError as exc:  # named as a config problem: the key and the file to fix
        raise ConfigError(config.source, [f"audit.path: {exc}"]) from None


def cmd_deactivate(args: argparse.Namespace) -> int:
    from gateway.bulk.cli import run_command
    from gateway.bulk.rows import BulkError

    try:
        return run_command(args)
    except BulkError as exc:
        print(f"deactivate: {exc}", file=sys.stderr)
        return 2


def cmd_sandbox(args: argparse.Namespace) -> int:
    from gateway.logs import configure
    from gateway.sandbox.cli import run_sandbox, sandbox_from_args
    from gateway.sandbox.server import SandboxApp

    configure()
    apps: list[SandboxApp] = []
    config_path = args.config or (None if args.client_id else os.environ.get("GATEWAY_CONFIG"))
    if config_path:  # the apps of the gateway it stands in front of
        apps += [SandboxApp.from_kore_app(a) for a in load_config(config_path).apps]
    if args.client_id:
        secret = os.environ.get(args.client_secret_env or "", "")
        if not secret:
            print("--client-id needs --client-secret-env naming a set variable", file=sys.stderr)
            return 2
        apps.append(SandboxApp(client_id=args.client_id, key=Secret(secret).reveal()))
    if not apps:
        print("give --config (or set GATEWAY_CONFIG) or --client-id/--client-secret-env",
              file=sys.stderr)
        return 2
    host, port = _split(args.listen)
    run_sandbox(sandbox_from_args(args, apps), host, port)  # a ListenError: see main()
    return 0


def _split(listen: str) -> tuple[str, int]:
    from gateway.config.model import split_listen

    try:
        return split_listen(listen)
    except ValueError as exc:
        raise SystemExit(f"--listen {listen}: {exc}") from None


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo
    from gateway.logs import configure

    config = load_config(args.config)
    configure(config.logging.level, config.logging.format)
    return asyncio.run(run_demo(config, args.sandbox_port, DEMO_KEY, DEMO_BOT))


def cmd_hash_key(args: argparse.Namespace) -> int:
    key = sys.stdin.readline().strip() if args.stdin else new_key()
    if not key:
        print("no key on stdin", file=sys.stderr)
        return 2
    if not args.stdin:
        print(f"caller key (give it to the caller, store it nowhere else): {key}")
    print(f'key_sha256 = "{hash_key(key)}"')
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    config = resolve_config(args.config)
    print(f"{config.source}: OK ({len(config.apps)} app(s), {len(config.callers)} caller(s), "
          f"listen {config.server.listen}, upstream {upstream_host(config.upstream.base_url)})")
    for warning in config_warnings(config):
        print(f"warning: {config.source}: {warning}", file=sys.stderr)
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    keys = _chain_keys(args.key_env, args.key_file)
    if keys is None:
        return 2
    try:
        anchors = read_anchors(args.anchors)
    except OSError as exc:
        print(f"--anchors {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    report = verify_files(args.paths, keys=keys, anchors=anchors)
    if report.error is not None:
        print(f"BROKEN: {report.error}", file=sys.stderr)
        return 1
    checked = f", {report.anchors} anchor(s) agree" if anchors else ""
    if report.unchecked:
        print(f"UNCHECKED: {report.unchecked} of {report.records} record(s) are HMAC-chained "
              f"and no key was given, so their hashes cannot be checked (the seq order and "
              f"the prev links hold{checked}); give --key-env or --key-file", file=sys.stderr)
        return 3
    keyed = " (HMAC checked)" if keys else ""
    print(f"OK: {report.records} record(s) in {report.files} file(s), chain intact{keyed}"
          f"{checked}")
    return 0


def _chain_keys(env_names: list[str], files: list[Path]) -> list[ChainKey] | None:
    """The keys given, read as the gateway reads them (a file's text stripped, a variable's
    value as it is), or None after saying what is wrong."""
    keys = []
    for name in env_names:
        value = os.environ.get(name, "")
        if not value:
            print(f"--key-env {name}: the variable is not set or empty", file=sys.stderr)
            return None
        keys.append(ChainKey(value.encode("utf-8")))
    for path in files:
        try:
            value = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            print(f"--key-file {path}: cannot read it ({exc.strerror or exc})", file=sys.stderr)
            return None
        except UnicodeDecodeError:
            print(f"--key-file {path}: not UTF-8 text", file=sys.stderr)
            return None
        if not value:
            print(f"--key-file {path}: the file is empty", file=sys.stderr)
            return None
        keys.append(ChainKey(value.encode("utf-8")))
    return keys
