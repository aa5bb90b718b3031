"""The store, keys and the gathered table: finished points (one record each, store/record.py) and baselines.

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
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import false_discovery_control

from ..files import atomic_write_bytes, temporary_beside
from ..scoring.metrics import METRICS
from .columns import COLUMNS, DIVERGED, NO_OP, OK, SORT
from .record import LEFT_OUT, RECORD_FILE, RECORD_VERSION, Record, read_record, write_record

DONE = (OK, NO_OP, DIVERGED)  # a "failed" point is retried when the sweep runs again
KEY_CHARS = 20  # hex digits of a key: 80 bits, no collision among any number of points a store will hold


def point_key(**fields) -> str:
    """A key of the store: the record version is in every key, so that raising it computes every point again."""
    blob = json.dumps({"schema": RECORD_VERSION, **fields}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:KEY_CHARS]


class Store:
    """Finished points (`points/<key>.json`) and baseline scores (`baselines/<key>.npz`), shared by sweeps."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def point(self, key: str) -> Record | None:
        rec = read_record(self.root / "points" / f"{key}.json")
        return rec if rec and rec["status"] in DONE else None

    def put_point(self, key: str, record: Record) -> None:
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
        np.savez(buf, **arrays)  # type: ignore[arg-type]  # numpy's stubs read the first keyword as allow_pickle
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
    """One row per distinct point (the newest record wins when the same point was recorded twice), its columns in the
    order the records give them; a record that is not a complete one of this version is said and left out."""
    rows = [dict(r) for r in (read_record(p, then=LEFT_OUT) for p in find_records(paths)) if r]
    if not rows:
        return pd.DataFrame()
    df = pd.DataFrame(rows)
    df = df.sort_values("finished_at").drop_duplicates("key", keep="last")
    for c in COLUMNS:  # the registry's dtypes where pandas would infer another (`layer`: NA for several blocks)
        if c.table_dtype and c.name in df:
            df[c.name] = df[c.name].astype(pd.api.types.pandas_dtype(c.table_dtype))
    return add_q_values(df.sort_values([c for c in SORT if c in df]).reset_index(drop=True))


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
