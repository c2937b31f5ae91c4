"""The files of `kore-gateway deactivate`: the input CSV (botId,userId[,channel]) and the
results CSV (botId,userId,channel,status,code,requestId) that makes a run resumable.

Owns the columns, the row outcomes and the rule of which rows a rerun skips; leaves sending
to `bulk.py`.
"""

from __future__ import annotations

import csv
import fcntl
import io
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

INPUT_COLUMNS = ("botId", "userId", "channel")
REQUIRED_COLUMNS = ("botId", "userId")
RESULT_COLUMNS = ("botId", "userId", "channel", "status", "code", "requestId")
SUCCEEDED, FAILED, NOT_DONE = "succeeded", "failed", "not_done"
DONE = frozenset({SUCCEEDED, FAILED})  # a rerun skips these rows


class BulkError(Exception):
    """A usage or input problem of the bulk command: nothing was sent (exit 2)."""


@dataclass(frozen=True, slots=True)
class Row:
    bot_id: str
    user_id: str
    channel: str | None
    line: int  # line in the input CSV (1 for a single user)

    @property
    def key(self) -> tuple[str, str, str]:
        return self.bot_id, self.user_id, self.channel or ""


@dataclass(frozen=True, slots=True)
class Result:
    row: Row
    status: str  # SUCCEEDED, FAILED or NOT_DONE
    code: str  # "ok", the gateway's error code, "connection_error" or "interrupted"
    request_id: str

    def fields(self) -> list[str]:
        return [*self.row.key, self.status, self.code, self.request_id]



def read_rows(path: Path) -> list[Row]:
    """The rows of a CSV with header botId,userId[,channel]; raises BulkError naming the problem."""
    try:
        with path.open(encoding="utf-8-sig", newline="") as fh:
            return list(_rows(csv.reader(fh), path))
    except OSError as exc:
        raise BulkError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise BulkError(f"{path}: not UTF-8 text") from None
    except csv.Error as exc:
        raise BulkError(f"{path}: not a valid CSV file: {exc}") from None


def _rows(reader: Iterator[list[str]], path: Path) -> Iterator[Row]:
    header = [name.strip() for name in next(reader, [])]
    _check_header(header, path)
    index = {name: header.index(name) for name in header}
    for fields in reader:
        if not any(f.strip() for f in fields):
            continue  # blank line
        line = reader.line_num  # type: ignore[attr-defined]
        if len(fields) != len(header):
            raise BulkError(f"{path}:{line}: {len(fields)} field(s), the header has "
                            f"{len(header)}")
        values = {name: fields[i] for name, i in index.items()}
        for name in REQUIRED_COLUMNS:
            if not values[name].strip():
                raise BulkError(f"{path}:{line}: {name} is empty")
        channel = values.get("channel", "").strip()
        yield Row(values["botId"].strip(), values["userId"], channel or None, line)


def _check_header(header: list[str], path: Path) -> None:
    expected = "the header must be botId,userId[,channel]"
    if not any(header):
        raise BulkError(f"{path}: empty file; {expected}")
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise BulkError(f"{path}: missing column {', '.join(missing)}; {expected}")
    unknown = [c for c in header if c not in INPUT_COLUMNS]
    if unknown:
        raise BulkError(f"{path}: unknown column {unknown[0]!r}; {expected}")
    if len(set(header)) != len(header):
        raise BulkError(f"{path}: a column appears twice; {expected}")


def unique(rows: Sequence[Row]) -> tuple[list[Row], int]:
    """The rows without repeats of the same (botId, userId, channel), and how many went."""
    seen: set[tuple[str, str, str]] = set()
    out = []
    for row in rows:
        if row.key not in seen:
            seen.add(row.key)
            out.append(row)
    return out, len(rows) - len(out)


# --- the results file -----------------------------------------------------------------------

class ResultsFile:
    """The results CSV: earlier outcomes (to resume), then one appended, flushed line per row.

    Each line is written with one `write()` and flushed, so a crash loses at most the rows in
    flight; a partial last line left by a killed run is cut off when the file is opened.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.outcomes: dict[tuple[str, str, str], str] = {}
        self._fh: IO[str] | None = None

    def open(self) -> None:
        try:
            fh = self.path.open("a+", encoding="utf-8", newline="")
        except OSError as exc:
            raise BulkError(f"{self.path}: cannot open the results file: "
                            f"{exc.strerror or exc}") from None
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            raise BulkError(f"{self.path}: the results file is in use by another run") from None
        self._fh = fh
        try:
            self._load()
        except BulkError:
            self.close()
            raise

    def _load(self) -> None:
        assert self._fh is not None
        self._fh.seek(0)
        text = self._fh.read()
        if text and not text.endswith("\n"):
            kept = text[: text.rfind("\n") + 1]
            print(f"{self.path}: removed a partial last line left by an interrupted run",
                  file=sys.stderr)
            self._fh.truncate(len(kept.encode("utf-8")))
            text = kept
        if not text:
            self._write_line(list(RESULT_COLUMNS))
            return
        reader = csv.reader(io.StringIO(text, newline=""))
        if next(reader) != list(RESULT_COLUMNS):
            raise BulkError(f"{self.path}: not a results file (the header must be "
                            f"{','.join(RESULT_COLUMNS)})")
        for fields in reader:
            if len(fields) != len(RESULT_COLUMNS):
                raise BulkError(f"{self.path}:{reader.line_num}: expected "
                                f"{len(RESULT_COLUMNS)} fields")
            self.outcomes[(fields[0], fields[1], fields[2])] = fields[3]  # the last one wins

    def done(self, row: Row) -> str | None:
        """SUCCEEDED or FAILED when an earlier run finished this row, else None."""
        outcome = self.outcomes.get(row.key)
        return outcome if outcome in DONE else None

    def write(self, result: Result) -> None:
        self._write_line(result.fields())

    def _write_line(self, fields: list[str]) -> None:
        assert self._fh is not None, "ResultsFile.open() was not called"
        buffer = io.StringIO(newline="")
        csv.writer(buffer, lineterminator="\n").writerow(fields)
        self._fh.write(buffer.getvalue())
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None
