"""The gateway contract (`docs/api.md`), checked line by line from the outside.

Everything here talks to the product as an operator and its callers would: `python -m gateway
serve` and `python -m gateway sandbox` run as subprocesses on loopback ports, requests are plain
HTTP (`http.client`), the audit log is read as a file, the commands are run as commands. Nothing
of `gateway` is imported. One sandbox and three gateways serve the whole module:

- `main`   api-key callers, default limits, ten Kore.ai apps (every algorithm, every secret
           form, jti, custom claims, a wrong-scope app, glob order), relative paths, a keyless
           audit budget large enough that every keyless request here gets its own record;
- `local`  `auth = "none"`, a permissive `bot_id_pattern`, `max_attempts = 1`, `timeout_s = 2`,
           a small `audit.max_bytes` (rotation);
- `hashed` `hash_user_ids = true`, a custom `session_path`, small body/batch/in-flight limits,
           a one-call-per-hour rate limit, loopback as trusted proxies and a keyless audit
           budget of 2 a second.

Upstream behaviour is varied at run time through the sandbox's control routes
(`PUT /__sandbox/faults`, `GET`/`DELETE /__sandbox/calls`). The sandbox records request headers
case-insensitively and joins a repeated header with ", ", so "each header exactly once" is checked
as "the recorded value is exactly the one value". Test ids and docstrings quote the contract line.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from http import client as http_client
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import jwt
import pytest
import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from benchmarks.ports import free_port

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
KORE_GATEWAY = Path(sys.executable).parent / "kore-gateway"  # the console script
START_TIMEOUT_S = 30.0
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
TS_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
SNAKE_RE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")
JWT_RE = re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*")
ZEROS = "0" * 64
EVENTS = {"deactivate.requested", "deactivate.completed", "deactivate.denied"}
SUPPRESSED = "audit.unauthenticated_suppressed"  # §3 additions: keyless requests past a budget
# What the gateway's HTTP client may set by itself, plus the three headers of section 1.
CLIENT_HEADERS = {"host", "content-length", "user-agent", "accept", "accept-encoding"}
CONTRACT_HEADERS = {"auth", "content-type", "x-request-id"}
NO_FAULTS = {"latency_ms": 0, "error_status": 500, "error_rate": 0, "fail_first": 0,
             "rate_429": 0, "retry_after_s": 1, "drop_rate": 0, "reject_token_next": 0,
             "limits": [], "odd_success": "", "echo_token": False, "bots": []}

# Credentials: each secret is a distinctive string so that a leak anywhere is found.
SECRET_SESSIONS = "sec-sessions-" + secrets.token_hex(12)
SECRET_SPECIAL = "sec-special-" + secrets.token_hex(12)
SECRET_OTHER = "sec-otherscope-" + secrets.token_hex(12)
SECRET_HS512 = "sec-hs512-" + secrets.token_hex(32)
SECRET_JTI = "sec-jti-" + secrets.token_hex(12)
SECRET_CLAIMS = "sec-claims-" + secrets.token_hex(12)
SECRET_CONC = "sec-conc-" + secrets.token_hex(12)
SECRET_MULTI = "sec-multi-" + secrets.token_hex(12)
NARROW_KEY = "kgw_narrow_" + secrets.token_hex(16)
CID = {"sessions": "cs-11111111-1111-4111-8111-111111111111",
       "special": "cs-22222222-2222-4222-8222-222222222222",
       "other-scope": "cs-33333333-3333-4333-8333-333333333333",
       "hs512": "cs-44444444-4444-4444-8444-444444444444",
       "rs256": "cs-55555555-5555-4555-8555-555555555555",
       "rs512": "cs-66666666-6666-4666-8666-666666666666",
       "jti": "cs-77777777-7777-4777-8777-777777777777",
       "claims": "cs-88888888-8888-4888-8888-888888888888",
       "conc": "cs-99999999-9999-4999-8999-999999999999",
       "multi": "cs-aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa"}
ENV_HS512 = "KGW_CONTRACT_HS512_SECRET"
ENV_RS512 = "KGW_CONTRACT_RS512_KEY"
ENV_CHAIN = "KGW_CONTRACT_CHAIN_KEY"
CHAIN_KEY = "chain-key-" + secrets.token_hex(16)
HMAC_CHAIN = "hmac-sha256"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


# --- HTTP, as any caller would speak it ----------------------------------------------------

@dataclass
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    elapsed_s: float = 0.0

    def header(self, name: str) -> str | None:
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    @property
    def content_type(self) -> str:
        return (self.header("Content-Type") or "").split(";")[0].strip().lower()

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.body)


TRANSCRIPT: list[Reply] = []  # every answer a gateway gave in this module (secret checks)
Headers = Mapping[str, str | bytes] | Sequence[tuple[str, str | bytes]]


def http(port: int, method: str, path: str, *, body: bytes | None = None,
         headers: Headers = (), host: str = "127.0.0.1", timeout_s: float = 20.0,
         chunks: Sequence[bytes] | None = None) -> Reply:
    """One request on a fresh connection; headers are sent exactly as given (repeats too)."""
    pairs = list(headers.items()) if isinstance(headers, Mapping) else list(headers)
    conn = http_client.HTTPConnection(host, port, timeout=timeout_s)
    started = time.monotonic()
    try:
        conn.connect()  # a refused connection raises; only a cut-short body is tolerated below
        conn.putrequest(method, path, skip_accept_encoding=True)
        for name, value in pairs:
            conn.putheader(name, value)
        if chunks is not None:
            conn.putheader("Transfer-Encoding", "chunked")
        elif body is not None:
            conn.putheader("Content-Length", str(len(body)))
        try:
            conn.endheaders()
            if chunks is not None:
                for chunk in chunks:
                    conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                conn.send(b"0\r\n\r\n")
            elif body:
                conn.send(body)
        except OSError:
            pass  # the server may answer (413) and close before the whole body is sent
        resp = conn.getresponse()
        reply = Reply(resp.status, resp.getheaders(), resp.read(), time.monotonic() - started)
    finally:
        conn.close()
    return reply


# --- processes ---------------------------------------------------------------------------

def run_cli(args: Sequence[str], *, env: Mapping[str, str] | None = None,
            stdin: str | None = None, timeout_s: float = 30.0, cwd: Path = REPO,
            niced: bool = False) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "GATEWAY_CONFIG"}
    full_env.update(env or {})
    try:
        return subprocess.run([PY, "-m", "gateway", *args], cwd=cwd, env=full_env, input=stdin,
                              capture_output=True, text=True, timeout=timeout_s,
                              preexec_fn=(lambda: os.nice(10)) if niced else None,
                              check=False)
    except subprocess.TimeoutExpired as exc:
        return subprocess.CompletedProcess(exc.cmd, -999, _text(exc.stdout), _text(exc.stderr))


def _text(data: bytes | str | None) -> str:
    if isinstance(data, bytes):
        return data.decode("utf-8", "replace")
    return data or ""


class Process:
    """A `python -m gateway …` subprocess with its output in a file."""

    def __init__(self, name: str, args: Sequence[str], log_dir: Path,
                 env: Mapping[str, str] | None = None) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.popen = subprocess.Popen([PY, "-m", "gateway", *args], cwd=REPO,
                                      env={**os.environ, **(env or {})},
                                      stdout=self._log, stderr=subprocess.STDOUT)

    def wait_http(self, host: str, port: int, path: str = "/healthz",
                  timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.popen.returncode}:\n"
                                     f"{self.output()[-3000:]}")
            try:
                if http(port, "GET", path, host=host, timeout_s=2).status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"{self.name} did not answer {path} within {timeout_s} s")

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stop(self, timeout_s: float = 15.0) -> int | None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._log.close()
        return self.popen.returncode


# --- the sandbox (Kore.ai) ------------------------------------------------------------------

class Kore:
    """The sandbox subprocess, driven through its control routes."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"

    def _control(self, method: str, path: str, payload: Any = None) -> Reply:
        body = None if payload is None else json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"} if body is not None else {}
        return http(self.port, method, path, body=body, headers=headers)

    def faults(self, **changes: Any) -> None:
        reply = self._control("PUT", "/__sandbox/faults", changes)
        assert reply.status == 200, reply.text

    def reset(self) -> None:
        self.faults(**NO_FAULTS)
        assert self._control("DELETE", "/__sandbox/calls").status in (200, 204)

    def calls(self) -> list[dict[str, Any]]:
        reply = self._control("GET", "/__sandbox/calls")
        assert reply.status == 200
        calls: list[dict[str, Any]] = reply.json()
        return calls

    def calls_for(self, rid: str) -> list[dict[str, Any]]:
        return [c for c in self.calls() if c["headers"].get("x-request-id") == rid]

    def none_for(self, rid: str) -> bool:
        """True when no call carried `rid` or a batch item ID `rid.<i>`."""
        ids = [c["headers"].get("x-request-id") or "" for c in self.calls()]
        return not [i for i in ids if i == rid or i.startswith(rid + ".")]

    def wait_call(self, rid: str, timeout_s: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = self.calls_for(rid)
            if found:
                return found[0]
            time.sleep(0.02)
        raise AssertionError(f"no upstream call for {rid}")

    def put(self, path: str, token: str | None, body: Any, *,
            content_type: str = "application/json") -> Reply:
        headers = {"Content-Type": content_type}
        if token is not None:
            headers["auth"] = token
        return http(self.port, "PUT", path, body=json.dumps(body).encode(), headers=headers)


# --- a gateway -----------------------------------------------------------------------------

@dataclass
class Gateway:
    name: str
    host: str
    port: int
    root: Path  # the directory of its config file
    audit_path: Path
    process: Process
    key: str | None  # the caller key it is called with by default
    config_path: Path

    def call(self, method: str, path: str, *, body: bytes | None = None,
             headers: Headers = (), **kw: Any) -> Reply:
        reply = http(self.port, method, path, body=body, headers=headers, host=self.host, **kw)
        TRANSCRIPT.append(reply)
        return reply

    def send(self, method: str, path: str, payload: Any = None, *, rid: str | None = None,
             key: str | None | bool = True, extra: Sequence[tuple[str, str | bytes]] = (),
             content_type: str | None = "application/json", raw: bytes | None = None,
             **kw: Any) -> Reply:
        """A JSON request; `key=True` sends this gateway's default caller key."""
        headers: list[tuple[str, str | bytes]] = []
        use = self.key if key is True else key
        if use:
            headers.append(("Authorization", f"Bearer {use}"))
        if content_type is not None:
            headers.append(("Content-Type", content_type))
        if rid is not None:
            headers.append(("X-Request-ID", rid))
        headers += list(extra)
        body = raw if raw is not None else (None if payload is None
                                            else json.dumps(payload).encode())
        return self.call(method, path, body=body, headers=headers, **kw)

    def deactivate(self, bot: str, payload: Any, **kw: Any) -> Reply:
        return self.send("POST", f"/v1/bots/{bot}/sessions/deactivate", payload, **kw)

    def batch(self, payload: Any, **kw: Any) -> Reply:
        return self.send("POST", "/v1/sessions/deactivate", payload, **kw)

    def kore(self, bot: str, payload: Any, **kw: Any) -> Reply:
        return self.send("PUT", f"/api/public/bot/{bot}/session", payload, **kw)

    # audit

    def audit_files(self) -> list[Path]:
        """Every audit file of this gateway, oldest first (by the first record's seq)."""
        files = [p for p in self.audit_path.parent.iterdir() if p.is_file()]

        def first_seq(path: Path) -> float:
            records = read_jsonl(path)
            return records[0]["seq"] if records else float("inf")
        return sorted(files, key=first_seq)

    def records(self) -> list[dict[str, Any]]:
        return [r for path in self.audit_files() for r in read_jsonl(path)]

    def records_for(self, rid: str, *, terminal: bool = True,
                    timeout_s: float = 5.0) -> list[dict[str, Any]]:
        """The records of one request ID; waits (bounded) for its terminal record."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = [r for r in self.records() if r.get("requestId") == rid]
            done = any(r.get("event") != "deactivate.requested" for r in found)
            if done or not terminal or time.monotonic() > deadline:
                return found
            time.sleep(0.02)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    text = path.read_bytes().decode("utf-8")  # UTF-8, strictly
    # "\n" only: a userId may hold U+2028, which str.splitlines() would also cut at.
    return [json.loads(line) for line in text.split("\n") if line]


def expect_error(reply: Reply, status: int, code: str | None = None, *,
                 names: str | Sequence[str] = ()) -> dict[str, Any]:
    """The contract envelope, exactly: {"error": {"code", "message", "requestId"}}."""
    assert reply.status == status, (reply.status, reply.text)
    assert "Traceback" not in reply.text and 'File "' not in reply.text
    assert reply.content_type == "application/json", reply.headers
    body = reply.json()
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error, dict) and set(error) == {"code", "message", "requestId"}, error
    assert isinstance(error["code"], str) and SNAKE_RE.fullmatch(error["code"]), error
    if code is not None:
        assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"].strip(), error
    assert error["requestId"] == reply.header("X-Request-ID"), (error, reply.headers)
    for name in [names] if isinstance(names, str) else names:
        assert name in error["message"], (name, error)
    if status == 401:
        assert (reply.header("WWW-Authenticate") or "").split(" ")[0] == "Bearer", reply.headers
    return dict(error)


def expect_retry_after(reply: Reply) -> int:
    value = reply.header("Retry-After")
    assert value is not None and value.isdigit(), reply.headers
    return int(value)


def only(records: list[dict[str, Any]], event: str) -> dict[str, Any]:
    found = [r for r in records if r["event"] == event]
    assert len(found) == 1, records
    return found[0]


def terminal(records: list[dict[str, Any]]) -> dict[str, Any]:
    found = [r for r in records if r["event"] != "deactivate.requested"]
    assert len(found) == 1, records
    return found[0]


# --- keys and certificates ------------------------------------------------------------------

def rsa_pem() -> tuple[str, Any]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    return pem, key.public_key()


def pem_fragments(pem: str) -> list[str]:
    """Pieces of a PEM body: none may appear anywhere outside the key file."""
    lines = [ln for ln in pem.splitlines() if ln and not ln.startswith("-----")]
    return [lines[2], lines[len(lines) // 2]]


def tls_material(directory: Path) -> tuple[Path, Path, Path]:
    """A private CA and a server certificate for 127.0.0.1 signed by it."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "contract test CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(hours=1))
          .not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                       False), critical=True)
          .add_extension(ca_ski, critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                ca_ski), critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_path, cert_path, key_path = (directory / n for n in ("ca.pem", "server.pem", "server.key"))
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return ca_path, cert_path, key_path


# --- the module's world ----------------------------------------------------------------------

@dataclass
class World:
    root: Path
    kore: Kore
    sandbox: Process
    main: Gateway
    local: Gateway
    hashed: Gateway
    crm_key: str
    rs256_public: Any
    rs512_public: Any
    rs256_pem: str
    rs512_pem: str
    cli: CliRuns
    app_key: dict[str, Any] = field(default_factory=dict)  # client ID → verification key

    @property
    def gateways(self) -> list[Gateway]:
        return [self.main, self.local, self.hashed]

    def secrets(self) -> list[str]:
        """Every secret value: none may ever appear in an answer, a log or the audit."""
        values = [SECRET_SESSIONS, SECRET_SPECIAL, SECRET_OTHER, SECRET_HS512, SECRET_JTI,
                  SECRET_CLAIMS, SECRET_CONC, SECRET_MULTI, NARROW_KEY, self.crm_key]
        return values + pem_fragments(self.rs256_pem) + pem_fragments(self.rs512_pem)


def app_table(name: str, bots: Sequence[str], **extra: Any) -> dict[str, Any]:
    return {"name": name, "client_id": CID[name], "bots": list(bots), **extra}


def main_apps() -> list[dict[str, Any]]:
    """First match wins: the specific apps come before `sessions`, which takes any st- bot
    not starting with "st-n" (so `st-noapp-*` has no app at all)."""
    return [
        app_table("special", ["st-special-*"], client_secret=SECRET_SPECIAL),
        app_table("other-scope", ["*"], client_secret=SECRET_OTHER, scopes=["Bot Builder"]),
        app_table("hs512", ["st-hs512-*"], algorithm="HS512", client_secret_env=ENV_HS512),
        app_table("rs256", ["st-rs256-*"], algorithm="RS256",
                  private_key_file="keys/rs256.pem"),
        app_table("rs512", ["st-rs512-*"], algorithm="RS512", private_key_env=ENV_RS512),
        app_table("jti", ["st-jti-*"], client_secret=SECRET_JTI, jti=True, token_ttl_s=3600),
        app_table("claims", ["st-claims-*"], client_secret=SECRET_CLAIMS,
                  subject="contract-subject", token_ttl_s=1234,
                  extra_claims={"tenant": "acme", "tier": 2}),
        app_table("conc", ["st-conc-*"], client_secret=SECRET_CONC),
        app_table("multi", ["st-multi-*"], client_secret=SECRET_MULTI,
                  scopes=["Bot Builder", "Bot Sessions"]),
        app_table("sessions", ["st-[!n]*"], client_secret_file="secrets/sessions.secret"),
    ]


