"""Tests for gateway.logs: the redaction processor and the configured JSON output."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import warnings
from pathlib import Path
from typing import Any

import pytest
import structlog

from gateway import jsoncodec
from gateway.logs import (
    REDACTED_KEYS,
    LogFile,
    LogFileError,
    Throttle,
    access,
    configure,
    one_line_text,
    redact,
    safe_traceback,
    scrub,
    scrub_message,
    utc_timestamp,
    worker_file,
)
from tests.conftest import FakeClock

JWT = ("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJhcHBJZCI6ImNzLXRlc3QiLCJzdWIiOiJ4In0."
       "SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c")
KEY = "kgw_caller_key_do_not_log_0123456789"


def run(**event: Any) -> dict[str, Any]:
    return dict(redact(None, "info", dict(event)))


def stderr_lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in capsys.readouterr().err.splitlines() if line]


class TestRedact:
    @pytest.mark.parametrize("name", sorted(REDACTED_KEYS))
    def test_secret_named_keys_masked(self, name: str) -> None:
        assert run(event="e", **{name: "value-123"})[name] == "[redacted]"

    @pytest.mark.parametrize("name", ["Authorization", "TOKEN", "Client_Secret", "JWT"])
    def test_key_names_case_insensitive(self, name: str) -> None:
        assert run(event="e", **{name: "value-123"})[name] == "[redacted]"

    @pytest.mark.parametrize("value", [12345, None, b"bytes", ["a"], {"x": 1}])
    def test_non_string_secret_values_masked(self, value: Any) -> None:
        assert run(event="e", secret=value)["secret"] == "[redacted]"

    @pytest.mark.parametrize("name", ["token", "secret", "authorization", "key"])
    def test_the_style_guide_names_are_covered(self, name: str) -> None:
        assert name in REDACTED_KEYS

    def test_jwt_shaped_string_masked_anywhere(self) -> None:
        out = run(event=f"sending {JWT} upstream", detail=f"auth={JWT}", jwtish=JWT)
        assert JWT not in json.dumps(out)
        assert out["jwtish"] == "[redacted-jwt]"
        assert out["event"] == "sending [redacted-jwt] upstream"

    @pytest.mark.parametrize("value", [f"Bearer {KEY}", f"bearer {KEY}", f"BEARER  {KEY}",
                                       f"header was 'Authorization: Bearer {KEY}'"])
    def test_bearer_key_masked(self, value: str) -> None:
        out = run(event="e", header_text=value)
        assert KEY not in out["header_text"] and "[redacted]" in out["header_text"]

    def test_ordinary_values_untouched(self) -> None:
        event = {"event": "deactivate.completed", "bot_id": "st-abc", "status": 200,
                 "user_id": "u-1", "duration_ms": 12.5, "app": "sessions"}
        assert run(**event) == event

    def test_short_dotted_strings_not_taken_for_jwts(self) -> None:
        assert run(event="e", version="eyJ.a.b")["version"] == "eyJ.a.b"

    def test_nested_values_masked(self) -> None:
        out = run(event="e", headers={"Authorization": f"Bearer {KEY}"}, tokens=[JWT])
        text = json.dumps(out)
        assert KEY not in text and JWT not in text


class TestConfigure:
    def test_token_value_never_printed(self, capsys: pytest.CaptureFixture[str]) -> None:
        configure("info", "json")
        structlog.get_logger("t").info("token.minted", token=JWT, app="sessions",
                                       authorization=f"Bearer {KEY}", client_secret="s3cr3t!")
        err = capsys.readouterr().err
        assert JWT not in err and KEY not in err and "s3cr3t!" not in err
        [line] = [json.loads(x) for x in err.splitlines()]
        assert line["event"] == "token.minted" and line["app"] == "sessions"
        assert line["token"] == "[redacted]" and line["level"] == "info"

    def test_json_lines_with_utc_timestamp(self, capsys: pytest.CaptureFixture[str]) -> None:
        configure("info", "json")
        structlog.get_logger("t").info("request.done", status=200)
        [line] = stderr_lines(capsys)
        assert line["timestamp"].endswith("Z") and line["status"] == 200
        assert capsys.readouterr().out == ""

    def test_auto_format_is_json_off_a_terminal(self, capsys: pytest.CaptureFixture[str]) -> None:
        configure()
        structlog.get_logger("t").info("e", token="abc-secret")
        [line] = stderr_lines(capsys)
        assert line["token"] == "[redacted]"

    def test_console_format_also_redacts(self, capsys: pytest.CaptureFixture[str]) -> None:
        configure("info", "console")
        structlog.get_logger("t").info("e", token="abc-secret-console", note=f"Bearer {KEY}")
        err = capsys.readouterr().err
        assert "abc-secret-console" not in err and KEY not in err

    def test_level_filters(self, capsys: pytest.CaptureFixture[str]) -> None:
        configure("warning", "json")
        log = structlog.get_logger("t")
        log.info("hidden")
        log.warning("shown")
        assert [line["event"] for line in stderr_lines(capsys)] == ["shown"]

    def test_context_vars_merged(self, capsys: pytest.CaptureFixture[str]) -> None:
        configure("info", "json")
        structlog.contextvars.bind_contextvars(request_id="req-1")
        try:
            structlog.get_logger("t").info("e")
        finally:
            structlog.contextvars.clear_contextvars()
        [line] = stderr_lines(capsys)
        assert line["request_id"] == "req-1"

    def test_exception_text_redacted(self, capsys: pytest.CaptureFixture[str]) -> None:
        configure("info", "json")
        try:
            raise ValueError(f"upstream refused auth {JWT} for Bearer {KEY}")
        except ValueError:
            structlog.get_logger("t").exception("upstream.error")
        err = capsys.readouterr().err
        assert "upstream.error" in err
        assert JWT not in err and KEY not in err


def record_stderr(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What is written to sys.stderr from now on, one item per write() (called in the test
    itself: pytest's capture sets sys.stderr again between a fixture and the test)."""
    writes: list[str] = []

    class Recorder:
        def write(self, text: str) -> int:
            writes.append(text)
            return len(text)

        def flush(self) -> None:
            pass

    monkeypatch.setattr("sys.stderr", Recorder())
    return writes


