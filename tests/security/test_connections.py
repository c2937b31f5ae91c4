"""Connections are bounded (issue 11, finding 2): clients that never read, idle connections,
too many connections, and a process out of file descriptors."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.audit.log import rotated_files, verify_files
from tests.conftest import BOT
from tests.integration.sides import set_faults
from tests.integration.test_crash import REPO
from tests.security.served import (
    Served,
    client_address,
    keyed_call,
    open_from,
    raise_fd_limit,
    read_answer,
)

MiB = 1024 * 1024
DEPTH = 20  # requests pipelined by each connection that never reads
PAD = "".join(f"X-Pad-{i}: {'v' * 500}\r\n" for i in range(25))  # a 13 KB head, within limits


def keyless_pipeline(count: int) -> bytes:
    body = b'{"userId":"u-never-reads"}'
    request = (f"POST /v1/bots/{BOT}/sessions/deactivate HTTP/1.1\r\nHost: gw\r\n{PAD}"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
               ).encode() + body
    return request * count


def pipelined(path: str, count: int, pad: str = PAD) -> bytes:
    request = f"GET {path} HTTP/1.1\r\nHost: gw\r\n{pad}\r\n".encode()
    return request * count


class TestClientsThatNeverRead:
    async def test_a_thousand_pin_little_memory_and_a_keyed_caller_is_served(
            self, sandbox: Any, tmp_path: Path) -> None:
        """1,000 connections from 20 addresses each pipeline 20 keyless deactivations with
        large heads and never read an answer: the gateway's memory grows by at most 64 MiB,
        and a keyed call still gets 200."""
        raise_fd_limit(1400)
        gateway = await Served(tmp_path, sandbox.url).start()
        writers: list[asyncio.StreamWriter] = []
        try:
            async with aiohttp.ClientSession() as session:
                assert await keyed_call(session, gateway.url) == 200  # warm
                async with session.get(gateway.url + "/openapi.json") as resp:
                    await resp.read()
            await asyncio.sleep(0.5)
            before = gateway.rss_bytes()
            for n in range(1000):
                _, writer = await open_from(client_address(n % 20), gateway.port)
                writer.write(keyless_pipeline(DEPTH))
                writers.append(writer)
            await asyncio.sleep(4)
            grown = gateway.rss_bytes() - before
            held = await gateway.metric("kore_gateway_connections ")
            async with aiohttp.ClientSession() as session:
                status = await keyed_call(session, gateway.url)
        finally:
            for writer in writers:
                writer.transport.abort()
            gateway.stop()
        print(f"RSS grew {grown / MiB:.1f} MiB; {held:.0f} connections still open")
        assert grown <= 64 * MiB
        assert status == 200

    async def test_a_reader_that_stops_reading_is_cut_off(self, sandbox: Any,
                                                         tmp_path: Path) -> None:
        """server.write_timeout_s: an answer that does not move for that long ends the
        connection, instead of holding its buffers for ever."""
        gateway = await Served(tmp_path, sandbox.url, server={"write_timeout_s": 1}).start()
        try:
            sock = socket.create_connection(("127.0.0.1", gateway.port))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(pipelined("/openapi.json", 200, pad=""))
            await asyncio.sleep(5)
            cut = await asyncio.to_thread(closed_within, sock, 10.0)
            timeouts = await gateway.metric(
                'kore_gateway_connections_closed_total{reason="write_timeout"}')
        finally:
            gateway.stop()
        assert cut, "the connection was still open"
        assert timeouts == 1

    async def test_pipelined_requests_are_all_answered_in_order(self, sandbox: Any,
                                                                 tmp_path: Path) -> None:
        """Bounding the queue behind a request slows a pipeline down, never breaks it."""
        gateway = await Served(tmp_path, sandbox.url).start()
        try:
            reader, writer = await open_from(client_address(0), gateway.port)
            writer.write(pipelined("/healthz", 6) + pipelined("/nowhere", 1) +
                         pipelined("/openapi.json", 3))
            answers = [await asyncio.wait_for(read_answer(reader), 10) for _ in range(10)]
            writer.close()
        finally:
            gateway.stop()
        assert [status for status, _, _ in answers] == [200] * 6 + [404] + [200] * 3

    async def test_an_idle_keep_alive_connection_is_closed(self, sandbox: Any,
                                                           tmp_path: Path) -> None:
        gateway = await Served(tmp_path, sandbox.url, server={"keepalive_timeout_s": 1}).start()
        try:
            reader, writer = await open_from(client_address(0), gateway.port)
            writer.write(pipelined("/healthz", 1, pad=""))
            status, _, _ = await read_answer(reader)
            started = time.monotonic()
            assert await asyncio.wait_for(reader.read(), 10) == b""
            idle = time.monotonic() - started
            writer.close()
        finally:
            gateway.stop()
        assert status == 200 and 0.5 <= idle <= 6


class TestHeadLimit:
    """server.max_head_bytes: a whole head larger than it is refused with 431, however it
    arrives, before it is parsed into several times its size."""

    BIG = "".join(f"X-Pad-{i}: {'v' * 7000}\r\n" for i in range(3))  # 21 KB > 16 KiB

    async def test_a_large_head_in_pieces_or_behind_another_request_is_refused(
            self, sandbox: Any, tmp_path: Path) -> None:
        gateway = await Served(tmp_path, sandbox.url).start()
        try:
            reader, writer = await open_from(client_address(0), gateway.port)
            head = b"GET /healthz HTTP/1.1\r\nHost: gw\r\n" + self.BIG.encode() + b"\r\n"
            trickled = await trickle(reader, writer, head)
            reader, writer = await open_from(client_address(0), gateway.port)
            writer.write(pipelined("/healthz", 1, pad="") + pipelined("/healthz", 1, self.BIG))
            first, _, _ = await asyncio.wait_for(read_answer(reader), 10)
            second, _, body = await asyncio.wait_for(read_answer(reader), 10)
            writer.close()
            refused = await gateway.metric(
                'kore_gateway_connections_closed_total{reason="head_too_large"}')
        finally:
            gateway.stop()
        assert trickled == 431  # read in full, though the client was still sending
        assert (first, second) == (200, 431) and b"server.max_head_bytes" in body
        assert refused == 2

    async def test_a_request_line_too_long_is_answered_while_it_is_still_arriving(
            self, sandbox: Any, tmp_path: Path) -> None:
        """aiohttp's parser refuses the line at `server.max_header_bytes`; the rest of it is
        read and dropped (lingering), so the 400 is not lost to a reset."""
        gateway = await Served(tmp_path, sandbox.url).start()
        try:
            reader, writer = await open_from(client_address(0), gateway.port)
            line = b"GET /healthz?pad=" + b"p" * 40_000 + b" HTTP/1.1\r\nHost: gw\r\n\r\n"
            trickled = await trickle(reader, writer, line)
        finally:
            gateway.stop()
        assert trickled == 400


async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes
                  ) -> int:
    """Sends `data` in 1000-byte pieces until the gateway hangs up; the status it answered
    (0 when the connection was reset first), after checking that it did hang up."""
    try:
        for start in range(0, len(data), 1000):
            writer.write(data[start:start + 1000])
            await writer.drain()
            await asyncio.sleep(0.005)
    except ConnectionError:
        pass
    try:
        status, _, _ = await asyncio.wait_for(read_answer(reader), 10)
        assert await asyncio.wait_for(reader.read(), 10) == b""
    except (ConnectionError, asyncio.IncompleteReadError):
        status = 0
    writer.close()
    return status


def closed_within(sock: socket.socket, limit_s: float) -> bool:
    """Reads (and drops) until the peer closes or resets: True if that happens in time."""
    sock.settimeout(1.0)
    deadline = time.monotonic() + limit_s
    try:
        while time.monotonic() < deadline:
            try:
                if not sock.recv(1 << 20):
                    return True
            except TimeoutError:
                continue
    except ConnectionError:
        return True
    finally:
        sock.close()
    return False


async def hold_busy(gateway: Served, address: str, count: int
                    ) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """`count` connections from `address`, each with a keyed call waiting on a slow Kore.ai."""
    body = b'{"userId":"u-busy"}'
    request = (f"POST /v1/bots/{BOT}/sessions/deactivate HTTP/1.1\r\nHost: gw\r\n"
               "Authorization: Bearer kgw_test_caller_key\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    held = []
    for _ in range(count):
        reader, writer = await open_from(address, gateway.port)
        writer.write(request)
        held.append((reader, writer))
    await asyncio.sleep(0.5)
    return held


async def knock(gateway: Served, address: str) -> int:
    """A new connection from `address` asking for /healthz: the status it gets (0: none)."""
    try:
        reader, writer = await open_from(address, gateway.port)
        writer.write(pipelined("/healthz", 1, pad=""))
        status, headers, body = await asyncio.wait_for(read_answer(reader), 10)
        writer.close()
    except (ConnectionError, asyncio.IncompleteReadError):
        return 0
    if status == 503:
        assert b'"overloaded"' in body and headers["retry-after"] == "1"
    return status


class TestConnectionLimits:
    async def test_idle_connections_make_room_busy_ones_do_not(self, sandbox: Any,
                                                              tmp_path: Path) -> None:
        """At server.max_connections the longest-idle connection is closed for a new one; when
        every connection is busy, the new one is refused with 503 overloaded."""
        gateway = await Served(tmp_path, sandbox.url, server={"max_connections": 10}).start()
        try:
            idle = []
            for n in range(10):
                reader, writer = await open_from(client_address(n), gateway.port)
                writer.write(pipelined("/healthz", 1, pad=""))
                await read_answer(reader)
                idle.append(writer)
            await asyncio.sleep(1.5)  # idle for longer than gate.QUIET_S
            async with aiohttp.ClientSession() as session:
                assert await keyed_call(session, gateway.url) == 200
            evicted = await gateway.metric(
                'kore_gateway_connections_closed_total{reason="idle_evicted"}')
            set_faults(sandbox, latency_ms=4000)
            busy = await hold_busy(gateway, client_address(20), 10)
            refused = await knock(gateway, client_address(21))
        finally:
            gateway.stop()
        assert evicted >= 1
        assert refused == 503
        assert len(busy) == 10

    async def test_one_address_is_capped_unless_it_is_a_trusted_proxy(
            self, sandbox: Any, tmp_path: Path) -> None:
        gateway = await Served(tmp_path, sandbox.url, server={
            "max_connections_per_client": 3, "trusted_proxies": [client_address(1) + "/32"]},
        ).start()
        try:
            set_faults(sandbox, latency_ms=4000)
            held = [*await hold_busy(gateway, client_address(0), 3),
                    *await hold_busy(gateway, client_address(1), 3)]
            over_cap = await knock(gateway, client_address(0))
            other = await knock(gateway, client_address(2))
            proxy = await knock(gateway, client_address(1))
        finally:
            gateway.stop()
        assert (over_cap, other, proxy) == (503, 200, 200)
        assert len(held) == 6


class TestOutOfDescriptors:
    async def test_keyed_calls_and_the_audit_survive_a_descriptor_flood(
            self, sandbox: Any, tmp_path: Path) -> None:
        """RLIMIT_NOFILE = 256 and 400 idle connections: the gateway keeps descriptors for
        itself (fewer connections, idle ones closed for new ones), so keyed calls are served
        and the audit rotates and reopens without a gap."""
        raise_fd_limit(800)
        gateway = await Served(tmp_path, sandbox.url, fd_limit=256,
                               audit={"max_bytes": 4096}).start()
        writers = []
        try:
            for n in range(400):
                try:
                    _, writer = await open_from(client_address(n % 10), gateway.port)
                    writers.append(writer)
                except OSError:
                    pass
            await asyncio.sleep(1.5)
            statuses = []
            async with aiohttp.ClientSession() as session:
                for n in range(30):
                    statuses.append(await keyed_call(session, gateway.url, f"u-{n}"))
                async with session.get(gateway.url + "/readyz") as resp:
                    ready = resp.status
        finally:
            for writer in writers:
                writer.transport.abort()
            assert gateway.stop() == 0
        assert statuses == [200] * 30
        assert ready == 200
        files = rotated_files(gateway.audit_path)
        assert len(files) > 3  # it rotated under the flood
        report = verify_files(files)
        assert report.ok, report.error
        assert not [e for e in gateway.events() if e.get("event") == "audit.unwritable"]


# Run in a child process whose descriptor limit is 64, every descriptor but the audit's taken.
AUDIT_WITHOUT_DESCRIPTORS = """
import asyncio, errno, os, resource, sys
from gateway.audit.log import AuditLog, rotated_files, verify_files
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

