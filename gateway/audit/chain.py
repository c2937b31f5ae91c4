"""The audit chain: what a record's hash covers, and the check of a run of files against it.

The canonical form of a record is its JSON without the ``hash`` key (so ``prev`` is inside it),
keys sorted, no whitespace, non-ASCII characters kept as they are::

    canonical = json.dumps(record_without_hash, sort_keys=True, separators=(",", ":"),
                           ensure_ascii=False)
    hash = sha256((prev + canonical).encode("utf-8")).hexdigest()

The key order on disk (ts, seq, event, …, prev, hash) is for human readers only: the hash never
depends on it. The first record's ``prev`` is 64 zeros. Writing the chain is `audit.py`'s; this
module only computes and checks it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway import jsoncodec
from gateway.audit.files import error_reason

ZERO_HASH = "0" * 64


def canonical(record: Mapping[str, Any]) -> str:
    """The text the chain hash covers: the record without ``hash``, keys sorted, compact."""
    body = record if "hash" not in record else {k: v for k, v in record.items() if k != "hash"}
    return jsoncodec.canonical(body)  # byte-identical to the json.dumps above, faster


def chain_hash(prev: str, canonical_text: str) -> str:
    return hashlib.sha256((prev + canonical_text).encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class VerifyReport:
    ok: bool
    records: int  # records found intact before the first break (all of them when ok)
    files: int  # files read, up to and including the one with the break
    error: str | None = None  # the first break: "<path>:<line>: <what is wrong>"


def verify_files(paths: Sequence[Path | str]) -> VerifyReport:
    """Check the chain and the seq order over `paths`, in the order given (oldest first)."""
    if not paths:
        return VerifyReport(ok=False, records=0, files=0, error="no audit files given")
    chain = _Chain()
    for count, path in enumerate(paths, start=1):
        error = _verify_file(Path(path), chain)
        if error is not None:
            return VerifyReport(ok=False, records=chain.records, files=count, error=error)
    return VerifyReport(ok=True, records=chain.records, files=len(paths))


class _Break(Exception):
    """What is wrong with one line of a chain."""


@dataclass(slots=True)
class _Chain:
    seq: int = 0
    prev: str = ZERO_HASH
    records: int = 0

    def advance(self, record: dict[str, Any]) -> None:
        seq, prev, digest = record.get("seq"), record.get("prev"), record.get("hash")
        if not isinstance(prev, str) or not isinstance(digest, str):
            raise _Break("prev or hash missing")
        if digest != chain_hash(prev, canonical(record)):
            raise _Break("hash mismatch")
        if type(seq) is not int or seq != self.seq + 1:
            raise _Break(f"seq {seq} after {self.seq}" if self.seq else f"seq {seq}, expected 1")
        if prev != self.prev:
            first = "prev of the first record is not 64 zeros"
            raise _Break("prev does not match the previous hash" if self.seq else first)
        self.seq, self.prev, self.records = seq, digest, self.records + 1


def _verify_file(path: Path, chain: _Chain) -> str | None:
    """The first break in `path` as "<path>:<line>: <reason>", or None."""
    try:
        with path.open("rb") as lines:
            for number, line in enumerate(lines, start=1):
                try:
                    chain.advance(_parse_line(line))
                except _Break as brk:
                    return f"{path}:{number}: {brk}"
    except OSError as exc:
        return f"{path}: {error_reason(exc, path)}"
    return None


def _parse_line(line: bytes) -> dict[str, Any]:
    if not line.endswith(b"\n"):
        raise _Break("incomplete line (no newline at the end)")
    if not line.strip():
        raise _Break("blank line")
    try:
        record = json.loads(line, object_pairs_hook=_unique_keys)
    except ValueError as exc:
        raise _Break("not valid JSON") from exc
    if not isinstance(record, dict):
        raise _Break("not a JSON object")
    return record


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # A duplicate key would let other JSON readers see a value the hash never covered.
    record = dict(pairs)
    if len(record) != len(pairs):
        raise _Break("duplicate key")
    return record