class TestOneLinePerRecord:
    @pytest.mark.parametrize("char", ["\u2028", "\u2029", "\u0085", "\u202e", "\u2066"])
    def test_line_breaks_and_bidi_controls_are_escaped(
            self, char: str, capsys: pytest.CaptureFixture[str]) -> None:
        configure("info", "json")
        structlog.get_logger("t").info("e", user_id=f"a{char}b")
        access("request", caller=f"c{char}d")
        err = capsys.readouterr().err
        assert char not in err and f"\\u{ord(char):04x}" in err
        assert [json.loads(line)["event"] for line in err.split("\n") if line] == \
            ["e", "request"]
        assert json.loads(err.split("\n")[0])["user_id"] == f"a{char}b"


    def test_the_same_characters_as_the_audit_line(self) -> None:
        for code in range(0x80, 0x3000):
            text = f'"{chr(code)}"'
            escaped_in_log = one_line_text(text) != text
            escaped_in_audit = jsoncodec.one_line(text.encode("utf-8", "surrogatepass")) != \
                text.encode("utf-8", "surrogatepass")
            assert escaped_in_log == escaped_in_audit, hex(code)


class TestOneWritePerLine:
    """Workers share stderr: a line and its newline must reach it in one write()."""

    def test_each_line_is_written_whole(self, monkeypatch: pytest.MonkeyPatch) -> None:
        writes = record_stderr(monkeypatch)
        configure("info", "json")
        structlog.get_logger("t").info("first", n=1)
        structlog.get_logger("t").warning("second", n=2)
        assert len(writes) == 2
        assert all(w.endswith("\n") and w.count("\n") == 1 for w in writes)
        assert [json.loads(w)["event"] for w in writes] == ["first", "second"]


