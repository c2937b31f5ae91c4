"""The audit chain: what a record's hash covers, and the check of a run of files against it.

The canonical form of a record is its JSON without the ``hash`` key (so ``prev`` is inside it),
keys sorted, no whitespace, non-ASCII characters kept as they are::

    canonical = json.dumps(record_without_hash, sort_keys=True, separators=(",", ":"),
                           ensure_ascii=False)
    hash = sha256((prev + canonical).encode("utf-8")).hexdigest()

With a chain key the hash is ``HMAC-SHA256(key, prev + canonical)`` in hex, and the first record
of every file carries ``"chain": "hmac-sha256"`` (inside the canonical form): a file is keyed or
plain as a whole. Whoever can write the file but lacks the key cannot recompute the hashes.

On disk a line is the canonical form with ``hash`` added last (`log._line`): each record is
encoded once, and its keys are in sorted order. The first record's ``prev`` is 64 zeros.
Writing the chain is `log.py`'s; this module computes and checks it, against anchors
(`anchors.py`) too when given.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway import jsoncodec
from gateway.audit.anchors import Anchor, AnchorCheck
from gateway.audit.files import error_reason

ZERO_HASH = "0" * 64
CHAIN_FIELD = "chain"  # in the first record of every keyed file
HMAC_CHAIN = "hmac-sha256"


class ChainKey:
    """The HMAC key of a keyed chain; never shown by `repr` or `str`."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        if not key:
            raise ValueError("a chain key must not be empty")
        self._key = key

    def digest(self, data: bytes) -> str:
        return hmac.new(self._key, data, hashlib.sha256).hexdigest()

    def __repr__(self) -> str:
        return "ChainKey('**********')"

    __str__ = __repr__


def canonical(record: Mapping[str, Any]) -> str:
    """The text the chain hash covers: the record without ``hash``, keys sorted, compact."""
    body = record if "hash" not in record else {k: v for k, v in record.items() if k != "hash"}
    return jsoncodec.canonical(body)  # byte-identical to the json.dumps above, faster


def chain_hash(prev: str, canonical_text: str, key: ChainKey | None = None) -> str:
    data = (prev + canonical_text).encode("utf-8")
    return hashlib.sha256(data).hexdigest() if key is None else key.digest(data)


def chain_digest(prev: str, canonical_bytes: bytes, key: ChainKey | None = None) -> str:
    """`chain_hash` of a canonical form already UTF-8 encoded (`prev` is ASCII hex)."""
    data = prev.encode("ascii") + canonical_bytes
    return hashlib.sha256(data).hexdigest() if key is None else key.digest(data)


def keyed(record: Mapping[str, Any]) -> bool:
    """True when `record`, the first of its file, starts a keyed file."""
    return record.get(CHAIN_FIELD) == HMAC_CHAIN


def mark(record: dict[str, Any], first_keyed: bool) -> None:
    """Gives `record` ``chain`` when it starts a keyed file, and takes it away otherwise; in
    place, so that the writer's caller gets the record written."""
    if first_keyed:
        record[CHAIN_FIELD] = HMAC_CHAIN
    elif CHAIN_FIELD in record:
        del record[CHAIN_FIELD]


def continues(first_line: bytes, last_line: bytes, key: ChainKey | None) -> bool:
    """True when records written with `key` (or none) may go on in the file whose first and
    last lines these are: the same mode, and for a keyed file the same key."""
    first, last = _loaded(first_line), _loaded(last_line)
    if key is None or not keyed(first):
        return key is None and not keyed(first)
    prev, digest = last.get("prev"), last.get("hash")
    return isinstance(prev, str) and digest == chain_hash(prev, canonical(last), key)


def _loaded(line: bytes) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


@dataclass(frozen=True, slots=True)
class VerifyReport:
    ok: bool  # every record's hash checked, and nothing wrong
    records: int  # records found intact before the first break (all of them when no break)
    files: int  # files read, up to and including the one with the break
    error: str | None = None  # the first break: "<path>:<line>: <what is wrong>"
    unchecked: int = 0  # keyed records whose hash could not be checked: no key was given
    anchors: int = 0  # anchors that matched a record


