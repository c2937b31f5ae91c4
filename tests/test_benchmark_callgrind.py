"""`benchmarks.callgrind`: each function's own instructions read from callgrind's dumps, their
kind of work, and the gateway's against the contract minimum's (`instructions --by-function`)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from benchmarks.callgrind import (
    ALLOCATION,
    CALLS,
    EVAL_LOOP,
    INTERPRETER,
    LOOKUPS,
    OTHER_LIBRARIES,
    category,
    dumped_self_costs,
    report,
    self_costs,
)

# Two object files, names compressed after their first use (functions, files and object files
# each with ids of their own), a call whose inclusive cost (the line after `calls=`) is the
# callee's, and a function named again by its id alone after a file took that id.
DUMP = """# callgrind format
version: 1
creator: callgrind-3.19.0
desc: Trigger: Client Request: dump
positions: line
events: Ir
summary: 1173

ob=(1) /usr/lib/libpython3.11.so.1.0
fl=(1) Python/ceval.c
fn=(1) _PyEval_EvalFrameDefault
10 500
+2 300
cob=(2) /venv/site-packages/orjson.cpython-311-x86_64-linux-gnu.so
cfl=(2) ???
cfn=(2) dumps
calls=3 0
+1 9000
* 20
ob=(2)
fl=(2)
fn=(2)
0 150
ob=(1)
fl=(3) Python/frame.c
fn=(3) _PyFrame_Clear
5 100
fl=(4) Objects/funcobject.c
fn=(1)
12 100
fn=(4) _PyEval_EvalFrameDefault'2
3 1
fi=(3) Include/internal/pycore_frame.h
fn=(3)
6 2
totals: 1173
"""


def test_each_function_keeps_its_own_instructions_not_its_callees(tmp_path: Path) -> None:
    dump = tmp_path / "callgrind-gateway.7.1"
    dump.write_text(DUMP)
    costs = self_costs(dump)
    assert costs == {
        "_PyEval_EvalFrameDefault [libpython3.11.so.1.0]": 920,  # 500 + 300 + 20 + 100
        "dumps [orjson.cpython-311-x86_64-linux-gnu.so]": 150,  # not the 9,000 of the call
        "_PyFrame_Clear [libpython3.11.so.1.0]": 102,  # by its id, after a file took id 3
        "_PyEval_EvalFrameDefault'2 [libpython3.11.so.1.0]": 1,
    }
    assert sum(costs.values()) == 1173  # the dump's own totals line


def test_the_dump_written_at_exit_is_left_out(tmp_path: Path) -> None:
    (tmp_path / "callgrind-gateway.7.1").write_text(DUMP)
    (tmp_path / "callgrind-gateway.8.1").write_text(DUMP)  # a second process
    (tmp_path / "callgrind-gateway.7").write_text(
        DUMP.replace("Client Request: dump", "Program termination"))
    (tmp_path / "callgrind-floor_minimum.9.1").write_text(DUMP)
    costs = dumped_self_costs(tmp_path, "gateway")
    assert sum(costs.values()) == 2 * 1173
    assert costs["dumps [orjson.cpython-311-x86_64-linux-gnu.so]"] == 300


def test_kinds_of_work() -> None:
    assert category("_PyEval_EvalFrameDefault'2 [libpython3.11.so.1.0]") == EVAL_LOOP
    assert category("_PyFrame_Clear [libpython3.11.so.1.0]") == CALLS
    assert category("initialize_locals [libpython3.11.so.1.0]") == CALLS
    assert category("_PyObject_Malloc [libpython3.11.so.1.0]") == ALLOCATION
    assert category("tupledealloc [libpython3.11.so.1.0]") == ALLOCATION
    assert category("_Py_dict_lookup [libpython3.11.so.1.0]") == LOOKUPS
    assert category("_PyType_Lookup [libpython3.11.so.1.0]") == LOOKUPS
    assert category("PyUnicode_Contains [libpython3.11.so.1.0]") == INTERPRETER
    assert category("dumps [orjson.cpython-311-x86_64-linux-gnu.so]") == (
        "C library or extension: orjson")
    assert category("__memcpy_avx_unaligned_erms [libc.so.6]") == "C library or extension: libc"


def test_report_shares_the_difference_and_lists_what_grew_most() -> None:
    base = Counter({"_PyEval_EvalFrameDefault [libpython3.11.so.1.0]": 200_000,
                    "_PyFrame_Clear [libpython3.11.so.1.0]": 10_000,
                    "dumps [orjson.cpython-311-x86_64-linux-gnu.so]": 15_000,
                    "md_get [_multidict.cpython-311-x86_64-linux-gnu.so]": 5_000})
    other = Counter({"_PyEval_EvalFrameDefault [libpython3.11.so.1.0]": 260_000,
                     "_PyFrame_Clear [libpython3.11.so.1.0]": 30_000,
                     "dumps [orjson.cpython-311-x86_64-linux-gnu.so]": 15_500,
                     "md_get [_multidict.cpython-311-x86_64-linux-gnu.so]": 25_000})
    text = report(base, other, requests=10, top=2)
    # per request: +6,000 in the eval loop, +2,000 in calls, +2,000 in _multidict, +50 orjson
    assert "| bytecode (the interpreter's eval loop) | 20,000 | 26,000 | +6,000 | 59.7% |" in text
    assert "| calls, frames and coroutines | 1,000 | 3,000 | +2,000 | 19.9% |" in text
    assert "| C library or extension: _multidict | 500 | 2,500 | +2,000 | 19.9% |" in text
    assert f"| {OTHER_LIBRARIES} | 1,500 | 1,550 | +50 | 0.5% |" in text  # orjson, merged
    assert "| all | 23,000 | 33,050 | +10,050 | 100.0% |" in text
    listed = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(listed) == 2
    assert listed[0].startswith("| `_PyEval_EvalFrameDefault [libpython3.11.so.1.0]` | ")
    assert listed[0].endswith("| +6,000 |")


def test_instructions_refuses_a_list_it_would_not_bound() -> None:
    import pytest

    from benchmarks.instructions import main

    with pytest.raises(SystemExit) as refused:
        main(["--by-function", "5000"])
    assert refused.value.code == 2


def test_a_dump_with_two_position_columns_is_read_by_its_header(tmp_path: Path) -> None:
    """`--dump-instr=yes` writes `positions: instr line`: the count is the third column."""
    dump = tmp_path / "callgrind-gateway.7.1"
    dump.write_text("positions: instr line\nevents: Ir\nob=(1) libpython3.11.so.1.0\n"
                    "fn=(1) _PyFrame_Clear\n0x4a10 12 7\n+3 +1 5\n")
    assert self_costs(dump) == {"_PyFrame_Clear [libpython3.11.so.1.0]": 12}