class TestAccessLine:
    """`access()`: the per-request line without structlog's chain, the same line it would be."""

    def test_same_fields_as_a_structlog_line(self, capsys: pytest.CaptureFixture[str]) -> None:
        configure("info", "json")
        structlog.contextvars.bind_contextvars(worker=1, request_id="req-9")
        try:
            access("request", method="POST", status=200, duration_ms=1.5)
            structlog.get_logger("t").info("request", method="POST", status=200,
                                           duration_ms=1.5)
        finally:
            structlog.contextvars.clear_contextvars()
        fast, chain = stderr_lines(capsys)
        assert fast.keys() == chain.keys()
        assert {k: v for k, v in fast.items() if k != "timestamp"} == \
               {k: v for k, v in chain.items() if k != "timestamp"}
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", fast["timestamp"])

    def test_secrets_are_redacted(self, capsys: pytest.CaptureFixture[str]) -> None:
        configure("info", "json")
        structlog.contextvars.bind_contextvars(request_id=JWT)
        try:
            access("request", caller=f"Bearer {KEY}", token="abc-secret", status=401)
        finally:
            structlog.contextvars.clear_contextvars()
        err = capsys.readouterr().err
        assert JWT not in err and KEY not in err and "abc-secret" not in err
        [line] = [json.loads(x) for x in err.splitlines()]
        assert line["request_id"] == "[redacted-jwt]" and line["token"] == "[redacted]"
        assert line["status"] == 401

    def test_one_write_per_line(self, monkeypatch: pytest.MonkeyPatch) -> None:
        writes = record_stderr(monkeypatch)
        configure("info", "json")
        access("request", status=200)
        access("request", status=404)
        assert [json.loads(w)["status"] for w in writes] == [200, 404]
        assert all(w.endswith("\n") and w.count("\n") == 1 for w in writes)

    async def test_lines_of_one_loop_turn_share_writes_of_whole_lines(
            self, monkeypatch: pytest.MonkeyPatch) -> None:
        """In the event loop, the lines of one turn are written at its end, together: whole
        lines, no write over PIPE_ATOMIC_BYTES unless it is one line alone."""
        from gateway.logs import PIPE_ATOMIC_BYTES

        writes = record_stderr(monkeypatch)
        configure("info", "json")
        for status in range(60):
            access("request", status=status, route="é" * 40)
        access("request", status=999, route="x" * 5000)  # longer than a write on its own
        assert writes == []  # held until the loop's next turn
        await asyncio.sleep(0)
        assert len(writes) > 2
        assert all(w.endswith("\n") for w in writes)
        assert all(len(w.encode()) <= PIPE_ATOMIC_BYTES for w in writes if w.count("\n") > 1)
        lines = [json.loads(x) for w in writes for x in w.splitlines()]
        assert [line["status"] for line in lines] == [*range(60), 999]

    def test_each_event_loop_gets_its_lines_and_a_thread_without_one_writes_at_once(
            self, monkeypatch: pytest.MonkeyPatch) -> None:
        """The loop seen last is used again only in its own thread while it runs: a second
        loop after it holds its own lines to the end of the turn, and a thread with no loop
        writes at once while another thread's loop runs (never queuing on that loop)."""
        writes = record_stderr(monkeypatch)
        configure("info", "json")

        async def in_loop(status: int, thread_status: int | None = None) -> None:
            before = len(writes)
            access("request", status=status)
            assert len(writes) == before  # held until the end of the loop's turn
            await asyncio.sleep(0)
            assert len(writes) == before + 1
            if thread_status is not None:
                other = threading.Thread(target=access, args=("request",),
                                         kwargs={"status": thread_status})
                other.start()
                other.join()
                assert len(writes) == before + 2  # written by the thread itself

        asyncio.run(in_loop(1))
        asyncio.run(in_loop(2, thread_status=3))
        assert [json.loads(w)["status"] for w in writes] == [1, 2, 3]

    def test_level_and_console_format_are_honoured(
            self, capsys: pytest.CaptureFixture[str]) -> None:
        configure("warning", "json")
        access("request", status=200)
        assert capsys.readouterr().err == ""
        configure("info", "console")
        access("request", status=200, token="abc-secret-console")
        err = capsys.readouterr().err
        assert "request" in err and "abc-secret-console" not in err

    def test_utc_timestamp_is_now(self) -> None:
        import datetime

        stamp = utc_timestamp()
        parsed = datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
            tzinfo=datetime.UTC)
        assert abs((datetime.datetime.now(datetime.UTC) - parsed).total_seconds()) < 5