def write_toml(path: Path, settings: Mapping[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(dict(settings)), encoding="utf-8")
    return path


def start_gateway(name: str, root: Path, settings: dict[str, Any], *, key: str | None,
                  env: Mapping[str, str] | None = None, host: str = "127.0.0.1",
                  extra_args: Sequence[str] = (), via_env: bool = False) -> Gateway:
    port = free_port(host)
    shown = f"[{host}]" if ":" in host else host
    settings = {**settings, "server": {"listen": f"{shown}:{port}", **settings.get("server", {})}}
    config = write_toml(root / "gateway.toml", settings)
    audit = Path(settings["audit"]["path"])
    if via_env:  # `serve` without --config reads GATEWAY_CONFIG
        process = Process(name, ["serve", *extra_args], root,
                          {**(env or {}), "GATEWAY_CONFIG": str(config)})
    else:
        process = Process(name, ["serve", "--config", str(config), *extra_args], root, env)
    connect = "127.0.0.1" if host == "localhost" else host
    return Gateway(name, connect, port, root, audit if audit.is_absolute() else root / audit,
                   process, key, config)


def hash_key_run() -> tuple[str, str, str]:
    """`kore-gateway hash-key` through the console script: (key, hex, key_sha256 line)."""
    done = subprocess.run([str(KORE_GATEWAY), "hash-key"], capture_output=True, text=True,
                          timeout=30, cwd=REPO, check=False)
    assert done.returncode == 0, done.stderr
    lines = [ln for ln in done.stdout.splitlines() if ln.strip()]
    [sha_line] = [ln for ln in lines if ln.strip().startswith("key_sha256")]
    digest = tomllib.loads(sha_line)["key_sha256"]
    [key_line] = [ln for ln in lines if ln is not sha_line]
    return key_line.split()[-1], digest, sha_line


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, cli: CliRuns) -> Iterator[World]:
    root = tmp_path_factory.mktemp("contract")
    rs256_pem, rs256_public = rsa_pem()
    rs512_pem, rs512_public = rsa_pem()
    env = {ENV_HS512: SECRET_HS512, ENV_RS512: rs512_pem}

    # Kore.ai knows every app but "other-scope" (an app Kore.ai never assigned Bot Sessions).
    kore_dir = root / "kore"
    (kore_dir / "keys").mkdir(parents=True)
    (kore_dir / "keys" / "rs256.pem").write_text(rs256_pem)
    (kore_dir / "secrets").mkdir()
    (kore_dir / "secrets" / "sessions.secret").write_text(SECRET_SESSIONS + "\n")
    kore_apps = [a for a in main_apps() if a["name"] != "other-scope"]
    kore_config = write_toml(kore_dir / "apps.toml", {
        "apps": kore_apps,
        "callers": [{"name": "unused", "key_sha256": "ab" * 32, "bots": ["*"]}]})
    kore_port = free_port()
    sandbox = Process("sandbox", ["sandbox", "--listen", f"127.0.0.1:{kore_port}",
                                  "--config", str(kore_config), "--known-bot", "st-[!x]*",
                                  "--session-path", "/api/public/bot/{botId}/session",
                                  "--session-path", "/api/public/{botId}/sessions"],
                      kore_dir, env)
    kore = Kore(kore_port)
    upstream = {"base_url": kore.url, "allow_insecure_http": True}

    local_dir = root / "local"
    local = start_gateway("local", local_dir, {
        "server": {"auth": "none"},
        "upstream": {**upstream, "bot_id_pattern": "^.{1,100}$", "max_attempts": 1,
                     "timeout_s": 2},
        "audit": {"path": str(local_dir / "audit" / "local.jsonl"), "max_bytes": 2048},
        "apps": [app_table("sessions", ["*"], client_secret=SECRET_SESSIONS)],
    }, key=None)

    crm_key, crm_sha, _ = hash_key_run()  # `main` and `hashed` use a key made by hash-key

    main_dir = root / "main"
    (main_dir / "keys").mkdir(parents=True)
    (main_dir / "keys" / "rs256.pem").write_text(rs256_pem)
    (main_dir / "secrets").mkdir()
    (main_dir / "secrets" / "sessions.secret").write_text(SECRET_SESSIONS + "\n")
    main = start_gateway("main", main_dir, {
        "upstream": {**upstream, "timeout_s": 3},  # max_attempts: the default, 3
        # relative: resolved against main_dir. Every keyless test here looks for its own
        # record, so main's budget is large; `hashed` shows the budget (§3 additions).
        "audit": {"path": "audit/main.jsonl", "max_unauthenticated_per_s": 1000},
        "apps": main_apps(),
        "callers": [
            {"name": "crm-service", "key_sha256": crm_sha, "bots": ["st-*"]},
            {"name": "narrow-service", "key_sha256": hashlib.sha256(NARROW_KEY.encode())
             .hexdigest(), "bots": ["st-own-*"]}],
    }, key=crm_key, env=env)

    hashed_dir = root / "hashed"
    hashed = start_gateway("hashed", hashed_dir, {
        "server": {"max_body_bytes": 1024, "max_batch_items": 3, "max_in_flight": 1,
                   "trusted_proxies": ["127.0.0.0/8"]},
        "upstream": {**upstream, "session_path": "/api/public/{botId}/sessions",
                     "timeout_s": 5},
        "audit": {"path": str(hashed_dir / "audit" / "hashed.jsonl"), "hash_user_ids": True,
                  "max_unauthenticated_per_s": 2},
        "rate_limit": {"windows": [{"calls": 1, "per_s": 3600}]},
        "apps": [app_table("sessions", ["st-*"], client_secret=SECRET_SESSIONS)],
        "callers": [{"name": "crm-service", "key_sha256": crm_sha, "bots": ["st-*"]}],
    }, key=crm_key)

    procs = [sandbox, main.process, local.process, hashed.process]
    try:
        sandbox.wait_http("127.0.0.1", kore_port)
        for gw in (main, local, hashed):
            gw.process.wait_http(gw.host, gw.port)
        w = World(root, kore, sandbox, main, local, hashed, crm_key, rs256_public,
                  rs512_public, rs256_pem, rs512_pem, cli)
        cli.submit("check-config-main", ["check-config", "--config", str(main.config_path)],
                   env=env)
        cli.release()
        w.app_key = {CID["sessions"]: SECRET_SESSIONS, CID["special"]: SECRET_SPECIAL,
                     CID["hs512"]: SECRET_HS512, CID["rs256"]: rs256_public,
                     CID["rs512"]: rs512_public, CID["jti"]: SECRET_JTI,
                     CID["claims"]: SECRET_CLAIMS, CID["conc"]: SECRET_CONC,
                     CID["multi"]: SECRET_MULTI}
        yield w
    finally:
        for proc in procs:
            proc.stop()


@pytest.fixture
def w(world: World) -> World:
    """The world, with the sandbox back to "no faults" and no recorded calls."""
    world.kore.reset()
    return world


def verify_token(w: World, token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(header, claims) of an upstream JWT, its signature checked with the app's key."""
    header = jwt.get_unverified_header(token)
    app_id = jwt.decode(token, options={"verify_signature": False})["appId"]
    claims = jwt.decode(token, w.app_key[app_id], algorithms=[header["alg"]],
                        options={"verify_aud": False})
    return header, claims


# --- commands run in the background --------------------------------------------------------

class CliRuns:
    """Commands run in the background at low priority, released once the module's gateways
    are up, so that they overlap the tests that wait on deadlines and latency; tests collect
    their results by name."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="contract-cli")
        self._gate = threading.Event()
        self._runs: dict[str, Future[subprocess.CompletedProcess[str]]] = {}
        self.config_paths: dict[str, Path] = {}

    def submit(self, name: str, args: Sequence[str], *, env: Mapping[str, str] | None = None,
               timeout_s: float = 30.0) -> None:
        def run() -> subprocess.CompletedProcess[str]:
            self._gate.wait(timeout=120)
            return run_cli(args, env=env, timeout_s=timeout_s, niced=True)
        self._runs[name] = self._pool.submit(run)

    def release(self) -> None:
        self._gate.set()

    def result(self, name: str) -> subprocess.CompletedProcess[str]:
        self.release()
        return self._runs[name].result(timeout=180)

    def close(self) -> None:
        self.release()
        self._pool.shutdown(wait=True, cancel_futures=True)


CASE_SECRET = "case-secret-" + secrets.token_hex(12)
CASE_ENV = {"KGW_CASE_SECRET": CASE_SECRET}
RSA_PLACEHOLDER = "<RSA PRIVATE KEY PEM>"
CONTRACT_SAMPLE = REPO / "tests" / "data" / "contract-sample.toml"


def case_base() -> dict[str, Any]:
    return {
        "server": {"listen": "127.0.0.1:8080"},
        "upstream": {"base_url": "https://bots.kore.ai"},
        "audit": {"path": "audit/deactivations.jsonl"},
        "apps": [{"name": "sessions", "client_id": CID["sessions"],
                  "client_secret_env": "KGW_CASE_SECRET", "bots": ["*"]}],
        "callers": [{"name": "crm-service", "key_sha256": "ab" * 32, "bots": ["st-*"]}],
    }


@dataclass(frozen=True)
class ConfigCase:
    id: str
    line: str  # the contract statement
    change: Callable[[dict[str, Any]], None] | None = None  # applied to `case_base()`
    ok: bool = False
    names: tuple[str, ...] = ()  # what the error must name, besides the file
    env: Mapping[str, str] = field(default_factory=dict)
    files: Mapping[str, str] = field(default_factory=dict)  # written beside the config
    text: str | None = None  # the config's text instead of `case_base()`
    command: str = "check-config"
    via_env: bool = False  # GATEWAY_CONFIG instead of --config
    missing: bool = False  # the config file does not exist
    forbidden: tuple[str, ...] = ()  # must not appear in the output
    names_config_file: bool = True  # a config error names the file; an audit error its path


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """`_set("apps.0.jti", True)`: one change to the base settings."""
    def change(settings: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = settings
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        if isinstance(node, list):
            if int(last) == len(node):
                node.append(value)
            else:
                node[int(last)] = value
        else:
            node[last] = value
    return change


def _all(*changes: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def change(settings: dict[str, Any]) -> None:
        for one in changes:
            one(settings)
    return change


def _drop(path: str) -> Callable[[dict[str, Any]], None]:
    def change(settings: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = settings
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        del node[last]
    return change


def _app(**fields: Any) -> Callable[[dict[str, Any]], None]:
    """Replaces the app's secret fields with `fields`."""
    def change(settings: dict[str, Any]) -> None:
        app = settings["apps"][0]
        for name in ("client_secret", "client_secret_env", "client_secret_file"):
            app.pop(name, None)
        app.update(fields)
    return change


AUTH_NONE = "server.auth = \"none\" ... refused at start-up unless the listen address is loopback"
UNKNOWN = "Unknown keys are an error: a typo must never fall back silently to a default"
SECRET_FORMS = "every secret field has *_env and *_file forms"
NAMES = "validated at start-up with an error that names the key and the file"
ADMIN_LISTEN = ('admin_listen = "" # e.g. "0.0.0.0:9091": /metrics, /healthz, /readyz, '
                "/openapi.json there")

NEW_KEYS = "§4 keys of 2026-12-03"
CONFIG_CASES = [
    ConfigCase("contract-sample-accepted", "§4 sample config", ok=True,
               env={"KORE_CLIENT_SECRET": CASE_SECRET}),
    ConfigCase("new-keys-accepted", NEW_KEYS,
               _all(_set("server.trusted_proxies", ["10.0.0.0/8", "fd00::/8"]),
                    _set("server.max_connections", 100),
                    _set("audit.max_unauthenticated_per_s", 5)), ok=True, env=CASE_ENV),
    ConfigCase("trusted-proxy-not-a-cidr", NEW_KEYS + " (trusted_proxies: CIDRs)",
               _set("server.trusted_proxies", ["load-balancer"]), names=("trusted_proxies",),
               env=CASE_ENV),
    ConfigCase("max-connections-zero", NEW_KEYS, _set("server.max_connections", 0),
               names=("max_connections",), env=CASE_ENV),
    ConfigCase("max-unauthenticated-negative", NEW_KEYS,
               _set("audit.max_unauthenticated_per_s", -1),
               names=("max_unauthenticated_per_s",), env=CASE_ENV),
    ConfigCase("GATEWAY_CONFIG-env", "One TOML file (--config PATH or GATEWAY_CONFIG)", ok=True,
               env=CASE_ENV, via_env=True),
    ConfigCase("unknown-top-level-table", UNKNOWN, _set("serverr", {"listen": "x"}),
               names=("serverr",), env=CASE_ENV),
    ConfigCase("unknown-server-key", UNKNOWN, _set("server.listn", "127.0.0.1:1"),
               names=("listn",), env=CASE_ENV),
    ConfigCase("unknown-upstream-key", UNKNOWN, _set("upstream.timeout", 5),
               names=("upstream", "timeout"), env=CASE_ENV),
    ConfigCase("unknown-audit-key", UNKNOWN, _set("audit.hash_user_id", True),
               names=("hash_user_id",), env=CASE_ENV),
    ConfigCase("unknown-rate-limit-key", UNKNOWN, _set("rate_limit.enable", False),
               names=("rate_limit", "enable"), env=CASE_ENV),
    ConfigCase("unknown-window-key", UNKNOWN,
               _set("rate_limit.windows", [{"calls": 5, "per_s": 1, "burst": 2}]),
               names=("burst",), env=CASE_ENV),
    ConfigCase("unknown-app-key", UNKNOWN, _set("apps.0.scope", ["Bot Sessions"]),
               names=("scope",), env=CASE_ENV),
    ConfigCase("unknown-caller-key", UNKNOWN, _set("callers.0.bot", ["st-*"]),
               names=("callers", "bot"), env=CASE_ENV),
    ConfigCase("wrong-type-names-key", NAMES, _set("server.max_body_bytes", "big"),
               names=("max_body_bytes",), env=CASE_ENV),
    ConfigCase("listen-not-host-port", NAMES, _set("server.listen", "nonsense"),
               names=("listen",), env=CASE_ENV),
    ConfigCase("session-path-without-botId", NAMES + " (upstream.session_path holds {botId})",
               _set("upstream.session_path", "/api/public/bot/session"),
               names=("session_path",), env=CASE_ENV),
    ConfigCase("bot-id-pattern-not-a-regex", NAMES + " (upstream.bot_id_pattern)",
               _set("upstream.bot_id_pattern", "^st-[a-z"), names=("bot_id_pattern",),
               env=CASE_ENV),
    ConfigCase("timeout-negative", NAMES + " (upstream.timeout_s)",
               _set("upstream.timeout_s", -1), names=("timeout_s",), env=CASE_ENV),
    ConfigCase("max-attempts-zero", NAMES + " (upstream.max_attempts)",
               _set("upstream.max_attempts", 0), names=("max_attempts",), env=CASE_ENV),
    ConfigCase("http-base-url-refused", "base_url must be https:// unless allow_insecure_http",
               _set("upstream.base_url", "http://127.0.0.1:9"), names=("base_url",),
               env=CASE_ENV),
    ConfigCase("http-base-url-allowed", "base_url must be https:// unless allow_insecure_http",
               _all(_set("upstream.base_url", "http://127.0.0.1:9"),
                    _set("upstream.allow_insecure_http", True)), ok=True, env=CASE_ENV),
    ConfigCase("ca-file-relative", "a custom CA bundle can be configured (upstream.ca_file)",
               _set("upstream.ca_file", "certs/ca.pem"), ok=True, env=CASE_ENV,
               files={"certs/ca.pem": "<CA PEM>"}),
    ConfigCase("jti-ttl-3601-refused", "token_ttl_s must be <= 3600 (config error otherwise)",
               _all(_set("apps.0.jti", True), _set("apps.0.token_ttl_s", 3601)),
               names=("token_ttl_s",), env=CASE_ENV),
    ConfigCase("jti-ttl-3600-accepted", "token_ttl_s must be <= 3600",
               _all(_set("apps.0.jti", True), _set("apps.0.token_ttl_s", 3600)), ok=True,
               env=CASE_ENV),
    ConfigCase("algorithm-unknown", "algorithms HS256 (default), HS512, RS256, RS512",
               _set("apps.0.algorithm", "ES256"), names=("algorithm",), env=CASE_ENV),
    ConfigCase("rs256-without-key", "RS* sign with a PEM private key",
               _all(_set("apps.0.algorithm", "RS256"), _app()), names=("private_key",)),
    ConfigCase("hs256-without-secret", "client ID and client secret", _app(),
               names=("client_secret",)),
    ConfigCase("backend-unknown", 'backend = "memory" or "redis"',
               _set("rate_limit.backend", "memcached"), names=("backend",), env=CASE_ENV),
    ConfigCase("key-sha256-not-hex", "key_sha256 = <64 hex>",
               _set("callers.0.key_sha256", "not-a-digest"), names=("key_sha256",),
               env=CASE_ENV),
    ConfigCase("api-key-without-callers", "[[callers]] may be omitted (only with auth none)",
               _drop("callers"), names=("callers",), env=CASE_ENV),
    ConfigCase("auth-none-0.0.0.0-refused", AUTH_NONE,
               _all(_set("server.auth", "none"), _set("server.listen", "0.0.0.0:8080"),
                    _drop("callers")), names=("auth",), env=CASE_ENV),
    ConfigCase("auth-none-[::]-refused", AUTH_NONE,
               _all(_set("server.auth", "none"), _set("server.listen", "[::]:8080"),
                    _drop("callers")), names=("auth",), env=CASE_ENV),
    ConfigCase("auth-none-127.0.0.2-no-callers", AUTH_NONE + " (127.0.0.0/8; 127.0.0.1, ::1 "
               "and localhost are started for real below)",
               _all(_set("server.auth", "none"), _set("server.listen", "127.0.0.2:8080"),
                    _drop("callers")), ok=True, env=CASE_ENV),
    ConfigCase("secret-forms-file-relative", SECRET_FORMS + " (client_secret_file, "
               "private_key_file, redis_url_file); relative paths vs the config's directory",
               _all(_app(client_secret_file="run/secrets/kore"),
                    _set("apps.1", {"name": "rsa", "client_id": "cs-rsa", "algorithm": "RS256",
                                    "private_key_file": "keys/app.pem", "bots": ["st-r-*"]}),
                    _set("rate_limit", {"backend": "redis", "redis_url_file": "redis.url"})),
               ok=True, files={"run/secrets/kore": CASE_SECRET + "\n",
                               "keys/app.pem": RSA_PLACEHOLDER,
                               "redis.url": "redis://127.0.0.1:1/0\n"}),
    ConfigCase("secret-forms-env", SECRET_FORMS + " (client_secret_env, private_key_env, "
               "redis_url_env)",
               _all(_set("apps.1", {"name": "rsa", "client_id": "cs-rsa", "algorithm": "RS512",
                                    "private_key_env": "KGW_CASE_PEM", "bots": ["st-r-*"]}),
                    _set("rate_limit", {"backend": "redis", "redis_url_env": "KGW_CASE_REDIS"})),
               ok=True, env={**CASE_ENV, "KGW_CASE_PEM": RSA_PLACEHOLDER,
                             "KGW_CASE_REDIS": "redis://127.0.0.1:1/0"}),
    ConfigCase("secret-forms-inline", SECRET_FORMS + " (secrets never *required* in the file; "
               "still allowed there)",
               _all(_app(client_secret=CASE_SECRET),
                    _set("rate_limit", {"backend": "redis", "redis_url": "redis://127.0.0.1:1"})),
               ok=True),
    ConfigCase("client-secret-env-unset", SECRET_FORMS,
               _app(client_secret_env="KGW_CASE_UNSET_VARIABLE"), names=("client_secret",)),
    ConfigCase("client-secret-file-missing", SECRET_FORMS,
               _app(client_secret_file="run/secrets/absent"), names=("client_secret",)),
    ConfigCase("secret-not-echoed-in-error", "The secret ... never returned",
               _app(client_secret=CASE_SECRET, client_secret_env="KGW_CASE_SECRET"),
               names=("client_secret",), env=CASE_ENV, forbidden=(CASE_SECRET,)),
    ConfigCase("admin-listen-accepted", ADMIN_LISTEN,
               _set("server.admin_listen", "0.0.0.0:9091"), ok=True, env=CASE_ENV),
    ConfigCase("admin-listen-empty-is-off", ADMIN_LISTEN, _set("server.admin_listen", ""),
               ok=True, env=CASE_ENV),
    ConfigCase("admin-listen-not-host-port", NAMES + " (server.admin_listen)",
               _set("server.admin_listen", "9091"), names=("admin_listen",), env=CASE_ENV),
    ConfigCase("admin-listen-same-as-listen", ADMIN_LISTEN + " (its own address)",
               _all(_set("server.listen", "127.0.0.1:8080"),
                    _set("server.admin_listen", "127.0.0.1:8080")),
               names=("admin_listen",), env=CASE_ENV),
    ConfigCase("serve-refuses-admin-listen-same-as-listen", ADMIN_LISTEN + " (its own address)",
               _all(_set("server.listen", "127.0.0.1:8080"),
                    _set("server.admin_listen", "127.0.0.1:8080")),
               names=("admin_listen",), env=CASE_ENV, command="serve"),
    ConfigCase("not-toml", NAMES, text="[server\nlisten = 1\n"),
    ConfigCase("file-missing", NAMES, missing=True),
    ConfigCase("serve-refuses-unknown-key", NAMES + " (at start-up)",
               _set("server.listn", "127.0.0.1:1"), names=("listn",), env=CASE_ENV,
               command="serve"),
    ConfigCase("serve-refuses-auth-none-non-loopback", AUTH_NONE,
               _all(_set("server.auth", "none"), _set("server.listen", "192.0.2.1:8080"),
                    _drop("callers")), names=("auth",), env=CASE_ENV, command="serve"),
    ConfigCase("chain-key-env-accepted", "§4 audit.chain_key_env: the HMAC chain key",
               _set("audit.chain_key_env", "KGW_CASE_CHAIN"), ok=True,
               env={**CASE_ENV, "KGW_CASE_CHAIN": CHAIN_KEY}, forbidden=(CHAIN_KEY,)),
    ConfigCase("chain-key-env-empty-is-off", '§4 chain_key_env = "" (the sample\'s default)',
               _set("audit.chain_key_env", ""), ok=True, env=CASE_ENV),
    ConfigCase("chain-key-file-accepted", "§4 audit.chain_key_file",
               _set("audit.chain_key_file", "keys/chain.key"), ok=True, env=CASE_ENV,
               files={"keys/chain.key": CHAIN_KEY + "\n"}, forbidden=(CHAIN_KEY,)),
    ConfigCase("chain-key-file-on-the-audit-volume-refused", "§3 the key from env or file "
               "(never on the audit volume)", _set("audit.chain_key_file", "audit/chain.key"),
               names=("chain_key_file",), env=CASE_ENV, files={"audit/chain.key": CHAIN_KEY},
               forbidden=(CHAIN_KEY,)),
    ConfigCase("chain-key-env-unset", SECRET_FORMS + " (audit.chain_key_env)",
               _set("audit.chain_key_env", "KGW_CASE_UNSET_VARIABLE"),
               names=("chain_key_env",), env=CASE_ENV),
    ConfigCase("anchor-every-s-not-a-number", NAMES + " (audit.anchor_every_s)",
               _set("audit.anchor_every_s", "often"), names=("anchor_every_s",), env=CASE_ENV),
    ConfigCase("serve-refuses-unusable-audit-path", "an audit path that is unusable at "
               "start-up stops the start with a clear error",
               _set("audit.path", "blocker/audit.jsonl"), names=("blocker",), env=CASE_ENV,
               files={"blocker": "a regular file, not a directory\n"}, command="serve",
               names_config_file=False),
]


def _case_config(root: Path, case: ConfigCase, pem: str, ca: str) -> tuple[Path, dict[str, str]]:
    directory = root / case.id
    directory.mkdir(parents=True)
    for name, content in case.files.items():
        target = directory / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content.replace(RSA_PLACEHOLDER, pem).replace("<CA PEM>", ca))
    path = directory / "gateway.toml"
    env = {k: v.replace(RSA_PLACEHOLDER, pem) for k, v in case.env.items()}
    if case.missing:
        return path, env
    if case.text is not None:
        path.write_text(case.text)
    elif case.id == "contract-sample-accepted":
        path.write_text(CONTRACT_SAMPLE.read_text().replace("<64 hex>", "ab" * 32))
    else:
        settings = case_base()
        if case.change is not None:
            case.change(settings)
        write_toml(path, settings)
    return path, env


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CliRuns]:
    """Starts every config case at once (in the background, one at a time)."""
    root = tmp_path_factory.mktemp("config-cases")
    pem, _ = rsa_pem()
    ca_path, _, _ = tls_material(root)
    runs = CliRuns()
    for case in CONFIG_CASES:
        path, env = _case_config(root, case, pem, ca_path.read_text())
        args = [case.command] if case.via_env else [case.command, "--config", str(path)]
        if case.via_env:
            env = {**env, "GATEWAY_CONFIG": str(path)}
        runs.submit(case.id, args, env=env, timeout_s=15 if case.command == "serve" else 30)
    runs.config_paths = {case.id: root / case.id / "gateway.toml" for case in CONFIG_CASES}
    runs.submit("verify-missing-file", ["audit", "verify", str(root / "absent.jsonl")])
    yield runs
    runs.close()


