"""The gathered table: every record under some sweep directories, one row per distinct point, with the
Benjamini-Hochberg q-values over the table; written as results.parquet and results.csv."""

from __future__ import annotations

import io
import math
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
from scipy.stats import false_discovery_control

from ..scoring.metrics import METRICS
from .files import atomic_write_bytes
from .records import RECORD_FILE, read_record


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
    order = ["kind", "tensor", "fmt", "layer"]
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
