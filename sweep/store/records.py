"""Records on disk: one JSON file per finished point, written atomically; baselines; the gathered table.

A point's key is a hash of everything that determines its result (model file hash, container, text hash, slice,
n_ctx, target, format), so a record can be reused by any later sweep that asks for the same point -- that is how
a killed sweep resumes -- and a half-written file can never be read as a record (write to a temporary file, then
rename, which is atomic on POSIX).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import false_discovery_control

from ..files import atomic_write_bytes, temporary_beside
from ..scoring.metrics import METRICS

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


_said_unreadable: set[Path] = set()


def read_record(path: Path) -> dict | None:
    """The record at `path`, or None: missing, or unreadable (truncated, not JSON), which is said once per process
    in one line, since the point is then computed again."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        return _unreadable(path, e.strerror or type(e).__name__)
    try:
        rec = json.loads(text)
    except ValueError as e:
        return _unreadable(path, f"not JSON: {str(e)[:80]}" if text.strip() else "empty")
    return rec if isinstance(rec, dict) else _unreadable(path, f"a JSON {type(rec).__name__}, not a record")


def _unreadable(path: Path, why: str) -> None:
    if path not in _said_unreadable:
        _said_unreadable.add(path)
        print(f"warning: the stored record {path} cannot be read ({why}): its point is computed again",
              file=sys.stderr, flush=True)
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


# ---- the table ---------------------------------------------------------------------------------------------------

def find_records(paths: Iterable[Path]) -> list[Path]:
    """Every record file under the given sweep directories (or the record files themselves)."""
    found = []
    for p in map(Path, paths):
        if p.is_file() and p.suffix == ".json":
            found.append(p)
        elif p.is_dir():
            found.extend(sorted(p.rglob(RECORD_FILE)))
    return found


def gather(paths: Iterable[Path]) -> pd.DataFrame:
    """One row per distinct point (the newest record wins when the same point was recorded twice)."""
    rows = [r for r in map(read_record, find_records(paths)) if r]
    if not rows:
        return pd.DataFrame()
    df = pd.DataFrame(rows)
    if "n_chunks" in df:  # records of schema 1 named the windows scored `n_chunks`
        df["n_windows"] = df["n_windows"].fillna(df["n_chunks"]) if "n_windows" in df else df["n_chunks"]
        df = df.drop(columns="n_chunks")
    df = df.sort_values("finished_at").drop_duplicates("key", keep="last")
    df["layer"] = df["layer"].astype("Int64")  # NA for points over several blocks or none
    order = ["kind", "tensor", "fmt", "layer", "expert"]
    return add_q_values(df.sort_values([c for c in order if c in df]).reset_index(drop=True))


def add_q_values(df: pd.DataFrame) -> pd.DataFrame:
    """Benjamini-Hochberg q-values per tested metric (`delta_nll_q`), over every measured (`ok`) point of the table.

    A point's `significant` holds its own test at level alpha: in a table of 30 points, 1.5 are flagged by chance.
    q <= alpha instead bounds the expected fraction of false discoveries among the points so marked (the FDR) at
    alpha. An ok point without a p-value (stopped early: untested) counts as p = 1, so it adds to the number of
    tests (conservative) and its q is empty. Diverged, no-op and failed points are not tests.
    """
    for test in (m.test for m in METRICS if m.test):
        p_col, q_col = test.p, test.q
        if p_col not in df:
            continue
        df[q_col] = math.nan
        tested = df["status"].eq("ok")
        if tested.any():
            p = pd.to_numeric(df.loc[tested, p_col], errors="coerce")
            q = pd.Series(false_discovery_control(p.fillna(1.0).to_numpy(float), method="bh"), index=p.index)
            df.loc[tested, q_col] = q.where(p.notna())
    return df


def write_table(df: pd.DataFrame, directory: Path) -> tuple[Path, Path]:
    """`results.parquet` and `results.csv`, each written atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    parquet, csv = directory / "results.parquet", directory / "results.csv"
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    atomic_write_bytes(parquet, buf.getvalue())
    atomic_write_bytes(csv, df.to_csv(index=False).encode())
    return parquet, csv


def baseline_key(model_sha256: str, container: str, matched, data_sha256: str, n_ctx: int, n_windows: int,
                 runtime: dict) -> str:
    """The key of a baseline, in memory and in the store (the planner asks it too, to count stored baselines)."""
    return point_key(kind="baseline", model_sha256=model_sha256, container=container, matched=sorted(matched),
                     data_sha256=data_sha256, n_ctx=n_ctx, n_windows=n_windows, runtime=runtime)


def completions_key(model_sha256: str, container: str, matched, n_ctx: int, prompts: tuple[str, ...],
                    max_new_tokens: int, runtime: dict) -> str:
    """The key of a model's unperturbed completions: n_ctx is in it, since a small context shortens them."""
    return point_key(kind="completions", model_sha256=model_sha256, container=container, matched=sorted(matched),
                     n_ctx=n_ctx, prompts=list(prompts), max_new_tokens=max_new_tokens, runtime=runtime)