# =========================================================================================
# 1. What reaches Kore.ai
# =========================================================================================

def test_upstream_call_is_the_contract_put(w: World) -> None:
    """§1: PUT {base_url}/api/public/bot/{botId}/session, `auth`, `Content-Type:
    application/json`, `X-Request-ID`, each exactly once; body {"userId", "status":
    "inactive"} with `channel` omitted when the caller gave none."""
    rid, bot = unique("shape"), unique("st-shape")
    reply = w.main.deactivate(bot, {"userId": "u-shape"}, rid=rid)
    assert reply.status == 200, reply.text
    [call] = w.kore.calls_for(rid)
    assert call["method"] == "PUT"
    assert call["path"] == f"/api/public/bot/{bot}/session"
    assert call["body"] == {"userId": "u-shape", "status": "inactive"}
    headers = call["headers"]
    assert CONTRACT_HEADERS <= set(headers), headers
    assert set(headers) <= CLIENT_HEADERS | CONTRACT_HEADERS, sorted(headers)
    assert headers["content-type"] == "application/json"
    assert headers["x-request-id"] == rid
    token = headers["auth"]
    assert ", " not in token and token.count(".") == 2, token  # one JWT, sent once
    _, claims = verify_token(w, token)
    # "A token with less than 10 s of life left is never sent."
    assert claims["exp"] - call["at"] >= 10


def test_upstream_body_carries_the_callers_channel(w: World) -> None:
    """§1: {"userId", "status": "inactive", "channel"} when the caller gave a channel."""
    rid, bot = unique("chan"), unique("st-chan")
    assert w.main.deactivate(bot, {"userId": "u-c", "channel": "rtm"}, rid=rid).status == 200
    [call] = w.kore.calls_for(rid)
    assert call["body"] == {"userId": "u-c", "status": "inactive", "channel": "rtm"}


CALLER_HEADERS = [
    ("auth", "caller-auth-header-value"), ("Cookie", "sid=caller-cookie-value"),
    ("X-Forwarded-For", "203.0.113.77"), ("Forwarded", "for=203.0.113.78"),
    ("Via", "1.1 caller-proxy-via"), ("X-Custom", "caller-custom-value"),
    ("Proxy-Authorization", "Basic caller-proxy-credential"), ("Connection", "keep-alive"),
    ("Keep-Alive", "timeout=7"), ("TE", "trailers"), ("User-Agent", "caller-agent/9.9"),
    ("Accept", "application/caller+json"), ("Accept-Language", "ko-KR"),
    ("Origin", "https://caller-origin.example"), ("Referer", "https://caller-referer.example/"),
]


@pytest.mark.parametrize("route", ["simple", "kore", "batch"])
def test_nothing_the_caller_sent_is_forwarded(w: World, route: str) -> None:
    """§1: nothing the caller sent in its headers is forwarded (no Authorization, no caller
    `auth`, no cookies, no hop-by-hop headers); only the client's standard headers and the
    three contract headers reach Kore.ai."""
    rid, bot = unique("fwd"), unique("st-fwd")
    if route == "simple":
        reply = w.main.deactivate(bot, {"userId": "u-f"}, rid=rid, extra=CALLER_HEADERS)
        upstream_rid = rid
    elif route == "kore":
        reply = w.main.kore(bot, {"userId": "u-f", "status": "inactive"}, rid=rid,
                            extra=CALLER_HEADERS)
        upstream_rid = rid
    else:
        reply = w.main.batch({"items": [{"botId": bot, "userId": "u-f"}]}, rid=rid,
                             extra=CALLER_HEADERS)
        upstream_rid = f"{rid}.0"
    assert reply.status == 200, reply.text
    [call] = w.kore.calls_for(upstream_rid)
    headers = call["headers"]
    assert set(headers) <= CLIENT_HEADERS | CONTRACT_HEADERS, sorted(headers)
    sent = " ".join(headers.values())
    for _, value in CALLER_HEADERS + [("Authorization", w.crm_key)]:
        if value not in ("keep-alive", "trailers"):
            assert value not in sent, (value, headers)
    assert headers["auth"] != "caller-auth-header-value"
    verify_token(w, headers["auth"])  # the gateway's own JWT


def test_session_path_is_configurable(w: World) -> None:
    """§1: the path template is `upstream.session_path` (here Kore.ai's sample-curl path)."""
    rid, bot = unique("path"), unique("st-path")
    assert w.hashed.deactivate(bot, {"userId": "u-p"}, rid=rid).status == 200
    [call] = w.kore.calls_for(rid)
    assert call["path"] == f"/api/public/{bot}/sessions"


ODD_BOT_IDS = ["st-a/b", "st-a/../../admin", "st-q?x=1", "st-h#frag", "st-100%", "st-%2F",
               "st-a b", "st-ü", "st-semi;colon", "st-plus+and&amp", "st-back\\slash"]


def test_bot_id_is_percent_encoded_into_one_segment(w: World) -> None:
    """§1: `{botId}` is percent-encoded into the path; it can never add a path segment.
    (`local` allows any botId: `bot_id_pattern = "^.{1,100}$"`.)"""
    rid = unique("enc")
    items = [{"botId": bot, "userId": "u-e"} for bot in ODD_BOT_IDS]
    reply = w.local.batch({"items": items}, rid=rid)
    assert reply.status == 200, reply.text
    results = reply.json()["results"]
    assert [r["status"] for r in results] == [200] * len(ODD_BOT_IDS), results
    for index, bot in enumerate(ODD_BOT_IDS):
        [call] = w.kore.calls_for(f"{rid}.{index}")
        path = call["path"]
        assert path.startswith("/api/public/bot/") and path.endswith("/session"), path
        segment = path[len("/api/public/bot/"):-len("/session")]
        assert "/" not in segment and "?" not in segment and "#" not in segment, path
        assert unquote(segment) == bot, (bot, path)
        assert call["bot_id"] == bot


