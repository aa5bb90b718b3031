"""A point's record, typed by the column registry (store/columns.py) and versioned: the one place records are written
and read.

A record is written twice by job.run_job (the store's `points/<key>.json` and the job's `record.json`), atomically
(write a temporary file, then rename: a half-written file is never read as a record), as one JSON object: its
columns in the order the point gave them, then `record_version`. Reading checks what writing guaranteed: the version,
every column known with its type, and every column that a point of its status always has. A record that fails any
check is said in one line (once per file and process) and read as no record -- its point is computed again when a
sweep asks for it, and it is left out of a table -- so a record of another version or a damaged one never becomes a
half row.

Versions: 2 (the first written with `record_version`; a record without the field and with `n_windows` was written by
the same code before the field existed, so it reads as 2); 1 named the windows scored `n_chunks`. The version is part
of every store key (store/records.point_key), so raising it computes every point again.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from ..files import atomic_write_bytes
from .columns import BY_NAME, STATUSES, Column, required

RECORD_VERSION = 2
RECORD_FILE = "record.json"
VERSION_FIELD = "record_version"


class RecordError(ValueError):
    """A record that is not one of this version: what is wrong with it, in words (one line, the predicate of "the
    record ...")."""


def _fits(value, column: Column) -> bool:
    if value is None:
        return column.nullable
    if column.type in ("str", "json"):
        return isinstance(value, str)
    if column.type == "bool":
        return isinstance(value, (bool, np.bool_))
    if isinstance(value, (bool, np.bool_)):
        return False
    if column.type == "int":
        return isinstance(value, (int, np.integer))
    if column.type == "float":
        return isinstance(value, (int, float, np.integer, np.floating))
    return isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)


def _checked(name: str, value):
    column = BY_NAME.get(name)
    if column is None or column.where != "record":
        raise RecordError(f"has a column {name!r} that a record does not have (store/columns.py)")
    if not _fits(value, column):
        raise RecordError(f"holds {value!r} ({type(value).__name__}) in column {name}, not "
                          f"{column.type}{' or null' if column.nullable else ''}")
    return value


class Record(Mapping):
    """One point's record: columns of the registry, each value of its column's type, in the order they were given.

    A mapping checked against the registry rather than a dataclass of ~100 optional fields: which columns a record
    has depends on its point (a MoE model's, a recipe's, the native container's, a failed one's), the readers index
    it by column name, and the order the point gives its columns is the order of the JSON file and of the table's
    columns, which differs by kind of point (a failed MoE point gives `status` before `expert`, a diverged point its
    ΔPPL and ΔNLL columns in another order, a weight no-op its window means): a dataclass would impose one order and
    change those files and tables. A TypedDict would check nothing at run time; this refuses an unknown column or a
    value of the wrong type where it is set, and `complete` a record without a column its status always has.
    """

    def __init__(self, **columns):
        self._values: dict = {}
        self.update(columns)

    def update(self, other: Mapping | None = None, /, **columns) -> Record:
        """Add or replace columns (checked), as dict.update; returns the record."""
        self._values.update({name: _checked(name, value) for name, value in {**(other or {}), **columns}.items()})
        return self

    def __getitem__(self, name: str):
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Record({self._values!r})"

    def missing(self) -> list[str]:
        """The columns a record of its status always has and this one lacks."""
        status = self._values.get("status")
        if status not in STATUSES:
            return ["status"]
        return [name for name in required(status) if name not in self._values]

    def complete(self) -> Record:
        if missing := self.missing():
            status = self._values.get("status")
            raise RecordError(f"lacks {', '.join(missing)}" + (f", which every {status} record has"
                                                                 if status in STATUSES else ""))
        return self

    def to_json(self) -> dict:
        """What the file holds: the columns, then the version."""
        return {**self._values, VERSION_FIELD: RECORD_VERSION}

    @classmethod
    def from_json(cls, data: dict) -> Record:
        """A record as read from a file; RecordError says in words why it is not one of this version."""
        data = dict(data)
        version = data.pop(VERSION_FIELD, None)
        if version is None:  # written before the field: version 2 named the windows scored n_windows, 1 n_chunks
            version = 1 if "n_chunks" in data else RECORD_VERSION
        if version != RECORD_VERSION:
            newer = isinstance(version, int) and version > RECORD_VERSION
            raise RecordError(f"is of record version {version}, " + (f"written by a newer sweep (this one reads "
                              f"version {RECORD_VERSION})" if newer else f"this sweep reads version {RECORD_VERSION}"))
        unknown = [name for name in data if name not in BY_NAME or BY_NAME[name].where != "record"]
        if unknown:
            raise RecordError(f"has columns this version does not know ({', '.join(unknown)})")
        return cls(**data).complete()


def _json_default(x):
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    return str(x)


def write_json(path: Path, data) -> None:
    """Any JSON file of the store (a record: `write_record`), atomically."""
    atomic_write_bytes(path, json.dumps(data, indent=1, default=_json_default, allow_nan=True).encode())


def write_record(path: Path, record: Record) -> None:
    """A complete record (RecordError: one that lacks a column its status always has: a bug, said before writing)."""
    write_json(path, record.complete().to_json())


_said: set[Path] = set()
RECOMPUTED = "its point is computed again"  # what a sweep does with a record it cannot use
LEFT_OUT = "left out of the table: run its sweep again to compute its point again"  # what a table does


def read_json(path: Path, then: str = RECOMPUTED):
    """A JSON file of the store, or None: missing, or unreadable (said once per process in one line, ending with
    what happens `then`)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        _refused(path, f"cannot be read ({e.strerror or type(e).__name__})", then)
        return None
    try:
        return json.loads(text)
    except ValueError as e:
        _refused(path, f"cannot be read ({f'not JSON: {str(e)[:80]}' if text.strip() else 'empty'})", then)
        return None


def read_record(path: Path, then: str = RECOMPUTED) -> Record | None:
    """The record at `path`, or None: missing, unreadable, or not a complete record of this version (said once per
    process in one line: what is wrong, and what happens `then`)."""
    data = read_json(path, then)
    if data is None:
        return None
    try:
        if not isinstance(data, dict):
            raise RecordError(f"cannot be read (a JSON {type(data).__name__}, not a record)")
        return Record.from_json(data)
    except RecordError as e:
        _refused(path, str(e), then)
        return None


def _refused(path: Path, why: str, then: str) -> None:
    """Say once per process, in one line, that the file at `path` is not read, why, and what happens `then`."""
    if path not in _said:
        _said.add(path)
        print(f"warning: the stored record {path} {why}: {then}", file=sys.stderr, flush=True)
