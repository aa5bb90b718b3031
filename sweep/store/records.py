"""Records on disk: one JSON file per finished point, written atomically; baselines (the gathered table:
sweep/store/table.py).

A point's key is a hash of everything that determines its result (model file hash, container, text hash, slice,
n_ctx, target, format), so a record can be reused by any later sweep that asks for the same point -- that is how
a killed sweep resumes -- and a half-written file can never be read as a record (write to a temporary file, then
rename, which is atomic on POSIX).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np

from .files import atomic_write_bytes, temporary_beside

RECORD_FILE = "record.json"
DONE = ("ok", "no-op", "diverged")  # a "failed" point is retried when the sweep runs again
RECORD_SCHEMA = 2  # 2: `n_chunks` became `n_windows` (config and records); older records are not reused
KEY_CHARS = 20  # hex digits of a key: 80 bits, no collision among any number of points a store will hold


def point_key(**fields) -> str:
    blob = json.dumps({"schema": RECORD_SCHEMA, **fields}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:KEY_CHARS]


def _json_default(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    return str(x)


def write_record(path: Path, record: dict) -> None:
    atomic_write_bytes(path, json.dumps(record, indent=1, default=_json_default, allow_nan=True).encode())


def read_record(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class Store:
    """Finished points (`points/<key>.json`) and baseline scores (`baselines/<key>.npz`), shared by sweeps."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def point(self, key: str) -> dict | None:
        rec = read_record(self.root / "points" / f"{key}.json")
        return rec if rec and rec.get("status") in DONE else None

    def put_point(self, key: str, record: dict) -> None:
        write_record(self.root / "points" / f"{key}.json", record)

    def baseline(self, key: str) -> dict[str, np.ndarray] | None:
        """A stored baseline: its per-token arrays, and its raw logits memory-mapped (read one window at a time)."""
        meta, logits = self.root / "baselines" / f"{key}.npz", self.root / "baselines" / f"{key}.logits.npy"
        try:
            with np.load(meta) as f:
                arrays = dict(f)
            if logits.exists():
                arrays["logits"] = np.load(logits, mmap_mode="r")
            return arrays
        except (OSError, ValueError, KeyError):
            return None

    def baseline_logits_file(self, key: str, shape: tuple[int, ...]) -> tuple[np.ndarray, Path]:
        """A writable memmap for a baseline's logits, in a temporary file until `put_baseline` renames it."""
        tmp = temporary_beside(self.root / "baselines" / f"{key}.logits.npy")
        return np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape), tmp

    def put_baseline(self, key: str, arrays: dict[str, np.ndarray], logits_tmp: Path | None = None) -> None:
        if logits_tmp is not None:
            os.replace(logits_tmp, self.root / "baselines" / f"{key}.logits.npy")
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        atomic_write_bytes(self.root / "baselines" / f"{key}.npz", buf.getvalue())  # last: marks it complete