class TlsKore:
    """A minimal HTTPS "Kore.ai" that answers every PUT with {"success": true}."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.paths: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.paths.append(self.path)
                data = b'{"success": true}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.handle_error = lambda *_: None  # type: ignore[method-assign]
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_tls_is_always_verified_and_ca_file_adds_a_ca(world: World, tmp_path: Path) -> None:
    """§1: TLS verification is always on; a custom CA bundle can be configured
    (`upstream.ca_file`, here relative to the config file's directory)."""
    ca, cert, key = tls_material(tmp_path)
    upstream = TlsKore(cert, key)
    gateways = []
    try:
        for name, extra in (("tls-ca", {"ca_file": "ca.pem"}), ("tls-default", {})):
            root = tmp_path / name
            root.mkdir()
            shutil.copy(ca, root / "ca.pem")
            gateways.append(start_gateway(name, root, {
                "server": {"auth": "none"},
                "upstream": {"base_url": f"https://127.0.0.1:{upstream.port}", **extra},
                "audit": {"path": str(root / "audit" / "tls.jsonl")},
                "apps": [app_table("sessions", ["*"], client_secret=SECRET_SESSIONS)]},
                key=None))
        for gw in gateways:
            gw.process.wait_http(gw.host, gw.port)
        with_ca, default = gateways
        assert with_ca.deactivate("st-tls-ok", {"userId": "u"}).status == 200
        assert upstream.paths == ["/api/public/bot/st-tls-ok/session"]
        expect_error(default.deactivate("st-tls-bad", {"userId": "u"}), 502,
                     "upstream_unavailable")
        assert upstream.paths == ["/api/public/bot/st-tls-ok/session"]  # nothing more arrived
    finally:
        for gw in gateways:
            gw.process.stop()
        upstream.close()


# --- the JWT -------------------------------------------------------------------------------

JWT_APPS = [
    # app, bot, alg, sub, ttl, jti, extra claims
    pytest.param("sessions", "st-jwt-hs256", "HS256", "kore-session-gateway", 600, False, {},
                 id="HS256-default-claims-client_secret_file"),
    pytest.param("hs512", "st-hs512-jwt", "HS512", "kore-session-gateway", 600, False, {},
                 id="HS512-client_secret_env"),
    pytest.param("rs256", "st-rs256-jwt", "RS256", "kore-session-gateway", 600, False, {},
                 id="RS256-private_key_file"),
    pytest.param("rs512", "st-rs512-jwt", "RS512", "kore-session-gateway", 600, False, {},
                 id="RS512-private_key_env"),
    pytest.param("jti", "st-jti-jwt", "HS256", "kore-session-gateway", 3600, True, {},
                 id="jti-true-ttl-3600"),
    pytest.param("claims", "st-claims-jwt", "HS256", "contract-subject", 1234, False,
                 {"tenant": "acme", "tier": 2}, id="subject-ttl-extra_claims"),
    pytest.param("special", "st-special-jwt", "HS256", "kore-session-gateway", 600, False, {},
                 id="first-matching-glob-wins"),
    pytest.param("multi", "st-multi-jwt", "HS256", "kore-session-gateway", 600, False, {},
                 id="scopes-include-Bot-Sessions-among-others"),
]


@pytest.mark.parametrize(("app", "bot", "alg", "sub", "ttl", "jti", "extra"), JWT_APPS)
def test_jwt_header_and_claims(w: World, app: str, bot: str, alg: str, sub: str, ttl: int,
                               jti: bool, extra: dict[str, Any]) -> None:
    """§1 The JWT: header {"alg", "typ": "JWT"}; claims appId, sub, iat, exp = iat + ttl, jti
    when `app.jti = true`, plus extra_claims; signed by the first app whose `bots` globs match
    and whose scopes include "Bot Sessions" (the wrong-scope app matching "*" is skipped)."""
    rid = unique("jwt")
    before = time.time()
    reply = w.main.deactivate(bot, {"userId": "u-jwt"}, rid=rid)
    assert reply.status == 200, reply.text
    [call] = w.kore.calls_for(rid)
    header, claims = verify_token(w, call["headers"]["auth"])
    assert header == {"alg": alg, "typ": "JWT"}
    assert claims["appId"] == CID[app]
    assert claims["sub"] == sub
    assert claims["exp"] == claims["iat"] + ttl
    assert before - 120 <= claims["iat"] <= time.time() + 5
    expected = {"appId", "sub", "iat", "exp"} | set(extra) | ({"jti"} if jti else set())
    assert set(claims) == expected, claims
    for name, value in extra.items():
        assert claims[name] == value
    if jti:
        assert isinstance(claims["jti"], str) and claims["jti"]
    records = w.main.records_for(rid)
    assert [r["event"] for r in records] == ["deactivate.requested", "deactivate.completed"]
    assert {r["app"] for r in records} == {app}


def wait_for_next_second() -> None:
    time.sleep(1.02 - time.time() % 1)


def test_token_cached_reused_and_reminted_after_401(w: World) -> None:
    """§1: tokens are cached per app and reused; on a 401 the cached token is dropped and the
    call retried once with a freshly minted one, which is then the one reused."""
    first = unique("cache")
    assert w.main.deactivate("st-conc-a", {"userId": "u"}, rid=first).status == 200
    token_1 = w.kore.calls_for(first)[0]["headers"]["auth"]
    wait_for_next_second()  # a fresh mint from now on carries a later iat
    second = unique("cache")
    assert w.main.deactivate("st-conc-b", {"userId": "u"}, rid=second).status == 200
    assert w.kore.calls_for(second)[0]["headers"]["auth"] == token_1, "token not reused"

    w.kore.faults(reject_token_next=1)
    third = unique("cache")
    assert w.main.deactivate("st-conc-c", {"userId": "u"}, rid=third).status == 200
    calls = w.kore.calls_for(third)
    assert [c["status"] for c in calls] == [401, 200]
    assert calls[0]["headers"]["auth"] == token_1
    token_2 = calls[1]["headers"]["auth"]
    assert token_2 != token_1
    assert verify_token(w, token_2)[1]["iat"] > verify_token(w, token_1)[1]["iat"]
    assert terminal(w.main.records_for(third))["attempts"] == 2

    fourth = unique("cache")
    assert w.main.deactivate("st-conc-d", {"userId": "u"}, rid=fourth).status == 200
    assert w.kore.calls_for(fourth)[0]["headers"]["auth"] == token_2  # token_1 was dropped


def test_jti_mode_fresh_token_and_jti_on_every_attempt(w: World) -> None:
    """§1: `app.jti = true`: every upstream attempt gets a fresh token with a fresh jti,
    never reused."""
    w.kore.faults(fail_first=2, error_status=500)
    rid = unique("jti")
    assert w.main.deactivate("st-jti-a", {"userId": "u"}, rid=rid).status == 200
    calls = w.kore.calls_for(rid)
    assert [c["status"] for c in calls] == [500, 500, 200]
    again = unique("jti")
    assert w.main.deactivate("st-jti-b", {"userId": "u"}, rid=again).status == 200
    calls += w.kore.calls_for(again)
    tokens = [c["headers"]["auth"] for c in calls]
    jtis = [verify_token(w, t)[1]["jti"] for t in tokens]
    assert len(set(tokens)) == len(tokens) == 4
    assert len(set(jtis)) == 4 and all(jtis)
    assert terminal(w.main.records_for(rid))["attempts"] == 3


def test_remint_retry_allowed_past_max_attempts(w: World) -> None:
    """§1: the retry after a 401 counts in `attempts` and is allowed even when `max_attempts`
    is already spent (`local` has max_attempts = 1)."""
    w.kore.faults(reject_token_next=1)
    rid, bot = unique("remint"), unique("st-remint")
    reply = w.local.deactivate(bot, {"userId": "u"}, rid=rid)
    assert reply.status == 200, reply.text
    assert [c["status"] for c in w.kore.calls_for(rid)] == [401, 200]
    record = terminal(w.local.records_for(rid))
    assert record["attempts"] == 2 and record["outcome"] == "success"


@pytest.mark.parametrize("status", [401, 403])
def test_refused_token_retried_once_then_upstream_auth_failed(w: World, status: int) -> None:
    """§1 / §2 table: Kore.ai 401/403 → one retry with a fresh token → 502
    `upstream_auth_failed` (the gateway's credentials are wrong, not the caller's)."""
    if status == 401:
        w.kore.faults(reject_token_next=10)
    else:
        w.kore.faults(fail_first=10, error_status=403)
    rid, bot = unique("authfail"), unique("st-authfail")
    expect_error(w.main.deactivate(bot, {"userId": "u"}, rid=rid), 502, "upstream_auth_failed")
    assert [c["status"] for c in w.kore.calls_for(rid)] == [status, status]
    record = terminal(w.main.records_for(rid))
    assert record["event"] == "deactivate.completed"
    assert (record["status"], record["upstreamStatus"], record["attempts"]) == (502, status, 2)
    assert record["outcome"] == "failed" and record["error"] == "upstream_auth_failed"


def test_no_app_for_bot_is_bot_not_configured(w: World) -> None:
    """§1: no app for a bot → 403 `bot_not_configured`, naming the bot; nothing upstream."""
    rid, bot = unique("noapp"), unique("st-noapp")
    expect_error(w.main.deactivate(bot, {"userId": "u"}, rid=rid), 403, "bot_not_configured",
                 names=bot)
    assert w.kore.calls_for(rid) == []
    record = only(w.main.records_for(rid), "deactivate.denied")
    assert (record["outcome"], record["status"]) == ("denied", 403)


class RawKore:
    """A plain-HTTP "Kore.ai" that records each request's header lines as they arrived and
    answers with queued (status, content type, body) replies, else 200 {"success": true}."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.replies: list[tuple[int, str, bytes]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.requests.append({"path": self.path, "headers": self.headers.items(),
                                       "body": body})
                status, kind, data = (outer.replies.pop(0) if outer.replies
                                      else (200, "application/json", b'{"success": true}'))
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def for_request(self, rid: str) -> list[dict[str, Any]]:
        return [r for r in self.requests
                if any(k.lower() == "x-request-id" and v == rid for k, v in r["headers"])]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RawKore, Gateway]]:
    """A gateway (`auth = "none"`) in front of `RawKore`, whose `base_url` has a path prefix
    and a trailing slash."""
    upstream = RawKore()
    root = tmp_path_factory.mktemp("raw")
    gw = start_gateway("raw", root, {
        "server": {"auth": "none"},
        "upstream": {"base_url": f"http://127.0.0.1:{upstream.port}/kore/",
                     "allow_insecure_http": True},
        "audit": {"path": str(root / "audit" / "raw.jsonl")},
        "apps": [app_table("sessions", ["*"], client_secret=SECRET_SESSIONS)]}, key=None)
    try:
        gw.process.wait_http(gw.host, gw.port)
        yield upstream, gw
    finally:
        gw.process.stop()
        upstream.close()


@pytest.mark.parametrize("route", ["simple", "kore", "batch"])
def test_upstream_headers_each_exactly_once_on_the_wire(raw: tuple[RawKore, Gateway],
                                                        route: str) -> None:
    """§1: only the standard client headers and `auth`, `Content-Type`, `X-Request-ID`,
    each exactly once — counted on the header lines as they arrived; the path is
    {base_url}/api/public/bot/{botId}/session (a base path kept, no doubled slash)."""
    upstream, gw = raw
    rid = unique("wire")
    reply = _route_call(gw, route, rid, extra=[("auth", "callers-auth"),
                                               ("X-Request-ID", "ignored-second-id")])
    assert reply.status == 200, reply.text
    [request] = upstream.for_request(f"{rid}.0" if route == "batch" else rid)
    assert re.fullmatch(r"/kore/api/public/bot/st-auth-[0-9a-f]+/session", request["path"]), (
        "PUT {upstream.base_url}/api/public/bot/{botId}/session", request["path"])
    names = [k.lower() for k, _ in request["headers"]]
    for name in CONTRACT_HEADERS:
        assert names.count(name) == 1, (name, request["headers"])
    assert set(names) <= CLIENT_HEADERS | CONTRACT_HEADERS, request["headers"]
    assert len(names) == len(set(names)), request["headers"]
    assert {k.lower(): v for k, v in request["headers"]}["auth"] != "callers-auth"
    assert json.loads(request["body"]) == {"userId": "u", "status": "inactive"}


def test_kore_route_passes_kores_own_2xx_status(raw: tuple[RawKore, Gateway]) -> None:
    """§2 Routes: the Kore-compatible route answers with "Kore.ai's own status and body"."""
    upstream, gw = raw
    upstream.replies.append((202, "application/json", b'{"success": true}'))
    reply = gw.kore(unique("st-202"), {"userId": "u"})
    assert (reply.status, reply.json()) == (202, {"success": True}), reply.text


def test_kore_404_with_a_non_json_body(raw: tuple[RawKore, Gateway]) -> None:
    """§2: Kore.ai's own 404 is passed through as sent on the Kore-compatible route; on the
    gateway's own route it is 404 `upstream_rejected` with Kore.ai's message included."""
    upstream, gw = raw
    upstream.replies.append((404, "text/plain", b"no such bot here"))
    reply = gw.kore(unique("st-404"), {"userId": "u"})
    assert (reply.status, reply.body) == (404, b"no such bot here")
    upstream.replies.append((404, "text/plain", b"no such bot here"))
    expect_error(gw.deactivate(unique("st-404"), {"userId": "u"}), 404, "upstream_rejected",
                 names="no such bot here")


def test_redis_rate_limit_is_shared_by_every_replica(world: World, tmp_path: Path,
                                                     redis_server: Any) -> None:
    """§4 `[rate_limit] backend = "redis"` (shared by every replica): a budget spent through
    one gateway is spent for the other."""
    world.kore.reset()
    replicas = []
    try:
        for name in ("replica-a", "replica-b"):
            root = tmp_path / name
            replicas.append(start_gateway(name, root, {
                "server": {"auth": "none"},
                "upstream": {"base_url": world.kore.url, "allow_insecure_http": True},
                "audit": {"path": str(root / "audit" / "r.jsonl")},
                "rate_limit": {"backend": "redis", "redis_url_env": "KGW_CONTRACT_REDIS",
                               "windows": [{"calls": 1, "per_s": 3600}]},
                "apps": [app_table("sessions", ["*"], client_secret=SECRET_SESSIONS)]},
                key=None, env={"KGW_CONTRACT_REDIS": redis_server.url}))
        for gw in replicas:
            gw.process.wait_http(gw.host, gw.port)
        first, second = replicas
        bot = unique("st-shared")
        assert first.deactivate(bot, {"userId": "u"}).status == 200
        rid = unique("shared")
        reply = second.deactivate(bot, {"userId": "u"}, rid=rid)
        expect_error(reply, 429, "rate_limited")
        expect_retry_after(reply)
        assert world.kore.calls_for(rid) == []
    finally:
        for gw in replicas:
            gw.process.stop()


# =========================================================================================
# 2. What callers send
# =========================================================================================

def expect_denied(gw: Gateway, rid: str, status: int, outcome: str,
                  error: str | None = None) -> dict[str, Any]:
    """§3: a request stopped before going upstream ends with one `deactivate.denied`."""
    records = gw.records_for(rid)
    assert [r["event"] for r in records] == ["deactivate.denied"], records
    record = records[0]
    assert (record["status"], record["outcome"]) == (status, outcome), record
    if error is not None:
        assert record["error"] == error, record
    return record


# --- caller authentication -----------------------------------------------------------------

BAD_AUTHORIZATION = [
    pytest.param(None, id="missing"),
    pytest.param("Bearer kgw_not_a_configured_key", id="unknown-key"),
    pytest.param("Bearer ", id="empty-bearer"),
    pytest.param("Basic {key}", id="basic-scheme"),
    pytest.param("{key}", id="no-scheme"),
]


def _route_call(gw: Gateway, route: str, rid: str, **kw: Any) -> Reply:
    bot = unique("st-auth")
    if route == "simple":
        return gw.deactivate(bot, {"userId": "u"}, rid=rid, **kw)
    if route == "kore":
        return gw.kore(bot, {"userId": "u"}, rid=rid, **kw)
    return gw.batch({"items": [{"botId": bot, "userId": "u"}]}, rid=rid, **kw)


@pytest.mark.parametrize("route", ["simple", "batch", "kore"])
@pytest.mark.parametrize("authorization", BAD_AUTHORIZATION)
def test_missing_or_unknown_key_is_401(w: World, route: str, authorization: str | None) -> None:
    """§2: missing/unknown key → 401 `unauthenticated` + `WWW-Authenticate: Bearer`; audited
    `deactivate.denied`, outcome `denied`; nothing upstream."""
    rid = unique("unauth")
    extra = [] if authorization is None else [
        ("Authorization", authorization.format(key=w.crm_key))]
    reply = _route_call(w.main, route, rid, key=None, extra=extra)
    expect_error(reply, 401, "unauthenticated")
    assert reply.header("WWW-Authenticate") is not None
    assert w.kore.none_for(rid)
    expect_denied(w.main, rid, 401, "denied", "unauthenticated")


@pytest.mark.parametrize("route", ["simple", "kore"])
def test_bot_outside_callers_globs_is_403_forbidden(w: World, route: str) -> None:
    """§2: a bot outside the caller's globs → 403 `forbidden`; audited `denied`."""
    rid = unique("forbid")
    reply = _route_call(w.main, route, rid, key=NARROW_KEY)
    expect_error(reply, 403, "forbidden")
    assert w.kore.none_for(rid)
    record = expect_denied(w.main, rid, 403, "denied", "forbidden")
    assert record["caller"] == "narrow-service"


def test_caller_within_its_globs_is_served_and_recorded(w: World) -> None:
    """§2/§3: each caller has `bots` globs; the audit names the caller."""
    rid = unique("narrow")
    assert w.main.deactivate("st-own-1", {"userId": "u"}, rid=rid, key=NARROW_KEY).status == 200
    assert {r["caller"] for r in w.main.records_for(rid)} == {"narrow-service"}


@pytest.mark.parametrize("route", ["simple", "batch", "kore"])
def test_auth_none_serves_without_key_as_caller_local(w: World, route: str) -> None:
    """§2: `server.auth = "none"` turns caller authentication off; the caller is recorded
    as "local" and `[[callers]]` may be omitted (`local` has none)."""
    rid = unique("none")
    reply = _route_call(w.local, route, rid)
    assert reply.status == 200, reply.text
    if route == "kore":
        assert reply.json() == {"success": True}
    rids = [f"{rid}.0"] if route == "batch" else [rid]
    records = [r for x in rids for r in w.local.records_for(x)]
    assert [r["event"] for r in records] == ["deactivate.requested", "deactivate.completed"]
    assert {r["caller"] for r in records} == {"local"}


def test_auth_none_ignores_an_authorization_header(w: World) -> None:
    """§2: with `auth = "none"` caller authentication is off: a stray key is no 401."""
    reply = w.local.deactivate(unique("st-stray"), {"userId": "u"}, key="whatever-key")
    assert reply.status == 200, reply.text


@pytest.mark.parametrize("host", ["::1", "localhost"])
def test_auth_none_starts_on_loopback_names(world: World, tmp_path: Path, host: str) -> None:
    """§2: `auth = "none"` is accepted on a loopback listen address (::1, `localhost`).
    Also §4 `[rate_limit]`: a spent budget is waited for when that fits the deadline (::1),
    and `enabled = false` applies none (localhost)."""
    world.kore.reset()
    gw = start_gateway(f"none-{host}", tmp_path, {
        "server": {"auth": "none"},
        "upstream": {"base_url": world.kore.url, "allow_insecure_http": True},
        "audit": {"path": str(tmp_path / "audit" / "loopback.jsonl")},
        "rate_limit": ({"enabled": False, "windows": [{"calls": 1, "per_s": 3600}]}
                       if host == "localhost" else {"windows": [{"calls": 1, "per_s": 1}]}),
        "apps": [app_table("sessions", ["*"], client_secret=SECRET_SESSIONS)]}, key=None,
        host=host)
    try:
        gw.process.wait_http(gw.host, gw.port)
        rid = unique("loop")
        assert gw.deactivate("st-loopback", {"userId": "u"}, rid=rid).status == 200
        assert {r["caller"] for r in gw.records_for(rid)} == {"local"}
        again = gw.deactivate("st-loopback", {"userId": "u"})
        assert again.status == 200, again.text
        if host != "localhost":  # (localhost: a limit applied would have been a 429)
            # §2: the budget is spent but waiting (about 1 s) fits the deadline: it waits
            assert again.elapsed_s >= 0.5, again.elapsed_s
    finally:
        assert gw.process.stop() == 0


# --- request IDs ---------------------------------------------------------------------------

REQUEST_IDS = [
    pytest.param("req-1", True, id="simple-kept"),
    pytest.param("A.b_c:d-9", True, id="every-allowed-class-kept"),
    pytest.param("x" * 128, True, id="128-chars-kept"),
    pytest.param("x" * 129, False, id="129-chars-replaced"),
    pytest.param("", False, id="empty-replaced"),
    pytest.param("has space", False, id="space-replaced"),
    pytest.param("a/b", False, id="slash-replaced"),
    pytest.param("semi;colon", False, id="semicolon-replaced"),
    pytest.param("quote\"d", False, id="quote-replaced"),
    pytest.param("ünïcode".encode(), False, id="non-ascii-replaced"),
]


@pytest.mark.parametrize(("given", "kept"), REQUEST_IDS)
def test_request_id_kept_or_replaced(w: World, given: str | bytes, kept: bool) -> None:
    """§2 Request IDs: an inbound X-Request-ID matching ^[A-Za-z0-9._:-]{1,128}$ is kept,
    anything else replaced by a new random ID; the same ID goes upstream and into the audit."""
    bot = unique("st-rid")
    if kept:  # unique per run, same shape
        assert isinstance(given, str)
        given = f"{given[:-10]}{uuid.uuid4().hex[:10]}" if len(given) > 20 else unique(given)
    reply = w.main.deactivate(bot, {"userId": "u"}, key=True, extra=[("X-Request-ID", given)])
    assert reply.status == 200, reply.text
    rid = reply.header("X-Request-ID")
    assert rid is not None and REQUEST_ID_RE.fullmatch(rid), rid
    assert reply.json()["requestId"] == rid
    if kept:
        assert rid == given
    else:
        assert rid != (given.decode("latin-1") if isinstance(given, bytes) else given)
    [call] = w.kore.calls_for(rid)
    assert call["headers"]["x-request-id"] == rid
    assert [r["event"] for r in w.main.records_for(rid)] == ["deactivate.requested",
                                                             "deactivate.completed"]


def test_new_request_ids_are_random(w: World) -> None:
    """§2: "replaced by a new random ID": each request gets its own."""
    ids = [w.main.call("GET", "/healthz").header("X-Request-ID") for _ in range(5)]
    ids += [w.main.deactivate(unique("st-new"), {"userId": "u"}).header("X-Request-ID")]
    assert all(i and REQUEST_ID_RE.fullmatch(i) for i in ids), ids
    assert len(set(ids)) == len(ids)


def _every_kind_of_answer(w: World) -> list[tuple[str, Reply]]:
    bot = unique("st-any")
    return [
        ("200", w.main.deactivate(bot, {"userId": "u"})),
        ("400", w.main.deactivate(bot, {"userId": ""})),
        ("401", w.main.deactivate(bot, {"userId": "u"}, key=None)),
        ("403", w.main.deactivate(bot, {"userId": "u"}, key=NARROW_KEY)),
        ("404", w.main.call("GET", "/no/such/route")),
        ("405", w.main.call("GET", "/v1/sessions/deactivate")),
        ("413", w.main.deactivate(bot, None, raw=b" " * 70_000)),
        ("415", w.main.deactivate(bot, {"userId": "u"}, content_type=None)),
        ("healthz", w.main.call("GET", "/healthz")),
        ("readyz", w.main.call("GET", "/readyz")),
        ("metrics", w.main.call("GET", "/metrics")),
        ("openapi", w.main.call("GET", "/openapi.json")),
        ("kore-404-passthrough", w.main.kore(unique("st-xgone"), {"userId": "u"})),
    ]


def test_every_response_carries_x_request_id(w: World) -> None:
    """§2: every response carries X-Request-ID (errors, health, metrics, pass-through)."""
    for name, reply in _every_kind_of_answer(w):
        rid = reply.header("X-Request-ID")
        assert rid is not None and REQUEST_ID_RE.fullmatch(rid), (name, reply.headers)
        assert len(reply.all("X-Request-ID")) == 1, (name, reply.headers)


# --- routes --------------------------------------------------------------------------------

def test_simple_route_success_body(w: World) -> None:
    """§2 Routes: 200 {"success": true, "botId", "userId", "channel", "requestId"}, `channel`
    null when none was given."""
    bot, rid = unique("st-ok"), unique("ok")
    reply = w.main.deactivate(bot, {"userId": "u-ok"}, rid=rid)
    assert reply.status == 200 and reply.content_type == "application/json"
    assert reply.json() == {"success": True, "botId": bot, "userId": "u-ok", "channel": None,
                            "requestId": rid}
    rid2 = unique("ok")
    reply = w.main.deactivate(bot, {"userId": "u-ok", "channel": "rtm"}, rid=rid2)
    assert reply.json() == {"success": True, "botId": bot, "userId": "u-ok", "channel": "rtm",
                            "requestId": rid2}


def test_batch_items_authorized_validated_and_audited_on_their_own(w: World) -> None:
    """§2 batch: every item on its own; failures carry `error` = {code, message} and the
    `status` that item alone would have had; summary counts; item i uses `<requestId>.<i>`
    upstream and in the audit; a well-formed batch is audited through its items only."""
    rid = unique("batch")
    ok_1, ok_2, gone = unique("st-bok"), unique("st-bok"), unique("st-xgone")
    items: list[Any] = [
        {"botId": ok_1, "userId": "u0"},
        {"botId": ok_2, "userId": "u1", "channel": "rtm"},
        {"botId": "not-a-bot", "userId": "u2"},
        {"botId": unique("st-bv"), "userId": ""},
        {"botId": unique("st-bv"), "userId": "u4", "extra": True},
        {"botId": unique("st-noapp"), "userId": "u5"},
        {"botId": gone, "userId": "u6"},
        {"botId": unique("st-bv"), "userId": "u7", "channel": "NOT valid"},
    ]
    reply = w.main.batch({"items": items}, rid=rid)
    assert reply.status == 200, reply.text
    assert reply.content_type == "application/json"
    body = reply.json()
    assert set(body) == {"results", "summary"}, body
    assert body["summary"] == {"succeeded": 2, "failed": 6}
    results = body["results"]
    assert [r["index"] for r in results] == list(range(len(items)))
    expected = [(200, None), (200, None), (400, "invalid_request"), (400, "invalid_request"),
                (400, "invalid_request"), (403, "bot_not_configured"), (404, "upstream_rejected"),
                (400, "invalid_request")]
    for item, result, (status, code) in zip(items, results, expected, strict=True):
        assert result["botId"] == item["botId"] and result["userId"] == item["userId"], result
        assert result["status"] == status, result
        assert result["success"] is (code is None), result
        if code is None:
            assert set(result) == {"index", "botId", "userId", "status", "success"}, result
        else:
            assert set(result) == {"index", "botId", "userId", "status", "success", "error"}
            assert set(result["error"]) == {"code", "message"}, result
            assert result["error"]["code"] == code
            assert isinstance(result["error"]["message"], str) and result["error"]["message"]
    assert "botId" in results[2]["error"]["message"]
    assert "userId" in results[3]["error"]["message"]
    assert "extra" in results[4]["error"]["message"]
    assert "channel" in results[7]["error"]["message"]
    # upstream: the three items that went there, under their own request IDs
    for index in (0, 1, 6):
        [call] = w.kore.calls_for(f"{rid}.{index}")
        assert call["headers"]["x-request-id"] == f"{rid}.{index}"
    assert w.kore.calls_for(f"{rid}.1")[0]["body"] == {"userId": "u1", "status": "inactive",
                                                       "channel": "rtm"}
    assert w.kore.calls_for(rid) == []
    # audit: per item only, never the batch's own ID
    assert w.main.records_for(rid, terminal=False, timeout_s=0) == []
    for index, (status, _code) in enumerate(expected):
        records = w.main.records_for(f"{rid}.{index}")
        final = terminal(records)
        assert final["status"] == status
        went_up = index in (0, 1, 6)
        assert [r["event"] for r in records] == (
            ["deactivate.requested", "deactivate.completed"] if went_up
            else ["deactivate.denied"]), records
    outcomes = [terminal(w.main.records_for(f"{rid}.{i}"))["outcome"] for i in range(8)]
    assert outcomes == ["success", "success", "rejected", "rejected", "rejected", "denied",
                        "rejected", "rejected"]


def test_batch_forbidden_item_fails_alone(w: World) -> None:
    """§2 batch: a forbidden item gets its own 403 `forbidden` and does not fail the others."""
    rid = unique("bforbid")
    reply = w.main.batch({"items": [{"botId": "st-own-2", "userId": "u"},
                                    {"botId": "st-other-2", "userId": "u"}]},
                         rid=rid, key=NARROW_KEY)
    assert reply.status == 200, reply.text
    body = reply.json()
    assert body["summary"] == {"succeeded": 1, "failed": 1}
    assert body["results"][1]["status"] == 403
    assert body["results"][1]["error"]["code"] == "forbidden"
    expect_denied(w.main, f"{rid}.1", 403, "denied", "forbidden")


def test_batch_non_object_item_fails_alone(w: World) -> None:
    """§2 batch: an invalid item (not even an object) gets its own 400 error."""
    rid = unique("bnonobj")
    reply = w.main.batch({"items": ["just a string", {"botId": unique("st-b"), "userId": "u"}]},
                         rid=rid)
    assert reply.status == 200, reply.text
    body = reply.json()
    assert body["summary"] == {"succeeded": 1, "failed": 1}
    first = body["results"][0]
    assert first["index"] == 0 and first["status"] == 400 and first["success"] is False
    assert first["error"]["code"] == "invalid_request"
    assert {"botId", "userId"} <= set(first)
    expect_denied(w.main, f"{rid}.0", 400, "rejected", "invalid_request")


MALFORMED_BATCHES = [
    pytest.param(b'{"items": [', id="not-json"),
    pytest.param(b"{}", id="no-items-list"),
    pytest.param(b'{"items": {"botId": "st-a", "userId": "u"}}', id="items-not-a-list"),
    pytest.param(b'{"items": null}', id="items-null"),
    pytest.param(b'{"items": []}', id="empty-list"),
    pytest.param(b'{"items": [{"botId": "st-a", "userId": "u"}], "dryRun": true}',
                 id="unknown-top-level-key"),
    pytest.param(b'[{"botId": "st-a", "userId": "u"}]', id="body-not-an-object"),
]


@pytest.mark.parametrize("raw", MALFORMED_BATCHES)
def test_malformed_batch_fails_whole_with_one_denied_record(w: World, raw: bytes) -> None:
    """§2 batch: a malformed batch → 400 `invalid_request` as a whole, with one
    `deactivate.denied` record."""
    rid = unique("bad-batch")
    expect_error(w.main.batch(None, raw=raw, rid=rid), 400, "invalid_request")
    assert w.kore.none_for(rid)
    expect_denied(w.main, rid, 400, "rejected", "invalid_request")
    assert not [r for r in w.main.records() if r["requestId"].startswith(rid + ".")]


def test_batch_over_max_items_is_413_with_one_denied_record(w: World) -> None:
    """§2 batch: more than `server.max_batch_items` (default 1000) → 413 `payload_too_large`,
    one `deactivate.denied` record."""
    rid = unique("big-batch")
    items = [{"botId": "st-a", "userId": f"u{i}"} for i in range(1001)]
    expect_error(w.main.batch({"items": items}, rid=rid), 413, "payload_too_large")
    assert w.kore.none_for(rid)
    expect_denied(w.main, rid, 413, "rejected", "payload_too_large")
    assert not [r for r in w.main.records() if r["requestId"].startswith(rid + ".")]


def test_batch_of_exactly_1000_items_is_accepted(w: World) -> None:
    """§2 batch: the default `max_batch_items` is 1000 (1000 is allowed; items invalid so that
    nothing goes upstream)."""
    items = [{"botId": "bad", "userId": f"u{i}"} for i in range(1000)]
    reply = w.main.batch({"items": items}, timeout_s=60)
    assert reply.status == 200, reply.text[:300]
    assert reply.json()["summary"] == {"succeeded": 0, "failed": 1000}


def test_max_batch_items_is_configurable(w: World) -> None:
    """§4 `server.max_batch_items` (`hashed` has 3): 4 items → 413, 3 items → served."""
    rid = unique("cfg-batch")
    items = [{"botId": unique("st-mb"), "userId": "u"} for _ in range(4)]
    expect_error(w.hashed.batch({"items": items}, rid=rid), 413, "payload_too_large")
    expect_denied(w.hashed, rid, 413, "rejected", "payload_too_large")
    reply = w.hashed.batch({"items": items[:3]})
    assert reply.status == 200 and reply.json()["summary"] == {"succeeded": 3, "failed": 0}


# --- the Kore-compatible route ---------------------------------------------------------------

def mint(app: str = "sessions", secret: str = SECRET_SESSIONS, **claims: Any) -> str:
    now = int(time.time())
    body = {"appId": CID[app], "sub": "contract-test", "iat": now, "exp": now + 300, **claims}
    return jwt.encode(body, secret, algorithm="HS256")


def test_kore_route_answers_like_kore(w: World) -> None:
    """§2: `PUT /api/public/bot/{botId}/session` with Kore.ai's body → Kore.ai's own status
    and body ({"success": true}); the caller's own `auth` header is dropped."""
    rid, bot = unique("kore"), unique("st-kore")
    reply = w.main.kore(bot, {"userId": "u-k", "status": "inactive", "channel": "rtm"}, rid=rid,
                        extra=[("auth", "callers-own-kore-jwt")])
    assert reply.status == 200, reply.text
    assert reply.json() == {"success": True}
    assert reply.content_type == "application/json"
    [call] = w.kore.calls_for(rid)
    assert call["body"] == {"userId": "u-k", "status": "inactive", "channel": "rtm"}
    assert call["headers"]["auth"] != "callers-own-kore-jwt"
    assert "callers-own-kore-jwt" not in json.dumps(call["headers"])
    verify_token(w, call["headers"]["auth"])


def test_kore_route_with_auth_none_needs_nothing_and_drops_the_callers_auth(w: World) -> None:
    """§2: a Kore.ai client switches by changing its base URL and sending its gateway key —
    "or nothing, with auth = "none"" — its own `auth` header is dropped."""
    rid = unique("kore-none")
    reply = w.local.kore(unique("st-kn"), {"userId": "u", "status": "inactive"}, rid=rid,
                         extra=[("auth", "clients-old-kore-jwt")])
    assert reply.status == 200 and reply.json() == {"success": True}, reply.text
    [call] = w.kore.calls_for(rid)
    assert call["headers"]["auth"] != "clients-old-kore-jwt"
    verify_token(w, call["headers"]["auth"])


def test_kore_route_status_is_optional_and_always_sent_inactive(w: World) -> None:
    """§1/§2: `status` is optional on the Kore-compatible route; upstream it is always
    "inactive"."""
    rid = unique("kore-nostatus")
    assert w.main.kore(unique("st-k"), {"userId": "u"}, rid=rid).status == 200
    assert w.kore.calls_for(rid)[0]["body"] == {"userId": "u", "status": "inactive"}


def test_kore_route_passes_kore_404_through(w: World) -> None:
    """§2: Kore.ai's own 404 answer is passed through with Kore.ai's status and body."""
    bot = unique("st-xgone")
    direct = w.kore.put(f"/api/public/bot/{bot}/session", mint(), {"userId": "u"})
    assert direct.status == 404
    rid = unique("kore404")
    reply = w.main.kore(bot, {"userId": "u"}, rid=rid)
    assert reply.status == 404, reply.text
    assert reply.json() == direct.json()
    record = terminal(w.main.records_for(rid))
    assert record["event"] == "deactivate.completed"
    assert (record["outcome"], record["status"], record["upstreamStatus"]) == (
        "rejected", 404, 404)


def test_kore_route_passes_kore_400_through(w: World) -> None:
    """§2: Kore.ai's own 400 answer is passed through with Kore.ai's status and body."""
    w.kore.faults(fail_first=2, error_status=400)
    rid, bot = unique("kore400"), unique("st-k400")
    reply = w.main.kore(bot, {"userId": "u"}, rid=rid)
    direct = w.kore.put(f"/api/public/bot/{bot}/session", mint(), {"userId": "u"})
    assert direct.status == 400
    assert reply.status == 400, reply.text
    assert reply.json() == direct.json()
    assert len(w.kore.calls_for(rid)) == 1
    record = terminal(w.main.records_for(rid))
    assert (record["outcome"], record["upstreamStatus"]) == ("rejected", 400)


def test_kore_route_other_upstream_outcomes_use_the_table(w: World) -> None:
    """§2: on the Kore-compatible route every other upstream outcome follows the table
    (5xx after retries → 502 `upstream_unavailable` in the gateway's envelope)."""
    w.kore.faults(fail_first=3, error_status=500)
    expect_error(w.main.kore(unique("st-k5"), {"userId": "u"}), 502, "upstream_unavailable")


@pytest.mark.parametrize(("payload", "names"), [
    pytest.param({"userId": "u", "status": "active"}, "status", id="status-not-inactive"),
    pytest.param({"userId": "u", "status": ""}, "status", id="status-empty"),
    pytest.param({"userId": "u", "status": None}, "status", id="status-null"),
    pytest.param({"userId": "u", "status": "INACTIVE"}, "status", id="status-uppercase"),
    pytest.param({"userId": "u", "sessionId": "s"}, "sessionId", id="unknown-field"),
    pytest.param({"status": "inactive"}, "userId", id="userId-missing"),
])
def test_kore_route_input_rules(w: World, payload: dict[str, Any], names: str) -> None:
    """§2 Input rules: `status` other than "inactive" is rejected, unknown fields are rejected
    — errors the gateway produces use the envelope."""
    rid = unique("kore-bad")
    expect_error(w.main.kore(unique("st-kb"), payload, rid=rid), 400, "invalid_request",
                 names=names)
    assert w.kore.none_for(rid)
    expect_denied(w.main, rid, 400, "rejected", "invalid_request")


def test_kore_route_bot_id_pattern(w: World) -> None:
    """§2 Input rules: the path's botId must match `upstream.bot_id_pattern` on this route too."""
    rid = unique("kore-badbot")
    expect_error(w.main.kore("bad-bot", {"userId": "u"}, rid=rid), 400, "invalid_request",
                 names="botId")
    expect_denied(w.main, rid, 400, "rejected", "invalid_request")


# --- health, readiness, metrics, OpenAPI -------------------------------------------------

def test_health_ready_metrics_openapi_need_no_key(w: World) -> None:
    """§2: /healthz 200 while running; /readyz 200 when ready; /metrics Prometheus text;
    /openapi.json; none needs a caller key."""
    from prometheus_client.parser import text_string_to_metric_families

    assert w.main.call("GET", "/healthz").status == 200
    assert w.main.call("GET", "/readyz").status == 200
    bad_key = {"Authorization": "Bearer not-a-key"}
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        assert w.main.call("GET", path, headers=bad_key).status == 200, path
    metrics = w.main.call("GET", "/metrics")
    assert metrics.status == 200
    kind = metrics.header("Content-Type") or ""
    assert kind.startswith(("text/plain", "application/openmetrics-text")), kind
    assert list(text_string_to_metric_families(metrics.text))


OPERATIONS_ROUTES = ("/healthz", "/readyz", "/metrics", "/openapi.json")


def test_admin_listen_serves_operations_and_takes_metrics_off_the_api(world: World,
                                                                       tmp_path: Path) -> None:
    """§4 `admin_listen`: /metrics, /healthz, /readyz and /openapi.json on that address, no
    caller key (§2), no deactivation route; when it is set, /metrics is served only there.
    The other three stay on the API address."""
    world.kore.reset()
    admin_port = free_port()
    gw = start_gateway("admin", tmp_path, {
        "server": {"admin_listen": f"127.0.0.1:{admin_port}"},
        "upstream": {"base_url": world.kore.url, "allow_insecure_http": True},
        "audit": {"path": str(tmp_path / "audit" / "admin.jsonl")},
        "apps": [app_table("sessions", ["*"], client_secret=SECRET_SESSIONS)],
        "callers": [{"name": "crm-service", "key_sha256": hashlib.sha256(
            world.crm_key.encode()).hexdigest(), "bots": ["st-*"]}]}, key=world.crm_key)
    try:
        gw.process.wait_http(gw.host, gw.port)
        gw.process.wait_http("127.0.0.1", admin_port)
        rid = unique("adm")
        assert gw.deactivate(unique("st-adm"), {"userId": "u"}, rid=rid).status == 200
        bad_key = {"Authorization": "Bearer not-a-key"}
        for path in OPERATIONS_ROUTES:
            reply = http(admin_port, "GET", path, headers=bad_key)
            TRANSCRIPT.append(reply)
            assert reply.status == 200, (path, reply.text)
            assert REQUEST_ID_RE.fullmatch(reply.header("X-Request-ID") or ""), reply.headers
        metrics = http(admin_port, "GET", "/metrics").text
        assert 'caller="crm-service"' in metrics  # what the API served, counted there
        expect_error(gw.call("GET", "/metrics"), 404, "not_found")
        for path in ("/healthz", "/readyz", "/openapi.json"):
            assert gw.call("GET", path).status == 200, path
        refused = unique("adm-x")
        bot = unique("st-adm")
        for method, path, payload in [
                ("POST", f"/v1/bots/{bot}/sessions/deactivate", {"userId": "u"}),
                ("POST", "/v1/sessions/deactivate", {"items": [{"botId": bot, "userId": "u"}]}),
                ("PUT", f"/api/public/bot/{bot}/session", {"userId": "u"})]:
            reply = http(admin_port, method, path, body=json.dumps(payload).encode(), headers={
                "Authorization": f"Bearer {world.crm_key}", "Content-Type": "application/json",
                "X-Request-ID": refused})
            TRANSCRIPT.append(reply)
            expect_error(reply, 404, "not_found")
        assert world.kore.none_for(refused)
        assert gw.records_for(refused, terminal=False) == []
    finally:
        assert gw.process.stop() == 0


def test_openapi_document_covers_every_route(w: World) -> None:
    """§2: GET /openapi.json — an OpenAPI 3.1 document of every route in the table."""
    from openapi_spec_validator import validate

    reply = w.main.call("GET", "/openapi.json")
    assert reply.status == 200
    doc = reply.json()
    assert str(doc.get("openapi", "")).startswith("3.1"), doc.get("openapi")
    validate(doc)
    paths = doc["paths"]
    for path, method in [("/v1/bots/{botId}/sessions/deactivate", "post"),
                         ("/v1/sessions/deactivate", "post"),
                         ("/api/public/bot/{botId}/session", "put"),
                         ("/healthz", "get"), ("/readyz", "get"), ("/metrics", "get"),
                         ("/openapi.json", "get")]:
        assert method in paths.get(path, {}), (path, method, sorted(paths))


# --- input rules -----------------------------------------------------------------------------

INVALID_INPUT = [
    pytest.param("bad-bot", {"userId": "u"}, "botId", id="botId-pattern"),
    pytest.param("st-", {"userId": "u"}, "botId", id="botId-empty-after-prefix"),
    pytest.param("st-" + "a" * 101, {"userId": "u"}, "botId", id="botId-101-chars"),
    pytest.param("st-a_b", {"userId": "u"}, "botId", id="botId-underscore"),
    pytest.param("st-a.b", {"userId": "u"}, "botId", id="botId-dot"),
    pytest.param("st-a%0A", {"userId": "u"}, "botId", id="botId-trailing-newline"),
    pytest.param("st-a%20", {"userId": "u"}, "botId", id="botId-trailing-space"),
    pytest.param(None, {}, "userId", id="userId-missing"),
    pytest.param(None, {"userId": ""}, "userId", id="userId-empty"),
    pytest.param(None, {"userId": "u" * 257}, "userId", id="userId-257-chars"),
    pytest.param(None, {"userId": "🙂" * 257}, "userId", id="userId-257-astral-chars"),
    pytest.param(None, {"userId": 42}, "userId", id="userId-number"),
    pytest.param(None, {"userId": None}, "userId", id="userId-null"),
    pytest.param(None, {"userId": ["u"]}, "userId", id="userId-list"),
    pytest.param(None, {"userId": "a\x00b"}, "userId", id="userId-C0-NUL"),
    pytest.param(None, {"userId": "a\nb"}, "userId", id="userId-C0-LF"),
    pytest.param(None, {"userId": "a\tb"}, "userId", id="userId-C0-TAB"),
    pytest.param(None, {"userId": "a\x1fb"}, "userId", id="userId-C0-US"),
    pytest.param(None, {"userId": "a\x7fb"}, "userId", id="userId-DEL"),
    pytest.param(None, {"userId": "a\x85b"}, "userId", id="userId-C1-NEL"),
    pytest.param(None, {"userId": "a\x9fb"}, "userId", id="userId-C1-APC"),
    pytest.param(None, {"userId": "u", "channel": ""}, "channel", id="channel-empty"),
    pytest.param(None, {"userId": "u", "channel": "a" * 65}, "channel", id="channel-65-chars"),
    pytest.param(None, {"userId": "u", "channel": "a.b"}, "channel", id="channel-dot"),
    pytest.param(None, {"userId": "u", "channel": "a b"}, "channel", id="channel-space"),
    pytest.param(None, {"userId": "u", "channel": 7}, "channel", id="channel-number"),
    pytest.param(None, {"userId": "u", "channel": "rtm\n"}, "channel",
                 id="channel-trailing-newline"),
    pytest.param(None, {"userId": "u", "channel": "ｒｔｍ"}, "channel", id="channel-fullwidth"),
    pytest.param(None, {"userId": "u", "extra": 1}, "extra", id="unknown-field"),
    pytest.param(None, {"userId": "u", "status": "inactive"}, "status",
                 id="status-unknown-on-simple-route"),
    pytest.param(None, ["u"], None, id="body-array"),
    pytest.param(None, "u", None, id="body-string"),
]


@pytest.mark.parametrize(("bot", "payload", "names"), INVALID_INPUT)
def test_input_rule_violation_is_400(w: World, bot: str | None, payload: Any,
                                     names: str | None) -> None:
    """§2 Input rules: violations → 400 `invalid_request` naming the field; nothing upstream;
    one `deactivate.denied` record with outcome `rejected`."""
    rid = unique("rule")
    reply = w.main.deactivate(bot or unique("st-rule"), payload, rid=rid)
    expect_error(reply, 400, "invalid_request", names=names or ())
    assert w.kore.none_for(rid)
    expect_denied(w.main, rid, 400, "rejected", "invalid_request")


VALID_INPUT = [
    pytest.param("st-" + "a" * 100, {"userId": "u"}, id="botId-100-chars"),
    pytest.param("st-Ab-9-z", {"userId": "u"}, id="botId-mixed"),
    pytest.param(None, {"userId": "u" * 256}, id="userId-256-chars"),
    pytest.param(None, {"userId": "🙂" * 256}, id="userId-256-astral-chars"),
    pytest.param(None, {"userId": "ユーザー-ü-🙂"}, id="userId-unicode"),
    pytest.param(None, {"userId": "line\u2028sep"}, id="userId-U+2028-is-not-Cc"),
    pytest.param(None, {"userId": "mail@example.com with space"}, id="userId-space"),
    pytest.param(None, {"userId": "u", "channel": "a" * 64}, id="channel-64-chars"),
    pytest.param(None, {"userId": "u", "channel": "rtm_2"}, id="channel-underscore-digit"),
    pytest.param(None, {"userId": "u", "channel": "ivrVoice"}, id="channel-camel-case"),
    pytest.param(None, {"userId": "u", "channel": "ivrInst-6ad846f2-75b0-55a1-8029-aab86de09817"},
                 id="channel-webhook-instance"),
]


@pytest.mark.parametrize(("bot", "payload"), VALID_INPUT)
def test_input_rule_boundaries_are_accepted(w: World, bot: str | None, payload: Any) -> None:
    """§2 Input rules: the edges of each rule are valid input."""
    rid = unique("edge")
    reply = w.main.deactivate(bot or unique("st-edge"), payload, rid=rid)
    assert reply.status == 200, reply.text
    [call] = w.kore.calls_for(rid)
    assert call["body"]["userId"] == payload["userId"]


@pytest.mark.parametrize("bot", [".", ".."])
def test_dot_bot_ids_rejected_whatever_the_pattern(w: World, bot: str) -> None:
    """§2: botId values `.` and `..` are always rejected, whatever the pattern allows
    (`local` allows `^.{1,100}$`); here as batch items."""
    rid = unique("dots")
    reply = w.local.batch({"items": [{"botId": bot, "userId": "u"}]}, rid=rid)
    assert reply.status == 200, reply.text
    [result] = reply.json()["results"]
    assert result["status"] == 400 and result["error"]["code"] == "invalid_request", result
    assert "botId" in result["error"]["message"]
    assert w.kore.none_for(rid)


@pytest.mark.parametrize("segment", ["%2E", "%2E%2E", "%2e%2e", ".%2E"])
@pytest.mark.parametrize("route", ["simple", "kore"])
def test_encoded_dot_bot_ids_in_the_path_rejected(w: World, route: str, segment: str) -> None:
    """§2: botId `.`/`..` (percent-encoded in the path) → 400 `invalid_request` naming botId."""
    path = (f"/v1/bots/{segment}/sessions/deactivate" if route == "simple"
            else f"/api/public/bot/{segment}/session")
    method = "POST" if route == "simple" else "PUT"
    rid = unique("encdots")
    reply = w.local.send(method, path, {"userId": "u"}, rid=rid)
    expect_error(reply, 400, "invalid_request", names="botId")
    assert w.kore.none_for(rid)


@pytest.mark.parametrize("route", ["simple", "kore"])
def test_encoded_slash_in_the_path_never_adds_a_segment(w: World, route: str) -> None:
    """§1: a botId taken from the caller's path can never add an upstream path segment."""
    rid = unique("slash")
    path = ("/v1/bots/st-a%2Fb/sessions/deactivate" if route == "simple"
            else "/api/public/bot/st-a%2Fb/session")
    reply = w.local.send("POST" if route == "simple" else "PUT", path, {"userId": "u"}, rid=rid)
    if reply.status == 200:
        [call] = w.kore.calls_for(rid)
        assert call["path"] == "/api/public/bot/st-a%2Fb/session", call["path"]
    else:
        expect_error(reply, reply.status)
        assert reply.status in (400, 404)
        assert w.kore.none_for(rid)


def test_bot_id_with_trailing_newline_is_refused_in_a_batch(w: World) -> None:
    """§2 Input rules: botId must match the pattern as a whole (a trailing newline does not)."""
    rid = unique("newline")
    reply = w.main.batch({"items": [{"botId": "st-nl-bot\n", "userId": "u"}]}, rid=rid)
    [result] = reply.json()["results"]
    assert result["status"] == 400 and "botId" in result["error"]["message"], result
    assert w.kore.none_for(rid)


HOSTILE_BODIES = [
    pytest.param(b"[" * 30000 + b"]" * 30000, id="deeply-nested"),
    pytest.param(b'{"userId": 1e999}', id="huge-float"),
    pytest.param(b'{"userId": "u", "channel": ' + b"9" * 20000 + b"}", id="huge-integer"),
    pytest.param(b'{"userId": "\\ud800"}', id="lone-surrogate"),
    pytest.param(b'{"userId": "a", "userId": "b"}', id="duplicate-keys"),
    pytest.param(b'{"userId": "u"} {"userId": "v"}', id="two-documents"),
    pytest.param(b"\xef\xbb\xbf" + b'{"userId": "u"}', id="utf-8-bom"),
]


@pytest.mark.parametrize("raw", HOSTILE_BODIES)
def test_hostile_bodies_never_get_a_500(w: World, raw: bytes) -> None:
    """§2: "Never a 500, never a stack trace" — whatever the body, an answer in the contract's
    terms (a refusal in the envelope)."""
    rid = unique("hostile")
    reply = w.main.deactivate(unique("st-hostile"), None, raw=raw, rid=rid)
    assert reply.status < 500, reply.text
    if reply.status != 200:
        expect_error(reply, reply.status)
    assert len([r for r in w.main.records_for(rid) if r["event"] != "deactivate.requested"]) == 1


def test_denied_record_says_what_was_asked(w: World) -> None:
    """§3: `botId`, `userId`, `channel`: what was asked — also when the ask is refused."""
    rid, bot = unique("asked"), unique("st-asked")
    expect_error(w.main.deactivate(bot, {"userId": "u-asked", "channel": "NOT.valid"}, rid=rid),
                 400, "invalid_request")
    record = expect_denied(w.main, rid, 400, "rejected", "invalid_request")
    assert (record["botId"], record["userId"]) == (bot, "u-asked"), record


# --- body size and content type --------------------------------------------------------------

def padded(payload: Any, size: int) -> bytes:
    raw = json.dumps(payload).encode()
    return raw + b" " * (size - len(raw))


def test_body_of_exactly_max_body_bytes_is_accepted(w: World) -> None:
    """§2: only a body *larger* than `server.max_body_bytes` (default 64 KiB) is refused."""
    reply = w.main.deactivate(unique("st-size"), None, raw=padded({"userId": "u"}, 65536))
    assert reply.status == 200, reply.text


@pytest.mark.parametrize(("route", "raw", "chunked"), [
    pytest.param("simple", padded({"userId": "u"}, 65537), False, id="simple-65537-valid-json"),
    pytest.param("simple", b"x" * 70_000, False, id="simple-not-json-413-before-400"),
    pytest.param("simple", b"{" * 70_000, True, id="simple-chunked-no-length"),
    pytest.param("batch", b"x" * 70_000, False, id="batch"),
    pytest.param("kore", b"x" * 70_000, False, id="kore"),
])
def test_body_larger_than_max_body_bytes_is_413(w: World, route: str, raw: bytes,
                                                chunked: bool) -> None:
    """§2: body larger than `server.max_body_bytes` → 413 `payload_too_large` (before any
    JSON check); audited `denied`, outcome `rejected`."""
    rid = unique("big")
    headers = [("Authorization", f"Bearer {w.crm_key}"), ("Content-Type", "application/json"),
               ("X-Request-ID", rid)]
    path = {"simple": f"/v1/bots/{unique('st-big')}/sessions/deactivate",
            "batch": "/v1/sessions/deactivate",
            "kore": f"/api/public/bot/{unique('st-big')}/session"}[route]
    method = "PUT" if route == "kore" else "POST"
    if chunked:
        reply = w.main.call(method, path, headers=headers,
                            chunks=[raw[i:i + 8192] for i in range(0, len(raw), 8192)])
    else:
        reply = w.main.call(method, path, headers=headers, body=raw)
    expect_error(reply, 413, "payload_too_large")
    assert w.kore.none_for(rid)
    expect_denied(w.main, rid, 413, "rejected", "payload_too_large")


def test_max_body_bytes_is_configurable(w: World) -> None:
    """§4 `server.max_body_bytes` (`hashed` has 1024): 1025 bytes → 413, 1024 → served."""
    expect_error(w.hashed.deactivate(unique("st-mbb"), None, raw=padded({"userId": "u"}, 1025)),
                 413, "payload_too_large")
    reply = w.hashed.deactivate(unique("st-mbb"), None, raw=padded({"userId": "u"}, 1024))
    assert reply.status == 200, reply.text


@pytest.mark.parametrize("route", ["simple", "batch", "kore"])
@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "application/xml"])
def test_missing_or_wrong_content_type_is_415(w: World, route: str,
                                              content_type: str | None) -> None:
    """§2: missing or wrong content type → 415 `unsupported_media_type`; audited `rejected`."""
    rid = unique("ctype")
    reply = _route_call(w.main, route, rid, content_type=content_type)
    expect_error(reply, 415, "unsupported_media_type")
    assert w.kore.none_for(rid)
    expect_denied(w.main, rid, 415, "rejected", "unsupported_media_type")


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8",
                                          "Application/JSON"])