async def main():
    log = AuditLog(sys.argv[1], max_bytes=2048)
    log.open()
    hog = []
    try:
        while True:
            hog.append(os.open(os.devnull, os.O_RDONLY))
    except OSError as exc:
        assert exc.errno == errno.EMFILE
    written = 0
    for n in range(60):
        await log.append({"event": "deactivate.denied", "n": n, "pad": "p" * 100})
        written += 1
    probed = await log.probe()
    await log.close()
    for fd in hog:
        os.close(fd)
    report = verify_files(rotated_files(sys.argv[1]))
    print(written, probed, report.ok, report.files)

asyncio.run(main())
"""


def test_the_audit_rotates_and_reopens_with_no_descriptor_free(tmp_path: Path) -> None:
    """Rotation (a directory listing, a rename, a new file, a directory fsync) and the
    readiness probe (a fresh descriptor) each need descriptors: the audit keeps its own."""
    done = subprocess.run([sys.executable, "-c", AUDIT_WITHOUT_DESCRIPTORS,
                           str(tmp_path / "audit.jsonl")], cwd=REPO, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    written, probed, intact, files = done.stdout.splitlines()[-1].split()
    assert (written, probed, intact) == ("60", "True", "True")
    assert int(files) > 5


@pytest.fixture(autouse=True)
def _linux_only() -> None:
    if not Path("/proc/self/status").exists():
        pytest.skip("reads /proc and uses 127.0.0.0/8")
