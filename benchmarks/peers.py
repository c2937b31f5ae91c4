"""The servers compared: the gateway (`kore-gateway serve --workers N`, every feature on) and
its two peers, each turning the simplified call (`POST /v1/bots/{botId}/sessions/deactivate`)
into the Kore.ai PUT on the same stub with a static `auth` header (a long-lived JWT pasted into
its config):

- the aiohttp floor (`benchmarks/floor.py`): the barest proxy on the gateway's own stack
  (aiohttp, uvloop, forked workers); the targets are set against it;
- nginx, the reverse proxy a platform team would otherwise deploy, as the outside reference;
  the body passes through as sent.

Neither has caller keys, input rules, audit or token renewal: they are floors of what
forwarding costs, not equivalent products.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.load import Request
from benchmarks.nginx import start_nginx
from benchmarks.ports import free_port
from benchmarks.procs import Server, start
from gateway.auth import hash_key

BOT = "st-bench-bot"
DEACTIVATION_PATH = f"/v1/bots/{BOT}/sessions/deactivate"
DEACTIVATION_BODY = b'{"userId":"u-1001","channel":"rtm"}'
APP = "bench"
TOKEN_TTL_S = 600
RENEW_BEFORE_S = 60
NO_THROTTLE_WINDOW = (1_000_000_000, 60)  # on, but never the limit in a benchmark


@dataclass(frozen=True)
class Credentials:
    client_id: str
    secret: str
    caller_key: str



def deactivation(caller_key: str | None = None) -> Request:
    """The benchmarks' simplified call, the same every time; with the caller's key when the
    target checks one (the gateway, the contract minimum)."""
    headers = {"Content-Type": "application/json"}
    if caller_key is not None:
        headers["Authorization"] = f"Bearer {caller_key}"
    return Request("POST", DEACTIVATION_PATH, DEACTIVATION_BODY, headers)

def start_peer(directory: Path, workers: int, stub_url: str, static_jwt: str) -> Server:
    port = free_port()
    upstream = stub_url.removeprefix("http://")
    http = f"""    upstream kore {{
        server {upstream};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        location ~ ^/v1/bots/([^/]+)/sessions/deactivate$ {{
            proxy_pass http://kore/api/public/bot/$1/session;
            proxy_method PUT;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "";
            proxy_set_header Content-Type application/json;
            proxy_set_header auth "{static_jwt}";
        }}
        location = /healthz {{
            return 200 'ok';
        }}
    }}"""
    return start_nginx("nginx", directory, workers, http, f"http://127.0.0.1:{port}")


def start_floor(directory: Path, workers: int, stub_url: str, static_jwt: str, *,
                audit_io: bool = False, contract_minimum: bool = False,
                caller_key: str | None = None, launcher: Sequence[str] = (),
                kept: bool = False) -> Server:
    """The aiohttp floor; with `audit_io`, plus the contract's audit I/O (`floor.AuditIO`);
    with `contract_minimum`, plus every per-request duty of the contract in its cheapest form
    (audit I/O included; `caller_key`, e.g. `Credentials.caller_key`, is the one key it takes),
    and with `kept` as well, plus the gateway's two kept behaviours (`--kept-behaviours`).
    `launcher`: the command that takes the floor's arguments, if not `python -m benchmarks.floor`.
    """
    if kept and not contract_minimum:
        raise ValueError("the kept behaviours are the contract minimum's")
    from benchmarks.floor import CALLER_KEY_ENV, TOKEN_ENV

    directory.mkdir(parents=True, exist_ok=True)
    listen = f"127.0.0.1:{free_port()}"
    argv = [*(launcher or (sys.executable, "-m", "benchmarks.floor")), "--listen", listen,
            "--upstream", stub_url, "--workers", str(workers)]
    if audit_io or contract_minimum:
        (directory / "audit").mkdir(exist_ok=True)
        argv += ["--audit-dir", str(directory / "audit")]
    env = {**os.environ, TOKEN_ENV: static_jwt}
    name = "floor_audit" if audit_io else "floor"
    if contract_minimum:
        if caller_key is None:
            raise ValueError("the contract minimum needs a caller key")
        argv.append("--contract-minimum")
        env[CALLER_KEY_ENV] = caller_key
        name = "floor_minimum"
        if kept:
            argv.append("--kept-behaviours")
            name = "floor_minimum_kept"
    return start(name, argv, f"http://{listen}", directory / "floor.log", env=env)


def gateway_config(directory: Path, stub_url: str, creds: Credentials) -> Path:
    """Every feature on: API keys, input rules, fsynced audit, cached JWT, rate limit."""
    port = free_port()
    calls, per_s = NO_THROTTLE_WINDOW
    text = f"""[server]
listen = "127.0.0.1:{port}"
auth = "api-key"

[upstream]
base_url = {json.dumps(stub_url)}
allow_insecure_http = true
timeout_s = 10

[audit]
path = {json.dumps(str(directory / "audit" / "deactivations.jsonl"))}
fsync = true

[rate_limit]
enabled = true
backend = "memory"
windows = [{{ calls = {calls}, per_s = {per_s} }}]

[logging]
level = "info"
format = "json"

[[apps]]
name = "{APP}"
client_id = {json.dumps(creds.client_id)}
client_secret = {json.dumps(creds.secret)}
token_ttl_s = {TOKEN_TTL_S}
renew_before_s = {RENEW_BEFORE_S}
jti = false
bots = ["st-*"]

[[callers]]
name = "bench-caller"
key_sha256 = "{hash_key(creds.caller_key)}"
bots = ["st-*"]
"""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "gateway.toml"
    path.write_text(text)
    return path


def listen_url(config_path: Path) -> str:
    for line in config_path.read_text().splitlines():
        if line.startswith("listen = "):
            return "http://" + str(json.loads(line.split("=", 1)[1]))
    raise ValueError(f"{config_path}: no listen line")


def start_gateway(directory: Path, workers: int, stub_url: str, creds: Credentials) -> Server:
    config = gateway_config(directory, stub_url, creds)
    argv = [sys.executable, "-m", "gateway", "serve", "--config", str(config),
            "--workers", str(workers)]
    return start("gateway", argv, listen_url(config), directory / "gateway.log")


def gateway_log_events(log: Path, event: str) -> list[dict[str, object]]:
    """The gateway's JSON log lines for one event."""
    found = []
    for line in log.read_text(errors="replace").splitlines():
        if f'"{event}"' in line:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("event") == event:
                found.append(record)
    return found


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text → {sample name: value summed over its labels}."""
    sums: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        try:
            sums[name] = sums.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return sums