def test_json_content_type_variants_are_accepted(w: World, content_type: str) -> None:
    """§2: bodies are UTF-8 `application/json` (a charset=utf-8 parameter, any letter case:
    the same media type)."""
    reply = w.main.deactivate(unique("st-cs"), {"userId": "u"}, content_type=content_type)
    assert reply.status == 200, reply.text


@pytest.mark.parametrize("raw", [
    pytest.param(b'{"userId": "u"', id="truncated"),
    pytest.param(b'{"userId": "\xff\xfe"}', id="not-utf-8"),
    pytest.param(b"", id="empty"),
    pytest.param(b'{"userId": NaN}', id="NaN"),
])
def test_body_not_json_is_400(w: World, raw: bytes) -> None:
    """§2: not JSON → 400 `invalid_request`; never a 500."""
    rid = unique("notjson")
    expect_error(w.main.deactivate(unique("st-nj"), None, raw=raw, rid=rid), 400,
                 "invalid_request")
    expect_denied(w.main, rid, 400, "rejected", "invalid_request")


@pytest.mark.parametrize(("method", "path", "status"), [
    pytest.param("GET", "/no/such/route", 404, id="unknown-route"),
    pytest.param("POST", "/v1/bots/st-a/sessions", 404, id="unknown-route-near-miss"),
    pytest.param("GET", "/v1/sessions/deactivate", 405, id="GET-batch"),
    pytest.param("GET", "/v1/bots/st-a/sessions/deactivate", 405, id="GET-simple"),
    pytest.param("DELETE", "/api/public/bot/st-a/session", 405, id="DELETE-kore"),
    pytest.param("POST", "/api/public/bot/st-a/session", 405, id="POST-kore"),
    pytest.param("POST", "/healthz", 405, id="POST-healthz"),
    pytest.param("PATCH", "/v1/bots/st-a/sessions/deactivate", 405, id="PATCH-simple"),
    pytest.param("OPTIONS", "/v1/sessions/deactivate", 405, id="OPTIONS-batch"),
    pytest.param("GET", "/healthz/", 404, id="trailing-slash"),
])
def test_unknown_route_404_wrong_method_405(w: World, method: str, path: str,
                                            status: int) -> None:
    """§2: unknown route → 404; wrong method → 405; both in the error envelope."""
    expect_error(w.main.send(method, path, {"userId": "u"}), status)