class TestLogFile:
    """`logging.file`: the same redacted JSON lines appended to a size-rotated file."""

    def test_lines_go_to_stderr_and_the_file(self, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
        path = tmp_path / "log" / "gateway.jsonl"  # its directory is made
        configure("info", "auto", LogFile(path, 1 << 20))
        structlog.get_logger("t").info("audit.anchor", seq=7, token=JWT)
        [on_stderr] = stderr_lines(capsys)
        [in_file] = [json.loads(x) for x in path.read_text("utf-8").splitlines()]
        assert on_stderr == in_file
        assert in_file["event"] == "audit.anchor" and in_file["token"] == "[redacted]"

    def test_file_lines_are_json_even_on_a_terminal(self, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr("sys.stderr.isatty", lambda: True)
        path = tmp_path / "gateway.jsonl"
        configure("info", "auto", LogFile(path, 1 << 20))
        structlog.get_logger("t").info("e", n=1)
        assert json.loads(path.read_text("utf-8"))["n"] == 1

    def test_rotates_past_max_bytes_keeping_one_old_file(self, tmp_path: Path) -> None:
        path = tmp_path / "gateway.jsonl"
        file = LogFile(path, max_bytes=100)
        lines = [json.dumps({"n": n, "pad": "x" * 30}) + "\n" for n in range(7)]  # 43 bytes
        for line in lines:
            file.write(line)
        file.close()
        old = path.with_name("gateway.jsonl.1")
        assert path.read_text() == "".join(lines[6:])  # each file holds whole lines only
        assert old.read_text() == "".join(lines[4:6])
        assert sorted(p.name for p in tmp_path.iterdir()) == ["gateway.jsonl", "gateway.jsonl.1"]

    def test_appends_to_an_existing_file(self, tmp_path: Path) -> None:
        path = tmp_path / "gateway.jsonl"
        path.write_text('{"before": true}\n')
        file = LogFile(path, 1 << 20)
        file.write('{"after": true}\n')
        file.close()
        assert path.read_text().splitlines() == ['{"before": true}', '{"after": true}']

    def test_a_line_that_cannot_be_written_is_dropped_not_raised(self, tmp_path: Path) -> None:
        file = LogFile(tmp_path / "gateway.jsonl", max_bytes=4096)
        file.close()  # every write now fails (EBADF), as on a full or lost volume
        file.write("x\n")
        assert file.dropped == 1

    def test_unusable_path_names_itself(self, tmp_path: Path) -> None:
        (tmp_path / "blocker").write_text("a file, not a directory")
        with pytest.raises(LogFileError, match="blocker"):
            LogFile(tmp_path / "blocker" / "gateway.jsonl", 4096)

    def test_each_worker_has_its_own_file(self) -> None:
        assert worker_file("/var/log/gw/gateway.jsonl", 3) == "/var/log/gw/gateway-w3.jsonl"


SECRET = "plainsecret-0123456789abcdef"


class TestScrub:
    @pytest.mark.parametrize(("text", "gone"), [
        pytest.param(f"auth header: Bearer {SECRET}", SECRET, id="bearer"),
        pytest.param(f"Basic {SECRET}", SECRET, id="basic"),
        pytest.param(f"saw {KEY} somewhere", KEY, id="gateway-key-anywhere"),
        pytest.param(f"redis://user:{SECRET}@cache:6379/0", SECRET, id="url-userinfo"),
        pytest.param(f"Authorization: {SECRET}", SECRET, id="header-line"),
        pytest.param(f"cookie={SECRET}", SECRET, id="cookie-assignment"),
        pytest.param(f"got b'X-Any: {SECRET}\\r' at 12", SECRET, id="bytes-literal"),
        pytest.param(f'got b"{SECRET}"', SECRET, id="bytes-literal-double"),
        pytest.param(f"token {JWT} seen", JWT, id="jwt"),
    ])
    def test_secret_shapes(self, text: str, gone: str) -> None:
        assert gone not in scrub(text)

    def test_ordinary_text_is_kept(self) -> None:
        text = "deactivate.completed st-abc u-1 took 12.5 ms (http://kore.example:443/x)"
        assert scrub(text) == text

    def test_messages_lose_every_quoted_literal(self) -> None:
        message = f"Bad status line '{SECRET} /x HTTP/1.1' and \"{SECRET}\""
        assert SECRET not in scrub_message(message)
        assert scrub_message("Invalid header: 'x'") == "Invalid header: '[redacted]'"


class TestLibraryLogging:
    """The standard library's loggers go through the same redaction, as JSON lines."""

    def test_aiohttp_server_traceback_is_redacted(self,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
        configure("info", "json")
        try:
            raise ValueError(f"Invalid header value char:\n  b'Authorization: {SECRET}\\r'")
        except ValueError:
            logging.getLogger("aiohttp.server").exception("Error handling request %r",
                                                          f"X-Key: {SECRET}")
        err = capsys.readouterr().err
        assert SECRET not in err
        [line] = [json.loads(x) for x in err.splitlines()]
        assert line["logger"] == "aiohttp.server" and line["level"] == "error"
        assert "ValueError" in line["exception"] and "Traceback" in line["exception"]

    @pytest.mark.parametrize("name", ["asyncio", "aiohttp.access", "aiohttp.web", "redis", ""])
    def test_every_library_logger_is_routed(self, name: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
        configure("info", "json")
        logging.getLogger(name).warning("saw %s", f"'{SECRET}'")
        [line] = [json.loads(x) for x in capsys.readouterr().err.splitlines()]
        assert SECRET not in json.dumps(line) and line["level"] == "warning"

    def test_the_level_applies_to_libraries(self, capsys: pytest.CaptureFixture[str]) -> None:
        configure("warning", "json")
        logging.getLogger("aiohttp.server").info("chatty")
        assert capsys.readouterr().err == ""

    def test_chained_exceptions_keep_their_types_not_their_messages(self) -> None:
        try:
            try:
                raise KeyError(SECRET)
            except KeyError as inner:
                raise RuntimeError(f"while reading b'{SECRET}'") from inner
        except RuntimeError as exc:
            text = safe_traceback(exc)
        assert SECRET not in text
        assert "KeyError" in text and "RuntimeError" in text and "direct cause" in text

    def test_uncaught_thread_exception_is_a_redacted_line(
            self, capsys: pytest.CaptureFixture[str]) -> None:
        configure("info", "json")

        def boom() -> None:
            raise RuntimeError(f"leaked '{SECRET}'")

        thread = threading.Thread(target=boom)
        thread.start()
        thread.join()
        err = capsys.readouterr().err
        assert SECRET not in err and "uncaught exception in a thread" in err

    def test_warnings_are_routed(self, capsys: pytest.CaptureFixture[str]) -> None:
        configure("info", "json")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn(f"deprecated '{SECRET}'", DeprecationWarning, stacklevel=1)
        err = capsys.readouterr().err
        assert "py.warnings" in err and SECRET not in err


class TestThrottle:
    def test_at_most_per_s_lines_then_the_count_of_skipped_ones(self) -> None:
        clock = FakeClock(100.0)
        throttle = Throttle(per_s=2, clock=clock)
        assert [throttle("e") for _ in range(5)] == [0, 0, None, None, None]
        assert throttle("other") == 0
        clock.advance(1.0)
        assert throttle("e") == 3
        assert throttle("e") == 0


class TestScrubShortcut:
    """`scrub` skips the pattern for ASCII text without a marker: never a different result."""

    @pytest.mark.parametrize("text", [
        "plain words", "POST", "/v1/bots/{botId}/sessions/deactivate", "crm-service",
        f"x {JWT} y", f"BeArEr {KEY}", "Basic dXNlcjpwYXNz", "https://user:pw@host/x",
        "AUTHORIZATION: token", "Set-Cookie: a=b", "X-API-KEY=abc", "b'\\x00raw'", 'rb"x"',
        "kgw_abc", "eyJhbGciOi.eyJzdWIiOi.sig", "ſet-cookie: a=b", "baſic abc",
        "x-api-\u212aey: v", "Bearer\u00a0abc"])
    def test_same_as_the_pattern(self, text: str) -> None:
        from gateway.logs import _SECRET_SHAPES, _replace

        assert scrub(text) == _SECRET_SHAPES.sub(_replace, text)

    def test_spelled_out_markers_are_the_markers(self) -> None:
        """`_has_marker` (spelled out for speed) finds each marker and nothing else."""
        from gateway.logs import _SHAPE_MARKERS, _has_marker

        for marker in _SHAPE_MARKERS:
            assert _has_marker(f"x{marker}y"), marker
        assert not _has_marker("post /v1/bots/{botid}/sessions/deactivate crm-service 0.5")

    def test_random_text_same_as_the_pattern(self) -> None:
        from hypothesis import given, settings
        from hypothesis import strategies as st

        from gateway.logs import _SECRET_SHAPES, _replace

        pieces = st.sampled_from(["eyJ", "kgw_", "://", "@", "'", '"', "b'", "Bearer ", "bAsIc ",
                                  "authorization", "cookie", "api-key", ":", " ", "a", "Z",
                                  "0", ".", "-", "_", "\u017f", "\u212a"])

        @settings(max_examples=400, deadline=None)
        @given(st.lists(pieces | st.text(max_size=3), max_size=12).map("".join))
        def check(text: str) -> None:
            assert scrub(text) == _SECRET_SHAPES.sub(_replace, text)

        check()


def test_access_line_follows_another_structlog_set_up(capsys: pytest.CaptureFixture[str]) -> None:
    """A set-up other than configure()'s (a test's capture) gets the line, not a stale stream."""
    from structlog.testing import capture_logs

    configure("info", "json")
    with capture_logs() as logs:
        access("request", status=200)
    assert [e["event"] for e in logs] == ["request"]
    assert capsys.readouterr().err == ""
