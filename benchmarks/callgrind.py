"""Where counted instructions go, by C function: the self cost of each function in callgrind's
dumps, for `python -m benchmarks.instructions --by-function`.

The dumps of `benchmarks.instructions` say how many instructions a process executed in all;
this reads their cost lines to say in which C functions: the interpreter's eval loop, its
calls and frames, its dicts and attributes, allocation, or a C library such as orjson or
OpenSSL. A Python function's own work is the eval loop's, so what this shows is whether a gap
between two programs is a hotspot in C or the interpreter running more Python.

The callgrind format (valgrind's "Callgrind Format Specification"): `fn=`, `ob=` and the
like name the current function and object file, compressed to `(id)` after their first use;
a cost line is its positions (`positions:`, the line by default) and the event counts, `Ir`
first; the line after `calls=` is the inclusive cost of that call, which belongs to the callee
and is not the caller's own.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from pathlib import Path

HEAD_LINES = 40  # the header, where `desc: Trigger:` is
_NAMED = re.compile(r"\((\d+)\)(?: (.*))?")
# Each kind of name has its own ids: functions, files and object files.
_KINDS = {"fn": "function", "cfn": "function", "fl": "file", "fi": "file", "fe": "file",
          "cfi": "file", "cfl": "file", "ob": "object", "cob": "object"}

EVAL_LOOP = "bytecode (the interpreter's eval loop)"
CALLS = "calls, frames and coroutines"
ALLOCATION = "allocation and freeing"
LOOKUPS = "dicts, attributes and sets"
INTERPRETER = "the rest of the interpreter"
LIBRARIES = "C library or extension: "
OTHER_LIBRARIES = "C libraries and extensions, each within ±1,000"
SMALL_LIBRARY = 1_000  # instructions a request: a library that moved less gets no row of its own
# The interpreter's functions for calls and frames (CPython 3.11).
_CALL_FUNCTIONS = frozenset({
    "_PyFrame_Clear", "initialize_locals", "_PyFrame_Push", "_PyEvalFramePushAndInit",
    "_PyEval_Vector", "_PyThreadState_PopFrame", "_PyThreadState_PushFrame", "PyGen_am_send",
    "gen_dealloc", "gen_send_ex2", "gen_iternext", "_Py_CheckFunctionResult",
    "PyObject_Vectorcall", "PyObject_VectorcallMethod", "_PyObject_MakeTpCall",
    "_PyFunction_Vectorcall", "method_vectorcall", "_PyObject_Call", "PyObject_Call",
    "cfunction_vectorcall_FASTCALL", "cfunction_vectorcall_FASTCALL_KEYWORDS",
    "cfunction_vectorcall_O", "cfunction_vectorcall_NOARGS", "method_vectorcall_NOARGS",
    "method_vectorcall_O", "method_vectorcall_FASTCALL", "method_vectorcall_FASTCALL_KEYWORDS",
    "_PyArg_UnpackKeywords", "_PyStack_AsDict", "PyArg_UnpackTuple", "_PyTuple_FromArray"})
_ALLOCATION = re.compile(r"alloc|Malloc|Free|_GC_|GC_Del|GC_UnTrack|NewReference|memset|memcpy|"
                         r"memmove|free_keys|new_keys|_int_free|_int_malloc|^malloc$|^free$|"
                         r"_PyTrash")
_LOOKUPS = re.compile(r"dict|Dict|lookup|Lookup|[Gg]et[Aa]ttr|[Ss]et[Aa]ttr|_mro|^set_|"
                      r"_PyObject_GetMethod|insertdict|find_empty_slot")


def self_costs(dump: Path) -> Counter[str]:
    """Instructions executed in each function itself (its callees' not included), by
    ``function [object file]``."""
    names: dict[str, dict[str, str]] = {"function": {}, "file": {}, "object": {}}
    costs: Counter[str] = Counter()
    function = "?"
    library = "?"
    after_calls = False
    positions = 1  # columns before the first event's count (`positions: line` by default)
    with dump.open(errors="replace") as lines:
        for line in lines:
            first = line[:1]
            if first.isdigit() or first in "+-*":
                fields = line.split()
                if len(fields) > positions:
                    if after_calls:  # the call's inclusive cost: the callee's
                        after_calls = False
                    else:
                        costs[f"{function} [{library}]"] += int(fields[positions])
                continue
            if line.startswith("positions:"):
                positions = len(line.split()) - 1
                continue
            key, sep, rest = line.rstrip("\n").partition("=")
            if not sep:
                continue
            if key == "calls":
                after_calls = True
                continue
            kind = _KINDS.get(key)
            if kind is not None:
                table = names[kind]
                named = _NAMED.fullmatch(rest)
                if named is None:
                    value = rest
                else:
                    if named.group(2) is not None:
                        table[named.group(1)] = named.group(2)
                    value = table.get(named.group(1), "?")
                if key == "fn":
                    function = value
                elif key == "ob":
                    library = value.rsplit("/", 1)[-1]
    return costs


def counted_dumps(directory: Path, prefix: str) -> list[Path]:
    """The dumps `benchmarks.instructions` counts, of every process whose files start with
    `prefix`: those requested with `callgrind_control -d`, not the one written at exit
    (start-up and shutdown are in it)."""
    counted = []
    for dump in sorted(directory.glob(f"callgrind-{prefix}.*")):
        with dump.open(errors="replace") as lines:
            head = itertools.islice(lines, HEAD_LINES)
            if not any("Trigger: Program termination" in line for line in head):
                counted.append(dump)
    return counted


def dumped_self_costs(directory: Path, prefix: str) -> Counter[str]:
    """`self_costs` summed over the `counted_dumps`."""
    total: Counter[str] = Counter()
    for dump in counted_dumps(directory, prefix):
        total.update(self_costs(dump))
    return total


def category(key: str) -> str:
    """What kind of work a ``function [object file]`` of `self_costs` is."""
    function, _, library = key.rpartition(" [")
    library = library.rstrip("]")
    if not library.startswith("libpython"):
        return LIBRARIES + library.split(".")[0]
    function = function.split("'")[0]  # callgrind's recursion marks: f'2
    if function == "_PyEval_EvalFrameDefault":
        return EVAL_LOOP
    if function in _CALL_FUNCTIONS:
        return CALLS
    if _ALLOCATION.search(function):
        return ALLOCATION
    if _LOOKUPS.search(function):
        return LOOKUPS
    return INTERPRETER


def by_category(costs: Counter[str]) -> Counter[str]:
    kinds: Counter[str] = Counter()
    for key, cost in costs.items():
        kinds[category(key)] += cost
    return kinds


def report(base: Counter[str], other: Counter[str], requests: int, top: int, *,
           names: tuple[str, str] = ("contract minimum", "gateway")) -> str:
    """`other` against `base`, per request: by category, then the `top` functions whose own
    instructions grew most."""
    by_base = by_category(base)
    by_other = by_category(other)
    small = [kind for kind in set(by_base) | set(by_other) if kind.startswith(LIBRARIES)
             and abs(by_other[kind] - by_base[kind]) < SMALL_LIBRARY * requests]
    for kind in small:  # a library that moved less than that: one row for all of them
        by_base[OTHER_LIBRARIES] += by_base.pop(kind, 0)
        by_other[OTHER_LIBRARIES] += by_other.pop(kind, 0)
    gap = (sum(other.values()) - sum(base.values())) / requests
    lines = [(f"Instructions a deactivation by C function, {names[1]} against {names[0]} "
              "(each function's own instructions, callgrind; the sum of the cost lines):"), "",
             f"| kind of work | {names[0]} | {names[1]} | difference | share of the difference |",
             "|---|---:|---:|---:|---:|"]
    kinds = sorted(set(by_base) | set(by_other), key=lambda k: by_base[k] - by_other[k])
    for kind in kinds:
        difference = (by_other[kind] - by_base[kind]) / requests
        share = f"{difference / gap:.1%}" if gap else "–"
        lines.append(f"| {kind} | {by_base[kind] / requests:,.0f} | "
                     f"{by_other[kind] / requests:,.0f} | {difference:+,.0f} | {share} |")
    lines.append(f"| all | {sum(base.values()) / requests:,.0f} | "
                 f"{sum(other.values()) / requests:,.0f} | {gap:+,.0f} | 100.0% |")
    lines += ["", f"The {top} functions whose own instructions a deactivation grew most:", "",
              f"| function [object file] | kind | {names[0]} | {names[1]} | difference |",
              "|---|---|---:|---:|---:|"]
    grown = sorted(set(base) | set(other), key=lambda k: base[k] - other[k])[:top]
    for key in grown:
        lines.append(f"| `{key}` | {category(key)} | {base[key] / requests:,.0f} | "
                     f"{other[key] / requests:,.0f} | {(other[key] - base[key]) / requests:+,.0f} |")
    return "\n".join(lines) + "\n"
