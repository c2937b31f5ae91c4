"""nginx (Debian's package) run in the foreground from a config of our own, in a run directory.

Used twice: as the fast upstream stub (`return 200`) and as the peer, the reverse proxy a
platform team would otherwise deploy. Everything it writes stays in its own directory.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from benchmarks.load import INSTALL_HINT
from benchmarks.procs import Server, start

KEEPALIVE_REQUESTS = 1_000_000  # nginx closes a client connection after 1000 by default


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)


def require_nginx() -> str:
    found = nginx_binary()
    if found is None:
        raise SystemExit(f"nginx is not installed: {INSTALL_HINT}")
    return found


def render(directory: Path, workers: int, http_block: str) -> str:
    temp = directory / "temp"
    temps = "\n".join(f"    {kind}_temp_path {temp / kind};"
                      for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""daemon off;
master_process on;
worker_processes {workers};
pid {directory / "nginx.pid"};
error_log {directory / "error.log"} warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    keepalive_requests {KEEPALIVE_REQUESTS};
    keepalive_timeout 75s;
{temps}
{http_block}
}}
"""


def start_nginx(name: str, directory: Path, workers: int, http_block: str, url: str) -> Server:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "temp").mkdir(exist_ok=True)
    conf = directory / "nginx.conf"
    conf.write_text(render(directory, workers, http_block))
    argv = [require_nginx(), "-p", str(directory), "-c", str(conf),
            "-e", str(directory / "error.log")]
    return start(name, argv, url, directory / "stderr.log")