# --- upstream outcomes as the caller sees them ----------------------------------------------

ANY = object()
OUTCOMES = [
    # faults, bot prefix, status, code, upstream calls, upstreamStatus, outcome, message part
    pytest.param({}, "st-xgone", 404, "upstream_rejected", 1, 404, "rejected", "Bot not found",
                 id="kore-404-same-status-upstream_rejected"),
    pytest.param({"fail_first": 1, "error_status": 400}, "st-k400", 400, "upstream_rejected", 1,
                 400, "rejected", "Bad Request", id="kore-400-same-status-upstream_rejected"),
    pytest.param({"fail_first": 10, "error_status": 500}, "st-k500", 502,
                 "upstream_unavailable", 3, 500, "failed", None,
                 id="kore-500-after-retries-502"),
    pytest.param({"fail_first": 10, "error_status": 503}, "st-k503", 502,
                 "upstream_unavailable", 3, 503, "failed", None,
                 id="kore-503-after-retries-502"),
    pytest.param({"fail_first": 2, "error_status": 502}, "st-k502ok", 200, None, 3, 200,
                 "success", None, id="kore-5xx-then-2xx-success"),
    pytest.param({"drop_rate": 1.0}, "st-kdrop", 502, "upstream_unavailable", 3, ANY, "failed",
                 None, id="connection-error-after-retries-502"),
    pytest.param({"rate_429": 1.0, "retry_after_s": 0}, "st-k429", 429, "rate_limited", 3, 429,
                 "failed", None, id="kore-429-after-retries"),
    pytest.param({"rate_429": 1.0, "retry_after_s": 60}, "st-k429now", 429, "rate_limited", 1,
                 429, "failed", None, id="kore-429-at-once-when-retry-after-passes-deadline"),
]


@pytest.mark.parametrize(("faults", "prefix", "status", "code", "calls", "upstream_status",
                          "outcome", "message"), OUTCOMES)
def test_upstream_outcome_table(w: World, faults: dict[str, Any], prefix: str, status: int,
                                code: str | None, calls: int, upstream_status: Any,
                                outcome: str, message: str | None) -> None:
    """§2 "Upstream outcomes as the caller sees them" (`main`: max_attempts is the default, 3;
    timeout_s 3),
    and §3: a request that went upstream ends with `deactivate.completed` and its outcome."""
    w.kore.faults(**faults)
    rid = unique("outcome")
    reply = w.main.deactivate(unique(prefix), {"userId": "u"}, rid=rid)
    if code is None:
        assert reply.status == status, reply.text
    else:
        expect_error(reply, status, code, names=message or ())
    if status in (429, 503):
        expect_retry_after(reply)
    if "retry_after_s" in faults and faults["retry_after_s"] > 5:
        assert reply.elapsed_s < 1.5, "429 not answered at once"
    assert len(w.kore.calls_for(rid)) == calls
    records = w.main.records_for(rid)
    assert [r["event"] for r in records] == ["deactivate.requested", "deactivate.completed"]
    record = records[1]
    assert (record["status"], record["outcome"], record["attempts"]) == (status, outcome, calls)
    if upstream_status is not ANY:
        assert record["upstreamStatus"] == upstream_status
    assert record["error"] == code


def test_no_answer_within_the_deadline_is_504(w: World) -> None:
    """§2: no answer within the deadline (`local`: timeout_s = 2) → 504 `upstream_timeout`."""
    w.kore.faults(latency_ms=4000)
    rid = unique("timeout")
    reply = w.local.deactivate(unique("st-slow"), {"userId": "u"}, rid=rid)
    expect_error(reply, 504, "upstream_timeout")
    assert 1.5 <= reply.elapsed_s < 3.8, reply.elapsed_s
    record = terminal(w.local.records_for(rid))
    assert record["event"] == "deactivate.completed"
    assert (record["status"], record["outcome"], record["error"]) == (504, "failed",
                                                                      "upstream_timeout")
    assert 1500 <= record["durationMs"] <= 4000, record["durationMs"]  # milliseconds


def test_timeout_is_the_whole_deadline_retries_included(w: World) -> None:
    """§4 `upstream.timeout_s`: the whole deadline for one caller request, retries included
    (`main`: 3 s; each attempt takes 1.3 s and fails: three attempts would need 3.9 s)."""
    w.kore.faults(latency_ms=1300, fail_first=10, error_status=500)
    rid = unique("deadline")
    reply = w.main.deactivate(unique("st-deadline"), {"userId": "u"}, rid=rid)
    assert reply.status in (502, 504), reply.text
    expect_error(reply, reply.status)
    assert reply.elapsed_s < 3.7, reply.elapsed_s


def test_gateways_own_rate_limit_is_429_nothing_sent(w: World) -> None:
    """§2: the gateway's own `[rate_limit]` budget for the bot is spent and waiting would pass
    the deadline → 429 `rate_limited` with `Retry-After`, nothing sent upstream; audited as
    `deactivate.denied`, outcome `failed` (`hashed`: 1 call per bot per hour)."""
    bot = unique("st-budget")
    assert w.hashed.deactivate(bot, {"userId": "u"}).status == 200
    rid = unique("budget")
    reply = w.hashed.deactivate(bot, {"userId": "u"}, rid=rid)
    expect_error(reply, 429, "rate_limited")
    assert expect_retry_after(reply) >= 1
    assert w.kore.calls_for(rid) == []
    expect_denied(w.hashed, rid, 429, "failed", "rate_limited")


def _in_background(func: Callable[[], Reply]) -> tuple[ThreadPoolExecutor, Future[Reply]]:
    pool = ThreadPoolExecutor(max_workers=1)
    return pool, pool.submit(func)


def test_overload_is_503_with_retry_after(w: World) -> None:
    """§2/§4: beyond `server.max_in_flight` (`hashed`: 1) → 503 `overloaded` with
    `Retry-After`; nothing upstream; audited `deactivate.denied`, outcome `failed`."""
    w.kore.faults(latency_ms=1500)
    first = unique("busy")
    pool, pending = _in_background(
        lambda: w.hashed.deactivate(unique("st-busy"), {"userId": "u"}, rid=first))
    try:
        w.kore.wait_call(first)
        rid = unique("shed")
        reply = w.hashed.deactivate(unique("st-shed"), {"userId": "u"}, rid=rid)
        expect_error(reply, 503, "overloaded")
        expect_retry_after(reply)
        assert w.kore.calls_for(rid) == []
        assert w.hashed.call("GET", "/healthz").status == 200  # "200 while the process runs"
        assert pending.result(timeout=20).status == 200
    finally:
        pool.shutdown(wait=True)
    expect_denied(w.hashed, rid, 503, "failed", "overloaded")


def test_draining_readyz_503_new_requests_overloaded_bounded_by_drain_s(
        world: World, tmp_path: Path) -> None:
    """§2: /readyz 503 while draining; draining → 503 `overloaded` with `Retry-After`;
    §4 `drain_s` bounds the graceful shutdown; every request ends with a terminal record."""
    kore = world.kore
    kore.reset()
    gw = start_gateway("drain", tmp_path, {
        "server": {"auth": "none", "drain_s": 2},
        "upstream": {"base_url": kore.url, "allow_insecure_http": True, "timeout_s": 30},
        "audit": {"path": str(tmp_path / "audit" / "drain.jsonl")},
        "apps": [app_table("sessions", ["*"], client_secret=SECRET_SESSIONS)]}, key=None)
    pool = None
    try:
        gw.process.wait_http(gw.host, gw.port)
        assert gw.call("GET", "/readyz").status == 200
        kore.faults(latency_ms=12_000)
        slow = unique("inflight")
        pool, pending = _in_background(
            lambda: gw.deactivate("st-drain-1", {"userId": "u"}, rid=slow, timeout_s=30))
        kore.wait_call(slow)
        stopped_at = time.monotonic()
        gw.process.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 2.5
        ready = gw.call("GET", "/readyz")
        while ready.status == 200 and time.monotonic() < deadline:
            time.sleep(0.02)
            ready = gw.call("GET", "/readyz")
        assert ready.status == 503, "readyz stayed 200 while draining"
        assert gw.call("GET", "/healthz").status == 200  # "200 while the process runs"
        shed = unique("draining")
        reply = gw.deactivate("st-drain-2", {"userId": "u"}, rid=shed)
        expect_error(reply, 503, "overloaded")
        expect_retry_after(reply)
        assert kore.calls_for(shed) == []
        code = gw.process.popen.wait(timeout=20)
        took = time.monotonic() - stopped_at
        assert code == 0
        assert took < 8.0, f"shutdown took {took:.1f} s with drain_s = 2"
        try:
            pending.result(timeout=10)
        except OSError:
            pass  # the connection of a request cut short may just close
        assert terminal(gw.records_for(slow))["event"] == "deactivate.completed"
        expect_denied(gw, shed, 503, "failed", "overloaded")
    finally:
        kore.faults(latency_ms=0)
        if pool is not None:
            pool.shutdown(wait=False)
        gw.process.stop()


def test_audit_unwritable_fails_closed(w: World) -> None:
    """§2/§3: the audit log cannot be written → 503 `audit_unavailable`, nothing goes
    upstream; /readyz is 503 then, and 200 again once the log is writable."""
    directory = w.local.audit_path.parent
    away = directory.with_name("audit-away")
    assert w.local.deactivate(unique("st-pre"), {"userId": "u"}).status == 200
    directory.rename(away)
    directory.write_text("a regular file where the audit directory was\n")
    try:
        rid = unique("noaudit")
        reply = w.local.deactivate(unique("st-noaudit"), {"userId": "u"}, rid=rid)
        expect_error(reply, 503, "audit_unavailable")
        assert w.kore.calls_for(rid) == []
        assert w.local.call("GET", "/readyz").status == 503
    finally:
        directory.unlink()
        away.rename(directory)
    deadline = time.monotonic() + 10
    while w.local.call("GET", "/readyz").status != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert w.local.call("GET", "/readyz").status == 200
    assert w.local.deactivate(unique("st-after"), {"userId": "u"}).status == 200


def test_readyz_notices_an_unwritable_audit_log_before_a_request_fails(w: World) -> None:
    """§2: /readyz is 200 only when "the audit log is writable" — even before a request
    has tried to write."""
    directory = w.local.audit_path.parent
    away = directory.with_name("audit-away-2")
    directory.rename(away)
    directory.write_text("a regular file where the audit directory was\n")
    try:
        deadline = time.monotonic() + 2.2  # /readyz may reuse a verdict for about a second
        status = w.local.call("GET", "/readyz").status
        while status == 200 and time.monotonic() < deadline:
            time.sleep(0.1)
            status = w.local.call("GET", "/readyz").status
        assert status == 503
    finally:
        directory.unlink()
        away.rename(directory)
        deadline = time.monotonic() + 10
        while w.local.call("GET", "/readyz").status != 200 and time.monotonic() < deadline:
            time.sleep(0.1)


