"""`python -m gateway.http.healthcheck [PATH | URL]`: the probe a container runs against its gateway.

Used by the Docker `HEALTHCHECK` and by Kubernetes exec probes where the kubelet's HTTP probes
cannot reach the gateway (a sidecar on the pod's loopback without `server.admin_listen`). It GETs
one route and exits 0 on a 2xx, 1 on anything else (never 2, which Docker reserves). A bare path
goes to the config's `server.admin_listen` address when one is set, else to `server.listen` (the
config in `GATEWAY_CONFIG`; a wildcard address is reached over loopback), so one image works
whatever ports the config chooses. It writes nothing and sets up no logging.

It runs every few seconds, so it imports the standard library only: not `gateway.cli` (every
command's dependencies) nor `gateway.config` (cryptography); that is why it is its own entry
point and reads the `[server]` addresses with `tomllib` itself.
"""

from __future__ import annotations

import os
import socket
import sys
import tomllib
from collections.abc import Mapping, Sequence
from urllib.parse import urlsplit

DEFAULT_PATH = "/healthz"
DEFAULT_LISTEN = "127.0.0.1:8080"  # as gateway.config.DEFAULT_LISTEN
PROBE_TIMEOUT_S = 3.0
MAX_ANSWER_BYTES = 4096  # health answers are small JSON; enough for the status and a hint
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}
USAGE = "usage: python -m gateway.http.healthcheck [PATH | http://HOST:PORT/PATH]  (default /healthz)"


class ProbeError(Exception):
    """The probe could not be aimed (no config, unreadable listen address, bad argument)."""


def target_url(listen: str, path: str = DEFAULT_PATH) -> str:
    """The URL that reaches a gateway listening on `listen` from inside its own container."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ProbeError(f"listen address {listen!r}: expected HOST:PORT with a port 1-65535")
    host = host.removeprefix("[").removesuffix("]")
    host = _WILDCARDS.get(host, host)
    return f"http://{f'[{host}]' if ':' in host else host}:{int(port)}{path}"


def listen_from_config(path: str | None) -> str:
    """The address to probe in the config at `path`, read without resolving secrets:
    `server.admin_listen` when set (probes and metrics live there), else `server.listen`."""
    if not path:
        raise ProbeError("GATEWAY_CONFIG is not set: pass a full URL instead of a path")
    try:
        with open(path, "rb") as f:
            server = tomllib.load(f).get("server", {})
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ProbeError(f"{path}: {exc}") from None
    if not isinstance(server, dict):
        raise ProbeError(f"{path}: [server] must be a table")
    admin = server.get("admin_listen", "")
    if admin:
        return _text(admin, "server.admin_listen", path)
    return _text(server.get("listen", DEFAULT_LISTEN), "server.listen", path)


def _text(value: object, key: str, path: str) -> str:
    if not isinstance(value, str):
        raise ProbeError(f"{path}: {key} must be a string")
    return value


def resolve(argument: str | None, config_path: str | None) -> str:
    """The URL to probe: `argument` itself if it is a URL, else a path on the config's address."""
    if argument and "://" in argument:
        if not argument.startswith("http://"):
            raise ProbeError(f"{argument}: only http:// URLs (the gateway serves plain HTTP)")
        return argument
    path = argument or DEFAULT_PATH
    if not path.startswith("/"):
        raise ProbeError(f"{path!r}: give a path starting with / or an http:// URL")
    return target_url(listen_from_config(config_path), path)


def probe(url: str, timeout_s: float = PROBE_TIMEOUT_S) -> tuple[bool, str]:
    """GET `url` over plain HTTP/1.0, no proxy; (healthy, one line saying what was seen)."""
    parts = urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    request = f"GET {target} HTTP/1.0\r\nHost: {parts.netloc}\r\nConnection: close\r\n\r\n"
    try:
        with socket.create_connection((parts.hostname or "", parts.port or 80),
                                      timeout=timeout_s) as conn:
            conn.sendall(request.encode("ascii"))
            answer = _read_some(conn, MAX_ANSWER_BYTES)
    except (OSError, ValueError, UnicodeError) as exc:
        return False, f"{url}: {exc or type(exc).__name__}"
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    fields = status_line.split(" ", 2)
    if len(fields) < 2 or not fields[0].startswith("HTTP/") or not fields[1].isdigit():
        return False, f"{url}: not an HTTP answer: {status_line[:80]!r}"
    status = int(fields[1])
    text = body[:200].decode("utf-8", "replace").strip()
    return 200 <= status < 300, f"{url}: {status} {text}"


def _read_some(conn: socket.socket, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = conn.recv(limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) > 1 or (args and args[0] in ("-h", "--help")):
        print(USAGE, file=sys.stderr)
        return 1
    env = os.environ if env is None else env
    try:
        url = resolve(args[0] if args else None, env.get("GATEWAY_CONFIG"))
    except ProbeError as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    healthy, detail = probe(url)
    print(f"{'healthy' if healthy else 'unhealthy'}: {detail}",
          file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())  # a probe entry point of its own: see the module docstring
