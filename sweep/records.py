"""Records on disk: one JSON file per finished point, written atomically; baselines; the gathered table.

A point's key is a hash of everything that determines its result (model file hash, container, text hash, slice,
n_ctx, target, format), so a record can be reused by any later sweep that asks for the same point -- that is how
a killed sweep resumes -- and a half-written file can never be read as a record (write to a temporary file, then
rename, which is atomic on POSIX).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

RECORD_FILE = "record.json"
DONE = ("ok", "no-op", "diverged")  # a "failed" point is retried when the sweep runs again
RECORD_SCHEMA = 1


def point_key(**fields) -> str:
    blob = json.dumps({"schema": RECORD_SCHEMA, **fields}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    """Finished points (`points/<key>.json`) and baseline scores (`baselines/<key>.npy`), shared by sweeps."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def point(self, key: str) -> dict | None:
        rec = read_record(self.root / "points" / f"{key}.json")
        return rec if rec and rec.get("status") in DONE else None

    def put_point(self, key: str, record: dict) -> None:
        write_record(self.root / "points" / f"{key}.json", record)

    def baseline(self, key: str) -> np.ndarray | None:
        try:
            return np.load(self.root / "baselines" / f"{key}.npy")
        except (OSError, ValueError):
            return None

    def put_baseline(self, key: str, nll: np.ndarray) -> None:
        import io

        buf = io.BytesIO()
        np.save(buf, nll)
        atomic_write_bytes(self.root / "baselines" / f"{key}.npy", buf.getvalue())


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
    df = df.sort_values("finished_at").drop_duplicates("key", keep="last")
    order = ["kind", "tensor", "fmt", "layer_index"]
    return df.sort_values([c for c in order if c in df]).reset_index(drop=True)


def write_table(df: pd.DataFrame, directory: Path) -> tuple[Path, Path]:
    """`results.parquet` and `results.csv`, each written atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    parquet, csv = directory / "results.parquet", directory / "results.csv"
    import io

    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    atomic_write_bytes(parquet, buf.getvalue())
    atomic_write_bytes(csv, df.to_csv(index=False).encode())
    return parquet, csv


def ranking(df: pd.DataFrame, metric: str = "delta_ppl", top: int | None = 20) -> pd.DataFrame:
    """Most sensitive points first; no-op and failed points are listed apart, never ranked as insensitive."""
    measured = df[df["status"].isin(["ok", "diverged"])].copy()
    measured["_order"] = measured[metric].where(measured["status"] == "ok", math.inf)
    measured = measured.sort_values("_order", ascending=False).drop(columns="_order")
    cols = ["layer", "tensor", "kind", "fmt", "status", metric, f"{metric}_stderr", "ppl", "baseline_ppl",
            "frac_changed", "sqnr_db"]
    out = measured[[c for c in cols if c in measured]].reset_index(drop=True)
    out.index += 1
    return out if top is None else out.head(top)


def format_ranking(df: pd.DataFrame, metric: str = "delta_ppl", top: int = 20) -> str:
    if df.empty:
        return "no records found"
    lines = []
    ranked = ranking(df, metric, top)
    n_measured = int(df["status"].isin(["ok", "diverged"]).sum())
    lines.append(f"most sensitive first ({min(top, n_measured)} of {n_measured} measured points), "
                 f"{metric} ± paired stderr:")
    for i, r in ranked.iterrows():
        err = r.get(f"{metric}_stderr", math.nan)
        lines.append(f"{i:>4}. {r['kind']:<10} {r['tensor']:<12} L{str(r['layer']):<6} {r['fmt']:<24} "
                     f"{r[metric]:+.4f} ± {err:.4f}   PPL {r['ppl']:.4f} (base {r['baseline_ppl']:.4f})"
                     + ("  DIVERGED" if r["status"] == "diverged" else ""))
    for status in ("no-op", "failed"):
        sub = df[df["status"] == status]
        if len(sub):
            lines.append(f"{status}: {len(sub)} point(s), not ranked -- e.g. "
                         f"{sub.iloc[0]['kind']} {sub.iloc[0]['tensor']} L{sub.iloc[0]['layer']} "
                         f"{sub.iloc[0]['fmt']}: {sub.iloc[0].get('reason')}")
    return "\n".join(lines)