# =========================================================================================
# 3. The audit log
# =========================================================================================

def test_requested_record_is_written_before_the_call_is_made(w: World) -> None:
    """§3: every call that goes upstream is preceded by a `deactivate.requested` record that
    is durable before the call is made (it is in the file while Kore.ai holds the call)."""
    w.kore.faults(latency_ms=1500)
    rid = unique("wal")
    pool, pending = _in_background(
        lambda: w.main.deactivate(unique("st-wal"), {"userId": "u"}, rid=rid))
    try:
        w.kore.wait_call(rid)
        events = [r["event"] for r in w.main.records_for(rid, terminal=False)]
        assert events == ["deactivate.requested"], events
        assert pending.result(timeout=20).status == 200
    finally:
        pool.shutdown(wait=True)


def test_audit_records_of_a_success(w: World) -> None:
    """§3 fields: requested (who, what, which app) then completed with the result."""
    rid, bot = unique("fields"), unique("st-fields")
    assert w.main.deactivate(bot, {"userId": "u-f", "channel": "web"}, rid=rid).status == 200
    requested, completed = w.main.records_for(rid)
    for record in (requested, completed):
        assert TS_RE.fullmatch(record["ts"]), record["ts"]
        assert (record["requestId"], record["caller"], record["botId"], record["userId"],
                record["channel"], record["app"]) == (rid, "crm-service", bot, "u-f", "web",
                                                      "sessions")
        assert isinstance(record["route"], str) and record["route"]
    assert requested["event"] == "deactivate.requested"
    assert completed["event"] == "deactivate.completed"
    assert completed["seq"] > requested["seq"]
    assert (completed["outcome"], completed["status"], completed["upstreamStatus"],
            completed["attempts"]) == ("success", 200, 200, 1)
    assert isinstance(completed["durationMs"], int | float) and completed["durationMs"] >= 0
    assert completed.get("error") is None


HOSTILE_VALUES: list[dict[str, Any]] = [
    {"botId": "st-hv-1", "userId": "nul\x00del\x7fnel\x85end"},
    {"botId": "st-hv-2", "userId": "ls\u2028ps\u2029end", "channel": "tab\tchan"},
    {"botId": "st-hv-3", "userId": 1.5},
    {"botId": "st-hv-4", "userId": 10**30},
    {"botId": {"nested": [1, 2, {"deep": None}]}, "userId": "u"},
    {"botId": "st-hv-5", "userId": "\ud800 lone surrogate"},
    {"botId": "st-hv-6", "userId": "x" * 300},
    {"botId": "st-hv-7", "userId": "quote\" back\\slash </script> \u00e9\u0301",
     "channel": "NOT VALID"},
    {"botId": "st-hv-8", "userId": True},
    {"botId": "st-hv-9", "userId": "u", "channel": ["list"]},
]


def test_audit_chain_holds_for_hostile_values(w: World) -> None:
    """§3: the chain formula holds, recomputed independently, for records that carry hostile
    values (refused batch items are audited with what was asked)."""
    rid = unique("hostile-values")
    raw = json.dumps({"items": HOSTILE_VALUES}).encode()  # lone surrogate as a JSON escape
    reply = w.main.batch(None, raw=raw, rid=rid)
    assert reply.status == 200, reply.text
    assert reply.json()["summary"] == {"succeeded": 0, "failed": len(HOSTILE_VALUES)}
    for index in range(len(HOSTILE_VALUES)):
        for record in w.main.records_for(f"{rid}.{index}"):
            assert record["hash"] == chain_hash(record), record
    text = w.main.audit_path.read_bytes().decode("utf-8")  # still strict UTF-8
    assert all(json.loads(line) for line in text.split("\n") if line)


def test_audit_route_names_the_route(w: World) -> None:
    """§3: `route` tells through which route a request came (three routes, three values)."""
    rid = unique("routes")
    assert w.main.deactivate(unique("st-r"), {"userId": "u"}, rid=rid + "-s").status == 200
    assert w.main.kore(unique("st-r"), {"userId": "u"}, rid=rid + "-k").status == 200
    assert w.main.batch({"items": [{"botId": unique("st-r"), "userId": "u"}]},
                        rid=rid + "-b").status == 200
    routes = {terminal(w.main.records_for(x))["route"]
              for x in (rid + "-s", rid + "-k", rid + "-b.0")}
    assert len(routes) == 3, routes


def test_hash_user_ids_replaces_user_id_with_its_sha256(w: World) -> None:
    """§3: with `audit.hash_user_ids = true`, `userId` is replaced by `userIdHash` =
    `sha256:<hex>` (of the userId's UTF-8), in every record; the userId itself is nowhere."""
    user = unique("secret-user-ü")
    expected = "sha256:" + hashlib.sha256(user.encode("utf-8")).hexdigest()
    ok, bad = unique("hash-ok"), unique("hash-bad")
    assert w.hashed.deactivate(unique("st-hash"), {"userId": user}, rid=ok).status == 200
    reply = w.hashed.batch({"items": [{"botId": unique("st-hash"), "userId": user,
                                       "channel": "B.A.D"}]}, rid=bad)
    assert reply.json()["results"][0]["status"] == 400
    records = w.hashed.records_for(ok) + w.hashed.records_for(f"{bad}.0")
    assert len(records) == 3
    for record in records:
        assert "userId" not in record, record
        assert record["userIdHash"] == expected
        assert re.fullmatch(r"sha256:[0-9a-f]{64}", record["userIdHash"])
    text = "".join(p.read_text(encoding="utf-8") for p in w.hashed.audit_files())
    assert user not in text and json.dumps(user)[1:-1] not in text


# --- additions of 2026-12-03 ------------------------------------------------------------------

def test_every_record_carries_the_client(w: World) -> None:
    """§3 additions: "Every record carries `client`: the peer address"."""
    asked = {"ok": w.main.deactivate(unique("st-who"), {"userId": "u"}, rid=unique("who")),
             "401": w.main.deactivate(unique("st-who"), {"userId": "u"}, key=None,
                                      rid=unique("who")),
             "403": w.main.deactivate(unique("st-who"), {"userId": "u"}, key=NARROW_KEY,
                                      rid=unique("who"))}
    for name, reply in asked.items():
        records = w.main.records_for(reply.header("X-Request-ID") or "")
        assert records and all(r["client"] == "127.0.0.1" for r in records), (name, records)


@pytest.mark.parametrize(("gateway", "client"), [
    pytest.param("main", "127.0.0.1", id="peer-not-trusted"),
    pytest.param("hashed", "203.0.113.9", id="peer-is-a-trusted-proxy"),
])
def test_x_forwarded_for_is_used_only_from_a_trusted_proxy(w: World, gateway: str,
                                                           client: str) -> None:
    """§3 additions / §4 `server.trusted_proxies`: X-Forwarded-For counts only when the peer
    is listed (`hashed` lists 127.0.0.0/8); the right-most address not itself trusted."""
    gw: Gateway = getattr(w, gateway)
    rid = unique("xff")
    reply = gw.deactivate("not-a-bot-id", {"userId": "u"}, rid=rid,
                          extra=[("X-Forwarded-For", "198.51.100.1, 203.0.113.9, 127.0.0.9")])
    expect_error(reply, 400, "invalid_request")
    assert expect_denied(gw, rid, 400, "rejected")["client"] == client


@pytest.mark.parametrize("route", ["simple", "kore"])
def test_forbidden_record_keeps_the_user_id_and_channel_asked(w: World, route: str) -> None:
    """§3 additions: "An authenticated caller refused for a bot (403) still has the `userId`
    and `channel` it sent recorded"."""
    rid, bot = unique("kept"), unique("st-kept")
    body = {"userId": "u-kept", "channel": "ivrVoice"}
    call = w.main.deactivate if route == "simple" else w.main.kore
    expect_error(call(bot, body, rid=rid, key=NARROW_KEY), 403, "forbidden")
    record = expect_denied(w.main, rid, 403, "denied", "forbidden")
    assert (record["botId"], record["userId"], record["channel"]) == (bot, "u-kept", "ivrVoice")


def test_keyless_requests_past_the_budget_are_counted_once_a_second(w: World) -> None:
    """§3 additions: a keyless request gets its own `deactivate.denied` record up to
    `audit.max_unauthenticated_per_s` (`hashed`: 2) a second; the excess is counted into one
    `audit.unauthenticated_suppressed` record a second, `{"count", "clients"}`. Keyed
    requests are audited one by one whatever the budget."""
    before = len(w.hashed.records())
    rids = [unique("keyless") for _ in range(10)]
    for rid in rids:
        expect_error(w.hashed.deactivate(unique("st-kl"), {"userId": "u"}, key=None, rid=rid),
                     401, "unauthenticated")
    keyed = unique("keyed")
    expect_error(w.hashed.deactivate("not-a-bot-id", {"userId": "u"}, rid=keyed), 400)
    time.sleep(1.5)  # a second's summary is written when the second ends
    new = w.hashed.records()[before:]
    own = [r for r in new if r.get("requestId") in rids]
    summaries = [r for r in new if r["event"] == SUPPRESSED]
    assert 2 <= len(own) <= 4, own  # 2 a second; ten quick calls may straddle two seconds
    assert summaries and len(summaries) <= 3
    for summary in summaries:
        _expect_summary(summary)
        assert set(summary["clients"]) == {"127.0.0.1"}
    assert len(own) + sum(s["count"] for s in summaries) == len(rids)
    assert [r["requestId"] for r in new if r.get("caller")] == [keyed]


def test_max_connections_refuses_past_the_limit(w: World, tmp_path: Path) -> None:
    """§4 `server.max_connections`: open client connections per process, beyond it refused
    (a 503 `overloaded` with `Retry-After` when no connection is idle)."""
    gw = start_gateway("two-connections", tmp_path, {
        "server": {"auth": "none", "max_connections": 2},
        "upstream": {"base_url": w.kore.url, "allow_insecure_http": True},
        "audit": {"path": str(tmp_path / "audit" / "two.jsonl")},
        "apps": [app_table("sessions", ["*"], client_secret=SECRET_SESSIONS)]}, key=None)
    try:
        gw.process.wait_http(gw.host, gw.port)
        w.kore.faults(latency_ms=2000)
        pool = ThreadPoolExecutor(max_workers=2)
        busy = [pool.submit(gw.deactivate, unique("st-cap"), {"userId": "u"}, rid=rid)
                for rid in (unique("cap"), unique("cap"))]
        for future in busy:
            assert not future.done()
        time.sleep(0.5)
        refused = gw.call("GET", "/healthz")
        expect_error(refused, 503, "overloaded")
        expect_retry_after(refused)
        assert [f.result(timeout=20).status for f in busy] == [200, 200]
        pool.shutdown()
        assert gw.call("GET", "/healthz").status == 200
    finally:
        w.kore.reset()
        assert gw.process.stop() == 0


def test_rotation_continues_the_chain_in_the_next_file(w: World) -> None:
    """§3: past `audit.max_bytes` the log rotates and the chain continues: the first record
    of a new file has `prev` = the last `hash` of the previous file (`local`: 2048 bytes);
    `audit verify` accepts the files in order and refuses them out of order."""
    for _ in range(8):
        assert w.local.deactivate(unique("st-rot"), {"userId": "u"}).status == 200
    files = w.local.audit_files()
    assert len(files) >= 2, files
    previous_hash = None
    for path in files:
        records = read_jsonl(path)
        assert records
        if previous_hash is not None:
            assert records[0]["prev"] == previous_hash, path
        previous_hash = records[-1]["hash"]
    good = run_cli(["audit", "verify", *map(str, files)])
    assert good.returncode == 0, good.stdout + good.stderr
    bad = run_cli(["audit", "verify", *map(str, reversed(files))])
    assert bad.returncode != 0