def verify_files(paths: Sequence[Path | str], *, keys: Sequence[ChainKey] = (),
                 anchors: Sequence[Anchor] = ()) -> VerifyReport:
    """Check the chain and the seq order over `paths`, in the order given (oldest first).

    With `keys`, keyed files are checked with whichever key fits each, a plain file may only
    come before the first keyed one, and there must be one. With `anchors`, those naming this
    log (by file name) must each agree with the record of their seq."""
    if not paths:
        return VerifyReport(ok=False, records=0, files=0, error="no audit files given")
    chain = _Chain(keys=tuple(keys), anchors=AnchorCheck(anchors, Path(paths[-1])))
    for count, path in enumerate(paths, start=1):
        error = _verify_file(Path(path), chain)
        if error is not None:
            return chain.report(count, error)
    return chain.report(len(paths), chain.finish(Path(paths[-1])))


class _Break(Exception):
    """What is wrong with one line of a chain."""


@dataclass(slots=True)
class _Chain:
    keys: tuple[ChainKey, ...]
    anchors: AnchorCheck
    seq: int = 0
    prev: str = ZERO_HASH
    records: int = 0
    unchecked: int = 0
    seen_keyed: bool = False
    file_key: ChainKey | None = None  # the key of the current keyed file
    file_keyed: bool = False

    def start_file(self, first: dict[str, Any]) -> None:
        if CHAIN_FIELD in first and not keyed(first):
            raise _Break(f"unknown chain {first[CHAIN_FIELD]!r}")
        self.file_keyed, self.file_key = keyed(first), None
        if self.file_keyed:
            self.seen_keyed = True
            self.file_key = self._key_for(first)
        elif self.keys and self.seen_keyed:
            raise _Break("a plain (unkeyed) file after a keyed one: rewritten, or the chain "
                         "key was turned off")

    def advance(self, record: dict[str, Any]) -> None:
        seq, prev, digest = record.get("seq"), record.get("prev"), record.get("hash")
        if not isinstance(prev, str) or not isinstance(digest, str):
            raise _Break("prev or hash missing")
        if not self.file_keyed or self.file_key is not None:
            if digest != chain_hash(prev, canonical(record), self.file_key):
                raise _Break("hash mismatch")
        else:
            self.unchecked += 1
        if type(seq) is not int or seq != self.seq + 1:
            raise _Break(f"seq {seq} after {self.seq}" if self.seq else f"seq {seq}, expected 1")
        if prev != self.prev:
            first = "prev of the first record is not 64 zeros"
            raise _Break("prev does not match the previous hash" if self.seq else first)
        problem = self.anchors.check(seq, digest)
        if problem is not None:
            raise _Break(problem)
        self.seq, self.prev, self.records = seq, digest, self.records + 1

    def finish(self, path: Path) -> str | None:
        if self.keys and not self.seen_keyed:
            return (f"{path}: a chain key was given but no file is keyed (no "
                    f'"{CHAIN_FIELD}": "{HMAC_CHAIN}"): rewritten, or written without a key')
        problem = self.anchors.finish(self.seq)
        return None if problem is None else f"{path}: {problem}"

    def report(self, files: int, error: str | None) -> VerifyReport:
        ok = error is None and not self.unchecked
        return VerifyReport(ok=ok, records=self.records, files=files, error=error,
                            unchecked=self.unchecked, anchors=self.anchors.matched)

    def _key_for(self, first: dict[str, Any]) -> ChainKey | None:
        prev = first.get("prev")
        if not self.keys or not isinstance(prev, str):
            return None
        text = canonical(first)
        for key in self.keys:
            if first.get("hash") == chain_hash(prev, text, key):
                return key
        raise _Break("hash mismatch (with every key given)")


def _verify_file(path: Path, chain: _Chain) -> str | None:
    """The first break in `path` as "<path>:<line>: <reason>", or None."""
    try:
        with path.open("rb") as lines:
            for number, line in enumerate(lines, start=1):
                try:
                    record = _parse_line(line)
                    if number == 1:
                        chain.start_file(record)
                    chain.advance(record)
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
