"""Tests for gateway.bulk.sender and gateway.rows: `kore-gateway deactivate` against the real gateway
and the real sandbox on loopback (in this process), plus its files and argument checks."""

from __future__ import annotations

import asyncio
import csv
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from gateway import cli
from gateway.bulk.rows import (
    FAILED,
    NOT_DONE,
    RESULT_COLUMNS,
    SUCCEEDED,
    BulkError,
    Result,
    ResultsFile,
    Row,
    read_rows,
)
from gateway.bulk.sender import (
    Answer,
    Options,
    Stop,
    Summary,
    answer_of,
    error_code,
    judge,
    run_bulk,
)
from gateway.config.model import Secret
from gateway.sandbox.server import KoreSandbox, SandboxApp
from tests.conftest import BOT, CALLER_KEY, CLIENT_ID, CLIENT_SECRET, Sandbox
from tests.integration.live import refusing_port

WAIT_S = 20.0


def write_csv(path: Path, *lines: str) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def rows_of(count: int, bots: int = 3) -> list[Row]:
    return [Row(f"st-bulk-{i % bots}", f"u-{i}", "rtm" if i % 2 else None, i + 2)
            for i in range(count)]


def result_lines(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def last_outcomes(path: Path) -> dict[tuple[str, str], str]:
    return {(r["botId"], r["userId"]): r["status"] for r in result_lines(path)}


class Gauge:
    """Counts requests in flight at the sandbox: the run's concurrency as Kore.ai sees it."""

    def __init__(self) -> None:
        self.now = self.peak = 0

    @web.middleware
    async def middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.now += 1
        self.peak = max(self.peak, self.now)
        try:
            return await handler(request)  # type: ignore[no-any-return]
        finally:
            self.now -= 1


@pytest.fixture
def gauge() -> Gauge:
    return Gauge()


@pytest.fixture
async def sandbox(aiohttp_server: Any, gauge: Gauge) -> Sandbox:
    """The real sandbox, knowing bots st-bulk-*, st-test-* (others get Kore.ai's 404)."""
    emulator = KoreSandbox([SandboxApp(client_id=CLIENT_ID, key=CLIENT_SECRET)],
                           known_bots=("st-bulk-*", "st-test-*"))
    app = emulator.create_app()
    app.middlewares.append(gauge.middleware)
    return Sandbox(emulator, await aiohttp_server(app, host="127.0.0.1"))


Start = Callable[..., Awaitable[str]]


@pytest.fixture
def start(make_config: Any, gateway_for: Any, sandbox: Sandbox) -> Start:
    """`url = await start(**tables)`: the real gateway in front of the sandbox."""
    async def go(**tables: Any) -> str:
        client = await gateway_for(make_config(sandbox.url, **tables))
        return str(client.make_url("")).rstrip("/")
    return go


async def run(url: str, rows: list[Row], results: Path | None = None, *,
              stop: Stop | None = None, key: str = CALLER_KEY, **options: Any) -> Summary:
    file = ResultsFile(results) if results is not None else None
    if file is not None:
        file.open()
    try:
        return await run_bulk(rows, Options(url=url, key=Secret(key), **options), file,
                              stop or Stop())
    finally:
        if file is not None:
            file.close()


async def wait_until(check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


class TestRun:
    async def test_single_user(self, start: Start, sandbox: Sandbox, tmp_path: Path) -> None:
        url = await start()
        summary = await run(url, [Row(BOT, "jane@example.com", "rtm", 1)],
                            tmp_path / "r.csv")
        assert (summary.succeeded, summary.exit_code()) == (1, 0)
        [call] = sandbox.calls
        assert call.body == {"userId": "jane@example.com", "status": "inactive",
                             "channel": "rtm"}
        [line] = result_lines(tmp_path / "r.csv")
        assert line == {"botId": BOT, "userId": "jane@example.com", "channel": "rtm",
                        "status": SUCCEEDED, "code": "ok",
                        "requestId": call.headers["X-Request-ID"]}

    async def test_csv_of_50_rows_with_bounded_concurrency(
            self, start: Start, sandbox: Sandbox, gauge: Gauge, tmp_path: Path) -> None:
        sandbox.faults.latency_ms = 20
        lines = ["botId,userId,channel"] + [f"st-bulk-{i % 3},u-{i},{'rtm' if i % 2 else ''}"
                                            for i in range(50)]
        rows = read_rows(write_csv(tmp_path / "in.csv", *lines))
        summary = await run(await start(), rows, tmp_path / "r.csv", concurrency=4)
        assert (summary.succeeded, summary.failed, summary.not_done) == (50, 0, 0)
        assert 2 <= gauge.peak <= 4
        seen = sorted((c.bot_id, c.body["userId"], c.body.get("channel")) for c in sandbox.calls)
        assert seen == sorted((r.bot_id, r.user_id, r.channel) for r in rows)
        results = result_lines(tmp_path / "r.csv")
        assert len(results) == 50 and {r["status"] for r in results} == {SUCCEEDED}
        assert {r["requestId"] for r in results} == {c.headers["X-Request-ID"]
                                                     for c in sandbox.calls}

    async def test_final_errors_fail_and_the_exit_code_says_so(
            self, start: Start, sandbox: Sandbox, tmp_path: Path) -> None:
        rows = [Row("st-bulk-1", "u-ok", None, 2), Row("st-unknown-1", "u-404", None, 3),
                Row("st-bulk-1", "u-bad", "NOT A CHANNEL", 4), Row("bad bot", "u-x", None, 5)]
        summary = await run(await start(), rows, tmp_path / "r.csv")
        assert (summary.succeeded, summary.failed, summary.exit_code()) == (1, 3, 1)
        codes = {r["userId"]: (r["status"], r["code"]) for r in result_lines(tmp_path / "r.csv")}
        assert codes == {"u-ok": (SUCCEEDED, "ok"), "u-404": (FAILED, "upstream_rejected"),
                         "u-bad": (FAILED, "invalid_request"),
                         "u-x": (FAILED, "invalid_request")}

    async def test_a_429_storm_is_waited_out(self, start: Start, sandbox: Sandbox,
                                             tmp_path: Path) -> None:
        """Kore.ai's 429 reaches the run as the gateway's 429 + Retry-After: 1; no row is
        sent again before that second has passed, and every row ends succeeded."""
        sandbox.faults.rate_429, sandbox.faults.retry_after_s = 1.0, 1
        # The run's own handling of 429 + Retry-After; the gateway's pacing is off, so that it
        # does not learn a budget from the storm (tests/integration/test_kore_limits.py).
        url = await start(upstream={"timeout_s": 1}, rate_limit={"enabled": False})
        task = asyncio.create_task(run(url, rows_of(16), tmp_path / "r.csv", concurrency=4))
        await wait_until(lambda: sum(c.status == 429 for c in sandbox.calls) >= 4)
        sandbox.faults.rate_429 = 0.0
        summary = await asyncio.wait_for(task, WAIT_S)
        assert (summary.succeeded, summary.not_done) == (16, 0)
        first_429 = min(c.at for c in sandbox.calls if c.status == 429)
        first_200 = min(c.at for c in sandbox.calls if c.status == 200)
        assert first_200 - first_429 >= 0.9
        assert sum(c.status == 200 for c in sandbox.calls) == 16

    async def test_429_past_max_attempts_leaves_the_row_not_done(
            self, start: Start, sandbox: Sandbox, tmp_path: Path) -> None:
        sandbox.faults.rate_429, sandbox.faults.retry_after_s = 1.0, 1
        url = await start(upstream={"timeout_s": 1}, rate_limit={"enabled": False})
        summary = await run(url, rows_of(1), tmp_path / "r.csv", max_attempts=2,
                            max_wait_s=0.2)
        assert (summary.not_done, summary.exit_code()) == (1, 1)
        assert len(sandbox.calls) == 2
        [line] = result_lines(tmp_path / "r.csv")
        assert (line["status"], line["code"]) == (NOT_DONE, "rate_limited")

    async def test_resume_skips_rows_already_done(self, start: Start, sandbox: Sandbox,
                                                  tmp_path: Path) -> None:
        sandbox.faults.latency_ms = 10
        url, path, rows = await start(), tmp_path / "r.csv", rows_of(30)
        rows.append(Row("st-unknown-1", "u-final", None, 99))  # fails for good: not resent
        first = Stop()
        task = asyncio.create_task(run(url, rows[::-1], path, stop=first, concurrency=2))
        await wait_until(lambda: path.exists() and len(result_lines(path)) >= 10)
        first.stop("test")
        summary = await asyncio.wait_for(task, WAIT_S)
        assert summary.unsent > 0 and summary.stopped_by == "test"
        done = {k for k, v in last_outcomes(path).items() if v in (SUCCEEDED, FAILED)}
        assert ("st-unknown-1", "u-final") in done
        calls_before = len(sandbox.calls)

        again = await run(url, rows, path, concurrency=4)
        resent = {(c.bot_id, c.body["userId"]) for c in sandbox.calls[calls_before:]}
        assert not resent & done
        assert again.skipped_succeeded + again.skipped_failed == len(done)
        assert again.skipped_failed == 1 and again.exit_code() == 1
        outcomes = last_outcomes(path)
        assert len(outcomes) == 31
        assert [k for k, v in outcomes.items() if v != SUCCEEDED] == [("st-unknown-1",
                                                                        "u-final")]

    async def test_stop_records_rows_in_flight_as_not_done(
            self, start: Start, sandbox: Sandbox, tmp_path: Path) -> None:
        sandbox.faults.latency_ms = 3000
        stop, path = Stop(), tmp_path / "r.csv"
        task = asyncio.create_task(run(await start(), rows_of(10), path, stop=stop,
                                       concurrency=3, grace_s=0.1))
        await wait_until(lambda: len(sandbox.calls) == 3)
        stop.stop("test")
        summary = await asyncio.wait_for(task, WAIT_S)
        assert (summary.not_done, summary.unsent) == (3, 7)
        lines = result_lines(path)
        assert [(r["status"], r["code"]) for r in lines] == [(NOT_DONE, "interrupted")] * 3
        assert {r["requestId"] for r in lines} == {c.headers["X-Request-ID"]
                                                   for c in sandbox.calls}
        assert path.read_text(encoding="utf-8").endswith("\n")

    async def test_a_refused_key_stops_the_run(self, start: Start, sandbox: Sandbox,
                                               tmp_path: Path) -> None:
        summary = await run(await start(), rows_of(20), tmp_path / "r.csv", key="kgw_wrong",
                            concurrency=2)
        assert summary.stopped_by and "401" in summary.stopped_by
        assert summary.not_done <= 2 and summary.unsent >= 18 and summary.exit_code() == 1
        assert not sandbox.calls
        assert {r["code"] for r in result_lines(tmp_path / "r.csv")} == {"unauthenticated"}

    async def test_an_unreachable_gateway_stops_the_run(self, tmp_path: Path) -> None:
        with refusing_port() as port:
            summary = await run(f"http://127.0.0.1:{port}", rows_of(10), tmp_path / "r.csv",
                                concurrency=2, max_attempts=2)
        assert summary.stopped_by and "no answer" in summary.stopped_by
        assert (summary.not_done, summary.unsent) == (2, 8)
        assert {r["code"] for r in result_lines(tmp_path / "r.csv")} == {"connection_error"}


class TestReadRows:
    def test_header_with_and_without_channel(self, tmp_path: Path) -> None:
        rows = read_rows(write_csv(tmp_path / "a.csv", "\ufeffuserId, botId", "u-1, st-1", "",
                                   '"u,2",st-2'))
        assert rows == [Row("st-1", "u-1", None, 2), Row("st-2", "u,2", None, 4)]
        rows = read_rows(write_csv(tmp_path / "b.csv", "botId,userId,channel", "st-1,u-1,rtm",
                                   "st-1,u-2,"))
        assert [r.channel for r in rows] == ["rtm", None]

    @pytest.mark.parametrize(("lines", "message"), [
        (["botId,channel", "st-1,rtm"], "missing column userId"),
        (["botId,userId,chanel", "st-1,u-1,rtm"], "unknown column 'chanel'"),
        (["botId,userId,userId", "st-1,u-1,u-2"], "a column appears twice"),
        (["botId,userId", "st-1,u-1,extra"], "in.csv:2: 3 field(s), the header has 2"),
        (["botId,userId", "st-1,"], "in.csv:2: userId is empty"),
        ([""], "empty file"),
    ], ids=["missing", "unknown", "twice", "fields", "empty-value", "empty-file"])
    def test_bad_csv_is_refused_with_a_clear_message(
            self, tmp_path: Path, lines: list[str], message: str) -> None:
        with pytest.raises(BulkError, match=None) as caught:
            read_rows(write_csv(tmp_path / "in.csv", *lines))
        assert message in str(caught.value)

    def test_not_utf8(self, tmp_path: Path) -> None:
        path = tmp_path / "in.csv"
        path.write_bytes(b"botId,userId\nst-1,\xff\n")
        with pytest.raises(BulkError, match="not UTF-8"):
            read_rows(path)


class TestResultsFile:
    def test_a_new_file_gets_the_header(self, tmp_path: Path) -> None:
        file = ResultsFile(tmp_path / "r.csv")
        file.open()
        file.write(Result(Row("st-1", 'u "1"', None, 2), SUCCEEDED, "ok", "rid-1"))
        file.close()
        assert (tmp_path / "r.csv").read_text(encoding="utf-8") == (
            ",".join(RESULT_COLUMNS) + '\nst-1,"u ""1""",,succeeded,ok,rid-1\n')

    def test_the_last_outcome_of_a_row_counts(self, tmp_path: Path) -> None:
        path = write_csv(tmp_path / "r.csv", ",".join(RESULT_COLUMNS),
                         "st-1,u-1,,not_done,rate_limited,a", "st-1,u-1,,succeeded,ok,b",
                         "st-1,u-2,rtm,failed,upstream_rejected,c",
                         "st-1,u-3,,succeeded,ok,d", "st-1,u-3,,not_done,interrupted,e")
        file = ResultsFile(path)
        file.open()
        file.close()
        assert file.done(Row("st-1", "u-1", None, 0)) == SUCCEEDED
        assert file.done(Row("st-1", "u-2", "rtm", 0)) == FAILED
        assert file.done(Row("st-1", "u-2", None, 0)) is None  # another channel: not the same
        assert file.done(Row("st-1", "u-3", None, 0)) is None

    def test_a_torn_last_line_is_cut_off(self, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
        path = tmp_path / "r.csv"
        path.write_text(",".join(RESULT_COLUMNS) + "\nst-1,u-1,,succeeded,ok,a\nst-1,u-2,,succ",
                        encoding="utf-8")
        file = ResultsFile(path)
        file.open()
        file.write(Result(Row("st-1", "u-2", None, 3), SUCCEEDED, "ok", "b"))
        file.close()
        assert [r["userId"] for r in result_lines(path)] == ["u-1", "u-2"]
        assert "partial last line" in capsys.readouterr().err

    def test_not_a_results_file(self, tmp_path: Path) -> None:
        path = write_csv(tmp_path / "in.csv", "botId,userId", "st-1,u-1")
        with pytest.raises(BulkError, match="not a results file"):
            ResultsFile(path).open()
        assert path.read_text(encoding="utf-8") == "botId,userId\nst-1,u-1\n"

    def test_one_run_at_a_time(self, tmp_path: Path) -> None:
        first = ResultsFile(tmp_path / "r.csv")
        first.open()
        try:
            with pytest.raises(BulkError, match="in use by another run"):
                ResultsFile(tmp_path / "r.csv").open()
        finally:
            first.close()


class TestAnswers:
    @pytest.mark.parametrize(("status", "body", "headers", "expected"), [
        (200, b'{"success": true}', {}, (SUCCEEDED, "ok", None)),
        (429, b'{"error": {"code": "rate_limited"}}', {"Retry-After": "3"},
         (NOT_DONE, "rate_limited", 3.0)),
        (503, b'{"error": {"code": "overloaded"}}', {"Retry-After": "soon"},
         (NOT_DONE, "overloaded", 1.0)),
        (404, b'{"error": {"code": "upstream_rejected"}}', {}, (FAILED, "upstream_rejected", None)),
        (403, b'{"error": {"code": "forbidden"}}', {}, (FAILED, "forbidden", None)),
        (401, b'{"error": {"code": "unauthenticated"}}', {}, (NOT_DONE, "unauthenticated", None)),
        (502, b'{"error": {"code": "upstream_auth_failed"}}', {},
         (NOT_DONE, "upstream_auth_failed", None)),
        (502, b"<html>bad gateway</html>", {}, (NOT_DONE, "http_502", None)),
    ], ids=["ok", "429", "503-bad-retry-after", "404", "403", "401", "502", "not-json"])
    def test_outcome_of_an_answer(self, status: int, body: bytes, headers: dict[str, str],
                                  expected: tuple[str, str, float | None]) -> None:
        answer = answer_of(status, body, headers, "rid")
        assert (judge(answer), answer.code, answer.wait_s) == expected

    def test_no_answer_is_retried_and_not_done(self) -> None:
        assert judge(Answer(0, "connection_error", "rid", 0.5)) == NOT_DONE

    def test_error_code_never_echoes_odd_text(self) -> None:
        assert error_code(400, b'{"error": {"code": "a,b\\nc"}}') == "http_400"


class TestCommand:
    """`kore-gateway deactivate` argument and input errors: exit 2, nothing sent."""

    def run_cli(self, *args: str) -> int:
        with pytest.raises(SystemExit) as exited:
            cli.main(["deactivate", *args])
        return int(exited.value.code or 0)

    def test_bad_csv_exits_2_naming_the_column(
            self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
            capsys: pytest.CaptureFixture[str]) -> None:
        monkeypatch.setenv("KORE_GATEWAY_KEY", CALLER_KEY)
        path = write_csv(tmp_path / "in.csv", "botId,user", "st-1,u-1")
        assert self.run_cli("--csv", str(path), "--url", "http://127.0.0.1:9") == 2
        err = capsys.readouterr().err
        assert f"deactivate: {path}: missing column userId" in err
        assert "Traceback" not in err
        assert not (tmp_path / "in.csv.results.csv").exists()

    @pytest.mark.parametrize(("args", "message"), [
        ([], "give either --bot and --user"),
        (["--bot", "st-1"], "needs both --bot and --user"),
        (["--bot", "st-1", "--user", "u", "--csv", "x.csv"], "give either"),
        (["--bot", "st-1", "--user", "u", "--url", "ftp://x"], "must be http(s)"),
    ], ids=["nothing", "no-user", "both", "bad-url"])
    def test_usage_errors_exit_2(self, args: list[str], message: str,
                                 monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
        monkeypatch.setenv("KORE_GATEWAY_KEY", CALLER_KEY)
        assert self.run_cli(*args) == 2
        assert message in capsys.readouterr().err

    def test_missing_key_exits_2_naming_the_variable(
            self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
        monkeypatch.delenv("MY_KEY", raising=False)
        assert self.run_cli("--bot", "st-1", "--user", "u", "--key-env", "MY_KEY") == 2
        assert "$MY_KEY" in capsys.readouterr().err

    def test_concurrency_is_bounded(self, capsys: pytest.CaptureFixture[str]) -> None:
        assert self.run_cli("--bot", "st-1", "--user", "u", "--concurrency", "0") == 2
        assert "--concurrency" in capsys.readouterr().err
