"""The upstream stub: something fast that answers the Kore.ai session PUT with `{"success": true}`.

nginx with a `return 200` location when nginx is installed (it costs next to nothing, so every
figure measures the proxy in front of it); otherwise the project's own sandbox
(`kore-gateway sandbox`), which also checks each JWT and is much slower. The report says which.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from benchmarks.nginx import nginx_binary, start_nginx
from benchmarks.ports import free_port
from benchmarks.procs import Server, start

STUB_WORKERS = 1
SESSION_LOCATION = r"~ ^/api/public/bot/[^/]+/session$"


def stub_kind(requested: str) -> str:
    """"nginx" or "sandbox"; "auto" picks nginx when it is installed."""
    if requested == "auto":
        return "nginx" if nginx_binary() else "sandbox"
    return requested


def start_stub(kind: str, directory: Path, client_id: str, secret: str) -> Server:
    port = free_port()
    if kind == "nginx":
        return start_nginx("stub", directory, STUB_WORKERS, _stub_http(port),
                           f"http://127.0.0.1:{port}")
    return _start_sandbox(directory, port, client_id, secret)


def _stub_http(port: int) -> str:
    return f"""    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location {SESSION_LOCATION} {{
            default_type application/json;
            return 200 '{{"success": true}}';
        }}
        location = /healthz {{
            return 200 'ok';
        }}
        location / {{
            return 404;
        }}
    }}"""


def _start_sandbox(directory: Path, port: int, client_id: str, secret: str) -> Server:
    directory.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "BENCH_KORE_SECRET": secret}
    argv = [sys.executable, "-m", "gateway", "sandbox", "--listen", f"127.0.0.1:{port}",
            "--client-id", client_id, "--client-secret-env", "BENCH_KORE_SECRET"]
    return start("stub", argv, f"http://127.0.0.1:{port}", directory / "sandbox.log", env=env)
