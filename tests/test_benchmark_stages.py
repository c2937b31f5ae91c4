"""`python -m benchmarks.stages`: the real gateway, timed from inside, under a paced load."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from benchmarks import floor, without
from benchmarks.stages import (
    COMMIT_MARKS,
    FSYNC,
    MARKS,
    MINIMUM_MARKS,
    SCHED,
    STEPS,
    THREAD,
    main,
    minimum_source,
    run,
    sched_lines,
    summary,
    thread_sched,
)

FLOOR_SOURCE = Path(floor.__file__).read_text(encoding="utf-8")


def test_summary_gives_each_mark_its_offset_and_stage() -> None:
    samples = [{"start": 0.0, **{mark: (i + 1) * step for i, mark in enumerate(MARKS)}}
               for step in (1.0, 2.0, 3.0)]
    lines = summary(samples, [0.3, 0.5, 0.4])
    assert lines[1].split() == ["authenticated", "2.000", "3.000", "2.000"]
    assert lines[len(MARKS)].split()[-3:] == ["14.000", "21.000", "2.000"]  # answer ready
    assert lines[-1] == f"{THREAD}: p50 0.400 ms (3 commits)"


def test_the_fsync_calls_median_wall_and_cpu_follow_the_commits() -> None:
    lines = summary([], [0.3], None, [[150.0, 40.0], [170.0, 30.0], [900.0, 50.0]])
    assert lines[-2] == f"{THREAD}: p50 0.300 ms (1 commits)"
    assert lines[-1] == f"{FSYNC}: 170.0 / 40.0 (3 calls)"
    assert FSYNC not in "\n".join(summary([], [0.3]))


def test_each_threads_schedstat_is_read_and_a_vanished_one_passed_over(tmp_path: Path) -> None:
    for tid, text in ((41, "3000000 20000 7\n"), (42, "1000 2000 3\n"), (43, "garbled\n")):
        (tmp_path / "40" / "task" / str(tid)).mkdir(parents=True)
        (tmp_path / "40" / "task" / str(tid) / "schedstat").write_text(text)
    (tmp_path / "40" / "task" / "44").mkdir()  # ended while read: no schedstat left
    assert thread_sched(40, tmp_path) == {41: (3000000, 20000, 7), 42: (1000, 2000, 3)}
    assert thread_sched(99, tmp_path) == {}


def test_the_schedulers_account_is_per_request_loop_thread_and_the_others() -> None:
    before = {10: (1_000_000, 0, 5), 11: (0, 0, 0), 12: (500_000, 100_000, 2)}
    after = {10: (5_000_000, 40_000, 13), 11: (1_000_000, 200_000, 6),
             12: (700_000, 100_000, 4), 13: (9_000_000, 0, 9)}  # 13: started meanwhile
    lines = sched_lines(before, after, 10, requests=2)
    assert lines[0].startswith(SCHED)
    assert lines[1].split() == ["event", "loop", "thread", "2.000", "0.020", "4.0"]
    assert lines[2].split() == ["other", "threads", "0.600", "0.100", "4.0"]
    assert sched_lines({}, after, 10, 2) == [] and sched_lines(before, after, 10, 0) == []


def test_a_mark_never_reached_is_shown_as_missing_and_skipped() -> None:
    lines = summary([{"start": 0.0, "authenticated": 1.0, "answer ready": 5.0}], [])
    assert lines[2].split() == ["body", "read", "–", "–", "–"]
    assert lines[-1].split()[-1] == "4.000"  # answer ready's stage: from authenticated


def test_the_requested_records_commit_is_tabled_from_deactivation_begun() -> None:
    marks = {"start": 0.0, "deactivation begun": 1.0, "requested record durable": 11.0}
    timed = {**marks, **{mark: 2.0 + i for i, mark in enumerate(COMMIT_MARKS)}}
    lines = summary([timed, dict(marks)], [])
    head = lines.index("the requested record's commit (1 deactivations), from deactivation "
                       "begun:")
    rows = [line.split() for line in lines[head + 1:]]
    assert rows[0][-3:] == ["2.000", "2.000", "1.000"]  # path looked at
    assert rows[6][-3:] == ["8.000", "8.000", "1.000"]  # loop resumed by the thread
    assert rows[7][-3:] == ["11.000", "11.000", "3.000"]  # requested record durable
    assert "requested record's commit" not in "\n".join(summary([dict(marks)], []))


def test_the_threads_steps_show_wall_cpu_and_warm_times() -> None:
    thread = {"path looked at": {"wall": [20.0, 30.0, 10.0], "cpu": [19.0, 9.0, 29.0],
                                 "warm": 2.5},
              "records chained": {"wall": [5.0], "cpu": [4.0], "warm": None},
              "never": {"wall": [], "cpu": [], "warm": None}}
    lines = summary([], [], thread)
    assert lines[-3] == STEPS
    assert lines[-2].split() == ["path", "looked", "at", "20.0", "19.0", "2.5"]
    assert lines[-1].split() == ["records", "chained", "5.0", "4.0", "–"]
    assert STEPS not in summary([], [], {})


def assert_commit_timed_in_order(text: str) -> None:
    """The requested record's commit: each mark after the one before, durable last."""
    commit = text.split("the requested record's commit (", 1)[1].split(SCHED, 1)[0]
    table, steps = commit.split(STEPS)
    table = table.splitlines()[1:]
    offsets = [float(line.split()[-3]) for line in table]
    assert len(offsets) == len(COMMIT_MARKS) + 1, text
    assert len(steps.splitlines()[1:]) == 2, text
    for line in steps.splitlines()[1:]:  # wall, CPU of the thread, warm: all measured
        wall, cpu, warm = (float(x) for x in line.split()[-3:])
        assert wall > 0 and cpu >= 0 and warm > 0, text
    assert offsets == sorted(offsets) and offsets[0] > 0, text