def hmac_hash(record: Mapping[str, Any], key: str = CHAIN_KEY) -> str:
    """§3 (2026-12-03), independently: HMAC-SHA256(key, prev + canonical) in hex."""
    body = {k: v for k, v in record.items() if k != "hash"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    data = (record["prev"] + canonical).encode("utf-8")
    return hmac.new(key.encode("utf-8"), data, hashlib.sha256).hexdigest()


def anchors_in(text: str) -> list[dict[str, Any]]:
    """The `audit.anchor` entries of a structured log (JSON lines; others ignored)."""
    found = []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("event") == "audit.anchor":
            found.append(entry)
    return found


@pytest.fixture(scope="module")
def keyed(world: World) -> Iterator[Gateway]:
    """A gateway with an HMAC chain key (from the environment), anchors every 0.2 s and a
    small `max_bytes` (rotation)."""
    root = world.root / "keyed"
    gw = start_gateway("keyed", root, {
        "upstream": {"base_url": world.kore.url, "allow_insecure_http": True},
        "audit": {"path": str(root / "audit" / "keyed.jsonl"), "max_bytes": 2048,
                  "chain_key_env": ENV_CHAIN, "anchor_every_s": 0.2},
        "logging": {"format": "json"},
        "apps": [app_table("sessions", ["st-*"], client_secret=SECRET_SESSIONS)],
        "callers": [{"name": "crm-service", "key_sha256": hashlib.sha256(
            world.crm_key.encode()).hexdigest(), "bots": ["st-*"]}],
    }, key=world.crm_key, env={ENV_CHAIN: CHAIN_KEY})
    try:
        gw.process.wait_http(gw.host, gw.port)
        for _ in range(10):
            assert gw.deactivate(unique("st-keyed"), {"userId": "u"}).status == 200
        yield gw
    finally:
        gw.process.stop()


def _keyed_files(gw: Gateway) -> list[Path]:
    return [p for p in gw.audit_files() if p.suffix == ".jsonl"]


def test_keyed_chain_is_hmac_and_marks_every_file(keyed: Gateway) -> None:
    """§3 "A rewrite needs a key": with `audit.chain_key_env` the hash is HMAC-SHA256(key,
    prev + canonical) in hex and the first record of every file carries "chain":
    "hmac-sha256" (inside the canonical form); rotation keeps the chain across files."""
    files = _keyed_files(keyed)
    assert len(files) >= 2, files
    prev = ZEROS
    for path in files:
        records = read_jsonl(path)
        assert records[0]["chain"] == HMAC_CHAIN, path
        assert records[0]["prev"] == prev
        for record in records:
            assert record["hash"] == hmac_hash(record), (path, record["seq"])
            assert record["hash"] != chain_hash(record)
            prev = record["hash"]
        assert all("chain" not in r for r in records[1:])
    text = "".join(p.read_text(encoding="utf-8") for p in files) + keyed.process.output()
    assert CHAIN_KEY not in text


def test_audit_verify_checks_the_keyed_chain_with_the_key_only(keyed: Gateway,
                                                              tmp_path: Path) -> None:
    """§3: `audit verify --key-env NAME | --key-file PATH` checks a keyed chain; without the key
    it cannot check the hashes, and says so with a non-zero exit, never "intact"."""
    files = list(map(str, _keyed_files(keyed)))
    key_file = tmp_path / "chain.key"
    key_file.write_text(CHAIN_KEY + "\n", encoding="utf-8")
    by_env = run_cli(["audit", "verify", "--key-env", ENV_CHAIN, *files],
                     env={ENV_CHAIN: CHAIN_KEY})
    assert by_env.returncode == 0, by_env.stdout + by_env.stderr
    by_file = run_cli(["audit", "verify", "--key-file", str(key_file), *files])
    assert by_file.returncode == 0, by_file.stdout + by_file.stderr
    wrong = run_cli(["audit", "verify", "--key-env", ENV_CHAIN, *files],
                    env={ENV_CHAIN: "not-the-key"})
    assert wrong.returncode != 0
    keyless = run_cli(["audit", "verify", *files])
    assert keyless.returncode != 0 and "intact" not in keyless.stdout + keyless.stderr
    for done in (by_env, by_file, wrong, keyless):
        assert CHAIN_KEY not in done.stdout + done.stderr


def test_anchors_are_logged_and_a_rewrite_fails_against_them(keyed: Gateway,
                                                            tmp_path: Path) -> None:
    """§3: every `anchor_every_s` the gateway logs `audit.anchor {"file", "seq", "hash"}`;
    `audit verify --anchors LOGFILE…` fails when the file disagrees with a shipped anchor: a
    full rewrite (record 1's userId and caller, every plain hash recomputed, the last record
    dropped) fails with the key, and against the anchors without it."""
    files = _keyed_files(keyed)
    last = read_jsonl(files[-1])[-1]
    deadline = time.monotonic() + 10
    while not any(a["seq"] == last["seq"] for a in anchors_in(keyed.process.output())):
        assert time.monotonic() < deadline, "no anchor of the last record"
        time.sleep(0.05)
    found = anchors_in(keyed.process.output())
    assert all(set(a) >= {"file", "seq", "hash"} for a in found)
    assert {a["file"] for a in found} == {str(keyed.audit_path)}
    [newest] = [a for a in found if a["seq"] == last["seq"]][:1]
    assert newest["hash"] == last["hash"]
    shipped = tmp_path / "shipped.log"
    shipped.write_text(keyed.process.output(), encoding="utf-8")
    good = run_cli(["audit", "verify", "--key-env", ENV_CHAIN, *map(str, files),
                    "--anchors", str(shipped)], env={ENV_CHAIN: CHAIN_KEY})
    assert good.returncode == 0, good.stdout + good.stderr

    forged_dir = tmp_path / "forged"
    forged_dir.mkdir()
    records = [r for path in files for r in read_jsonl(path)][:-1]
    records[0]["userId"], records[0]["caller"] = "someone-else", "narrow-service"
    records[0].pop("chain")
    _rechain(records)
    forged = forged_dir / keyed.audit_path.name
    forged.write_text(_lines(records), encoding="utf-8")
    with_key = run_cli(["audit", "verify", "--key-env", ENV_CHAIN, str(forged)],
                       env={ENV_CHAIN: CHAIN_KEY})
    assert with_key.returncode != 0, with_key.stdout + with_key.stderr
    against_anchors = run_cli(["audit", "verify", str(forged), "--anchors", str(shipped)])
    assert against_anchors.returncode != 0, against_anchors.stdout + against_anchors.stderr


def test_an_anchor_is_logged_at_shutdown(world: World) -> None:
    """§3: "… and at shutdown": the last record is anchored when the gateway stops."""
    root = world.root / "anchor-at-stop"
    gw = start_gateway("anchor-at-stop", root, {
        "server": {"auth": "none"},
        "upstream": {"base_url": world.kore.url, "allow_insecure_http": True},
        "audit": {"path": str(root / "audit" / "stop.jsonl"), "anchor_every_s": 3600},
        "logging": {"format": "json"},
        "apps": [app_table("sessions", ["st-*"], client_secret=SECRET_SESSIONS)],
    }, key=None)
    try:
        gw.process.wait_http(gw.host, gw.port)
        for _ in range(2):
            assert gw.deactivate(unique("st-stop"), {"userId": "u"}).status == 200
        assert anchors_in(gw.process.output()) == []
    finally:
        assert gw.process.stop() == 0
    [anchor] = anchors_in(gw.process.log_path.read_text(encoding="utf-8"))
    last = read_jsonl(gw.audit_path)[-1]
    assert (anchor["file"], anchor["seq"], anchor["hash"]) == (
        str(gw.audit_path), last["seq"], last["hash"])


LINE_BREAKING = "a\u2028b\u2029c\u202ad\u202be\u202cf\u202dg\u202eh\u2066i\u2067j\u2068k\u2069l"


def test_audit_line_escapes_unicode_line_breaks_and_bidi_controls(w: World) -> None:
    """§3 "One record, one line, for every reader": U+2028, U+2029 and the bidi controls are
    written as \\uXXXX escapes; the canonical form, from the parsed values, is unchanged."""
    rid = unique("one-line")
    reply = w.main.deactivate(unique("st-line"), {"userId": LINE_BREAKING}, rid=rid)
    assert reply.status == 200, reply.text
    records = w.main.records_for(rid)
    assert [r["userId"] for r in records] == [LINE_BREAKING] * 2
    for record in records:
        assert record["hash"] == chain_hash(record)
    raw = w.main.audit_path.read_bytes()
    for char in LINE_BREAKING[1::2]:
        assert char.encode("utf-8") not in raw, f"U+{ord(char):04X} written raw"
        assert f"\\u{ord(char):04x}".encode() in raw.lower()
    text = raw.decode("utf-8")
    assert len(text.splitlines()) == len(text.split("\n")) - 1


def _rechain(records: list[dict[str, Any]], start: int = 0) -> None:
    """Recomputes `prev`/`hash` from `start` on, as a careful forger would."""
    prev = records[start - 1]["hash"] if start else ZEROS
    for record in records[start:]:
        record["prev"] = prev
        record["hash"] = chain_hash(record)
        prev = record["hash"]


def chain_hash(record: Mapping[str, Any]) -> str:
    """§3, independently: sha256((prev + canonical).encode()) with canonical =
    json.dumps(record_without_hash, sort_keys=True, separators=(",", ":"), ensure_ascii=False)."""
    body = {k: v for k, v in record.items() if k != "hash"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256((record["prev"] + canonical).encode("utf-8")).hexdigest()


def _lines(records: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def _tamper_edit(records: list[dict[str, Any]]) -> str:
    records[2]["userId"] = "someone-else"
    return _lines(records)


def _tamper_edit_and_rehash(records: list[dict[str, Any]]) -> str:
    records[2]["userId"] = "someone-else"
    records[2]["hash"] = chain_hash(records[2])
    return _lines(records)


def _tamper_delete(records: list[dict[str, Any]]) -> str:
    return _lines(records[:2] + records[3:])


def _tamper_swap(records: list[dict[str, Any]]) -> str:
    return _lines(records[:2] + [records[3], records[2]] + records[4:])


def _tamper_duplicate(records: list[dict[str, Any]]) -> str:
    return _lines(records[:3] + [records[2]] + records[3:])


def _tamper_seq_rechained(records: list[dict[str, Any]]) -> str:
    for record in records[2:]:
        record["seq"] += 1  # a gap, with every hash and prev recomputed
    _rechain(records, 2)
    return _lines(records)


def _tamper_first_prev(records: list[dict[str, Any]]) -> str:
    records[0]["prev"] = "f" * 64
    records[0]["hash"] = chain_hash(records[0])
    _rechain(records, 1)
    return _lines(records)


TAMPERING = [
    pytest.param(_tamper_edit, 3, id="field-edited"),
    pytest.param(_tamper_edit_and_rehash, 4, id="field-edited-hash-recomputed"),
    pytest.param(_tamper_delete, 3, id="line-deleted"),
    pytest.param(_tamper_swap, 3, id="lines-swapped"),
    pytest.param(_tamper_duplicate, 4, id="line-replayed"),
    pytest.param(_tamper_seq_rechained, 3, id="seq-gap-with-valid-hashes"),
    pytest.param(_tamper_first_prev, 1, id="first-prev-not-zeros"),
]


@pytest.fixture(scope="module")
def tampered(world: World, tmp_path_factory: pytest.TempPathFactory
             ) -> dict[str, Future[subprocess.CompletedProcess[str]]]:
    """Six real records of `main`, forged every way in TAMPERING, verified concurrently."""
    while len(read_jsonl(world.main.audit_path)) < 6:
        assert world.main.deactivate(unique("st-tamper"), {"userId": "u"}).status == 200
    records = read_jsonl(world.main.audit_path)[:6]
    root = tmp_path_factory.mktemp("tampered")
    pool = ThreadPoolExecutor(max_workers=3)
    runs = {}
    for case in TAMPERING:
        tamper: Callable[[list[dict[str, Any]]], str] = case.values[0]  # type: ignore[assignment]
        path = root / f"{case.id}.jsonl"
        path.write_text(tamper([dict(r) for r in records]), encoding="utf-8")
        runs[str(case.id)] = pool.submit(run_cli, ["audit", "verify", str(path)])
    pool.shutdown(wait=False)
    return runs


@pytest.mark.parametrize(("tamper", "line"), TAMPERING)
def test_audit_verify_names_the_first_break(
        tampered: dict[str, Future[subprocess.CompletedProcess[str]]],
        request: pytest.FixtureRequest, tamper: Any, line: int) -> None:
    """§3: `audit verify` checks the chain and the `seq` order, prints the first break and
    exits non-zero on any break."""
    case_id = request.node.callspec.id
    done = tampered[case_id].result(timeout=60)
    out = done.stdout + done.stderr
    assert done.returncode != 0, out
    assert re.search(rf"(?:line\s*{line}\b|:{line}\b)", out), out


def test_audit_verify_missing_file_is_an_error(cli: CliRuns) -> None:
    """§5: `audit verify` exits non-zero when it cannot check (no such file)."""
    done = cli.result("verify-missing-file")
    assert done.returncode != 0
    assert "Traceback" not in done.stdout + done.stderr


# =========================================================================================
# 4. Configuration
# =========================================================================================

@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CONFIG_CASES])
def test_config_rule(cli: CliRuns, case: ConfigCase) -> None:
    """§4 (ids name the rule): accepted configs exit 0; refused ones exit non-zero with an
    error naming the key and the file, never a traceback, never a secret value."""
    done = cli.result(case.id)
    out = done.stdout + done.stderr
    assert done.returncode != -999, f"{case.command} did not exit: {out[-2000:]}"
    assert "Traceback" not in out, out
    for value in case.forbidden:
        assert value not in out
    if case.ok:
        assert done.returncode == 0, out
        return
    assert done.returncode != 0, out
    path = cli.config_paths[case.id]
    if case.names_config_file:
        assert str(path) in out, f"the file is not named: {out}"
    for name in case.names:
        assert name in out, f"{name!r} not named: {out}"


def test_relative_paths_are_resolved_against_the_config_files_directory(w: World) -> None:
    """§4: relative paths (`audit.path`, `*_file`) are resolved against the config file's
    directory, not the working directory (`main` runs in the repository)."""
    assert w.main.audit_path == w.main.root / "audit" / "main.jsonl"
    assert read_jsonl(w.main.audit_path), "no audit records beside the config file"
    assert not (REPO / "audit" / "main.jsonl").exists()
    # keys/rs256.pem and secrets/sessions.secret are relative too: they signed real calls
    rid = unique("relative")
    assert w.main.deactivate("st-rs256-rel", {"userId": "u"}, rid=rid).status == 200
    assert verify_token(w, w.kore.calls_for(rid)[0]["headers"]["auth"])[0]["alg"] == "RS256"


def test_check_config_accepts_a_valid_file_and_prints_no_secret(world: World) -> None:
    """§5: `check-config` validates a config and exits (0); it never prints a secret."""
    done = world.cli.result("check-config-main")
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    for value in world.secrets():
        assert value not in out


# =========================================================================================
# 5. Commands
# =========================================================================================

def test_hash_key_prints_a_new_key_and_its_config_line(world: World) -> None:
    """§5: `hash-key` prints a new random caller key and the `key_sha256` line for the
    config; the line is valid TOML, its digest is sha256(key), and the gateway accepts the key
    (`main`'s caller was configured from such a line)."""
    key, digest, line = hash_key_run()
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert hashlib.sha256(key.encode()).hexdigest() == digest
    assert tomllib.loads(line) == {"key_sha256": digest}
    assert key != world.crm_key
    assert world.main.deactivate(unique("st-hk"), {"userId": "u"}, key=world.crm_key).status \
        == 200


def test_serve_with_workers(world: World, tmp_path: Path) -> None:
    """§5: `serve [--config PATH] [--workers N]` runs the gateway (N processes, one port);
    without --config it reads GATEWAY_CONFIG (§4)."""
    world.kore.reset()
    gw = start_gateway("workers", tmp_path, {
        "server": {"auth": "none"},
        "upstream": {"base_url": world.kore.url, "allow_insecure_http": True},
        "audit": {"path": str(tmp_path / "audit" / "workers.jsonl")},
        "apps": [app_table("sessions", ["*"], client_secret=SECRET_SESSIONS)]}, key=None,
        extra_args=["--workers", "2"], via_env=True)
    try:
        gw.process.wait_http(gw.host, gw.port)
        for _ in range(6):
            assert gw.deactivate(unique("st-wk"), {"userId": "u"}).status == 200
    finally:
        assert gw.process.stop() == 0


def test_demo_prints_a_key_that_closes_a_session(tmp_path: Path) -> None:
    """§5: `demo` runs gateway + sandbox together on loopback with a demo caller key printed,
    so a deactivation works in seconds (ports moved off the defaults for the test run)."""
    port, sandbox_port = free_port(), free_port()
    text = (REPO / "config" / "demo.toml").read_text(encoding="utf-8")
    text = re.sub(r'(?m)^listen = ".*"', f'listen = "127.0.0.1:{port}"', text)
    text = re.sub(r'(?m)^path = ".*"', f'path = "{tmp_path / "demo.jsonl"}"', text)
    config = tmp_path / "demo.toml"
    config.write_text(text, encoding="utf-8")
    proc = subprocess.Popen([str(KORE_GATEWAY), "demo", "--config", str(config),
                             "--sandbox-port", str(sandbox_port)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    stdout = proc.stdout
    assert stdout is not None
    reader = threading.Thread(target=lambda: lines.extend(iter(stdout.readline, "")),
                              daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        found = None
        while time.monotonic() < deadline and proc.poll() is None:
            found = re.search(r"http://127\.0\.0\.1:(\d+)(/v1/bots/[^/\s]+/sessions/deactivate)"
                              r".*Bearer ([^'\"\s]+)", "".join(lines))
            if found:
                break
            time.sleep(0.05)
        assert found, "".join(lines)
        reply = http(int(found[1]), "POST", found[2], body=b'{"userId": "u-1001"}', headers={
            "Authorization": f"Bearer {found[3]}", "Content-Type": "application/json"})
        assert reply.status == 200, reply.text
        assert reply.json()["success"] is True
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# --- the sandbox: "verifies the JWT exactly as Kore.ai would" ---------------------------------

SANDBOX_PATH = "/api/public/bot/st-sbx/session"


def _expired() -> str:
    now = int(time.time())
    return jwt.encode({"appId": CID["sessions"], "sub": "t", "iat": now - 600, "exp": now - 60},
                      SECRET_SESSIONS, algorithm="HS256")


SANDBOX_TOKENS = [
    pytest.param(lambda: None, 401, id="no-auth-header"),
    pytest.param(lambda: mint(secret="not-the-secret-" + "x" * 32), 401, id="bad-signature"),
    pytest.param(lambda: jwt.encode({"appId": "cs-unknown", "sub": "t",
                                     "iat": int(time.time()), "exp": int(time.time()) + 60},
                                    SECRET_SESSIONS, algorithm="HS256"), 401, id="unknown-appId"),
    pytest.param(_expired, 401, id="expired"),
    pytest.param(lambda: jwt.encode({"appId": CID["sessions"], "sub": "t",
                                     "iat": int(time.time()), "exp": int(time.time()) + 60},
                                    SECRET_SESSIONS, algorithm="HS512"), 401, id="wrong-algorithm"),
    pytest.param(lambda: mint(), 200, id="valid"),
]


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
@pytest.mark.parametrize(("token", "status"), SANDBOX_TOKENS)
def test_sandbox_verifies_the_jwt(w: World, token: Callable[[], str | None],
                                  status: int) -> None:
    """§5 sandbox: verifies the JWT as Kore.ai would (signature, appId, exp)."""
    reply = w.kore.put(SANDBOX_PATH, token(), {"userId": "u", "status": "inactive"})
    assert reply.status == status, reply.text
    if status == 200:
        assert reply.json() == {"success": True}


@pytest.mark.parametrize(("path", "body", "status"), [
    pytest.param("/api/public/bot/st-sbx/sessionz", {"userId": "u"}, 404, id="wrong-path"),
    pytest.param(SANDBOX_PATH, {"userId": "u", "status": "active"}, 400, id="bad-status"),
    pytest.param(SANDBOX_PATH, {"userId": "u", "other": 1}, 400, id="unknown-field"),
    pytest.param(SANDBOX_PATH, ["u"], 400, id="not-an-object"),
])
def test_sandbox_checks_path_and_body(w: World, path: str, body: Any, status: int) -> None:
    """§5 sandbox: checks path and body."""
    assert w.kore.put(path, mint(), body).status == status


def test_sandbox_injects_faults(w: World) -> None:
    """§5 sandbox: can inject faults — latency, errors, 429 with Retry-After, dropped
    connections."""
    w.kore.faults(latency_ms=300)
    started = time.monotonic()
    assert w.kore.put(SANDBOX_PATH, mint(), {"userId": "u"}).status == 200
    assert time.monotonic() - started >= 0.3
    w.kore.faults(latency_ms=0, fail_first=1, error_status=503)
    assert w.kore.put(SANDBOX_PATH, mint(), {"userId": "u"}).status == 503
    assert w.kore.put(SANDBOX_PATH, mint(), {"userId": "u"}).status == 200
    w.kore.faults(rate_429=1.0, retry_after_s=7)
    limited = w.kore.put(SANDBOX_PATH, mint(), {"userId": "u"})
    assert limited.status == 429 and limited.header("Retry-After") == "7"
    w.kore.faults(rate_429=0, drop_rate=1.0)
    with pytest.raises((http_client.RemoteDisconnected, ConnectionError)):
        w.kore.put(SANDBOX_PATH, mint(), {"userId": "u"})


def test_sandbox_enforce_jti_refuses_replay(tmp_path: Path) -> None:
    """§5 sandbox: verifies `jti` replay (as Kore.ai's "Enforce JTI")."""
    port = free_port()
    proc = Process("sandbox-jti", ["sandbox", "--listen", f"127.0.0.1:{port}", "--enforce-jti",
                                   "--client-id", CID["sessions"],
                                   "--client-secret-env", "KGW_SBX_SECRET"], tmp_path,
                   {"KGW_SBX_SECRET": SECRET_SESSIONS})
    try:
        proc.wait_http("127.0.0.1", port)
        kore = Kore(port)
        token = mint(jti=uuid.uuid4().hex)
        assert kore.put(SANDBOX_PATH, token, {"userId": "u"}).status == 200
        assert kore.put(SANDBOX_PATH, token, {"userId": "u"}).status == 401
        assert kore.put(SANDBOX_PATH, mint(), {"userId": "u"}).status == 401  # no jti
    finally:
        proc.stop()


# =========================================================================================
# Sweeps over everything the module's gateways did (they run last)
# =========================================================================================

def _status_outcome(status: int) -> str:
    if status == 200:
        return "success"
    if status in (401, 403):
        return "denied"
    if status in (400, 404, 413, 415):
        return "rejected"
    return "failed"


@pytest.fixture(scope="module")
def final_verify(world: World) -> dict[str, Future[subprocess.CompletedProcess[str]]]:
    """`audit verify` of every gateway's files, run concurrently once the other tests are done."""
    pool = ThreadPoolExecutor(max_workers=3)
    runs = {gw.name: pool.submit(run_cli, ["audit", "verify", *map(str, gw.audit_files())])
            for gw in world.gateways}
    pool.shutdown(wait=False)
    return runs


@pytest.mark.parametrize("name", ["main", "local", "hashed"])
def test_zz_audit_files_follow_the_contract(
        world: World, final_verify: dict[str, Future[subprocess.CompletedProcess[str]]],
        name: str) -> None:
    """§3 over every record written in this module: JSON Lines in UTF-8; `ts` RFC 3339 UTC
    with microseconds and Z; `seq` 1, 2, 3 … with no gaps (across rotation); the chain
    recomputed independently; one terminal record per request (requested → completed, or
    denied alone); `outcome` as the table says for the status; no JWT, secret or key."""
    gw: Gateway = getattr(world, name)
    files = gw.audit_files()
    records: list[dict[str, Any]] = []
    prev = ZEROS
    for path in files:
        raw = path.read_bytes()
        assert raw.endswith(b"\n") or not raw, path
        text = raw.decode("utf-8")
        assert not JWT_RE.search(text), path
        for value in world.secrets():
            assert value not in text, (path, "a secret is in the audit")
        for line in text.split("\n")[:-1]:
            record = json.loads(line)
            assert isinstance(record, dict)
            assert record["prev"] == prev, (path, record["seq"])
            assert record["hash"] == chain_hash(record), (path, record["seq"])
            prev = record["hash"]
            records.append(record)
    if not records:
        pytest.skip(f"{name} wrote no records (run alone)")
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    now = dt.datetime.now(dt.UTC)
    by_request: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        assert TS_RE.fullmatch(record["ts"]), record["ts"]
        when = dt.datetime.strptime(record["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC)
        assert abs((now - when).total_seconds()) < 3600
        assert "client" in record, record  # §3 additions: who knocked, in every record
        if record["event"] == SUPPRESSED:
            _expect_summary(record)
            continue
        assert record["event"] in EVENTS, record
        assert isinstance(record["client"], str) and record["client"], record
        for key in ("requestId", "caller", "route", "botId", "channel"):
            assert key in record, (key, record)
        assert ("userIdHash" in record) if name == "hashed" else ("userId" in record), record
        if record["event"] != "deactivate.denied":
            assert isinstance(record["app"], str) and record["app"], record
        if record["event"] != "deactivate.requested":
            for key in ("outcome", "status", "upstreamStatus", "attempts", "durationMs",
                        "error"):
                assert key in record, (key, record)
            assert record["outcome"] == _status_outcome(record["status"]), record
        by_request.setdefault(record["requestId"], []).append(record)
    for rid, group in by_request.items():
        events = [r["event"] for r in group]
        assert events in (["deactivate.requested", "deactivate.completed"],
                          ["deactivate.denied"]), (rid, events)
    done = final_verify[name].result(timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def _expect_summary(record: dict[str, Any]) -> None:
    """§3 additions: `{"count", "clients": {address: count}}`, the top 10 addresses."""
    assert isinstance(record["count"], int) and record["count"] > 0, record
    clients = record["clients"]
    assert isinstance(clients, dict) and 1 <= len(clients) <= 10, record
    assert all(isinstance(n, int) and n > 0 for n in clients.values()), record
    assert sum(clients.values()) <= record["count"], record


def test_zz_no_secret_in_any_answer_or_log(world: World) -> None:
    """§1: the secret, the private key and the JWT are never logged, never returned; the
    caller's key neither."""
    answers = "\n".join(r.text + json.dumps(r.headers) for r in TRANSCRIPT)
    logs = {gw.name: gw.process.output() for gw in world.gateways}
    for value in world.secrets():
        assert value not in answers, "a secret in an answer"
        for name, text in logs.items():
            assert value not in text, f"a secret in the {name} log"
    assert not JWT_RE.search(answers)
    for name, text in logs.items():
        assert not JWT_RE.search(text), f"a JWT in the {name} log"
    tokens = {c["headers"].get("auth") for c in world.kore.calls()} - {None}
    for token in tokens:
        assert token not in answers
        assert all(token not in text for text in logs.values())


def test_zz_every_answer_carried_a_request_id() -> None:
    """§2: every response carries X-Request-ID (all answers of this module)."""
    assert TRANSCRIPT
    for reply in TRANSCRIPT:
        rid = reply.header("X-Request-ID")
        assert rid is not None and REQUEST_ID_RE.fullmatch(rid), (reply.status, reply.headers)