def assert_every_mark_timed_in_order(text: str) -> None:
    """50 answered, every mark's offset given and in the marks' order, the commits timed."""
    assert re.search(r": 50 answered, 0 failed; client p50 [\d.]+ ms", text), text
    offsets = []
    for mark in MARKS:
        found = re.search(rf"^{re.escape(mark)}\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", text,
                          re.MULTILINE)
        assert found, f"{mark} missing in:\n{text}"
        offsets.append(float(found[1]))
    assert offsets == sorted(offsets) and offsets[0] > 0, text
    assert re.search(rf"{re.escape(THREAD)}: p50 [\d.]+ ms \(\d+ commits\)", text), text
    # Every fsync call of the run, timed in the served process (at least one a deactivation).
    found = re.search(rf"^{re.escape(FSYNC)}: ([\d.]+) / ([\d.]+) \((\d+) calls\)$", text,
                      re.MULTILINE)
    assert found and float(found[1]) > 0 and int(found[3]) >= 50, text
    # The scheduler's account: the event loop thread ran at least once a deactivation.
    loop = re.search(r"^event loop thread\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", text, re.MULTILINE)
    assert loop and float(loop[1]) > 0 and float(loop[3]) >= 1, text
    assert re.search(r"^other threads\s+[\d.]+\s+[\d.]+\s+[\d.]+$", text, re.MULTILINE), text


def test_every_mark_of_a_real_deactivation_is_timed_in_order() -> None:
    text = run(seconds=1.0, rate=50)
    assert text.startswith("gateway, 1 worker"), text
    assert_every_mark_timed_in_order(text)
    assert_commit_timed_in_order(text)


def test_the_gateway_without_its_parts_is_timed_at_the_same_marks() -> None:
    parts = ",".join(without.PARTS)
    text = run(seconds=1.0, rate=50, parts=parts)
    assert text.startswith("gateway without access-line + metrics + connection-guard + "
                           "caller-key + breaker + audit-path-look + terminal-record-wait, "
                           "1 worker"), text
    assert_every_mark_timed_in_order(text)
    assert_commit_timed_in_order(text)


@pytest.mark.parametrize(("argv", "said"), [
    (["--without", "nope"], "unknown part(s) nope"),
    (["--without", "metrics", "--target", "minimum"], "applies to the gateway only")])
def test_a_part_it_cannot_remove_is_refused(argv: list[str], said: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2 and said in capsys.readouterr().err


def test_the_contract_minimum_is_timed_at_the_same_marks() -> None:
    text = run(seconds=1.0, rate=50, target="minimum")
    assert text.startswith("contract minimum, 1 worker"), text
    assert_every_mark_timed_in_order(text)


def test_the_minimums_marks_go_before_the_lines_they_name() -> None:
    source = minimum_source(FLOOR_SOURCE)
    for line, mark in MINIMUM_MARKS:
        indent = line[:len(line) - len(line.lstrip())]
        assert f"{indent}_mark({mark!r})\n{line}" in source
    assert "_commit_done(_began)" in source
    compile(source, "floor.py", "exec")


def test_a_line_the_minimum_no_longer_has_stops_the_run() -> None:
    line = MINIMUM_MARKS[0][0]
    with pytest.raises(ValueError, match="expected exactly one line"):
        minimum_source(FLOOR_SOURCE.replace(line, ""))
