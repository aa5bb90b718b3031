"""What a native weight point measures, against the two other ways to measure the same point, on the embedded model:

  f32    the whole model dequantized to F32 (model.container=f32): the reference for sensitivity;
  copy   the file as it is with the target dequantized to F32 and rounded, in a copy of the file per point, against
         that copy's own baseline (model.native_weights=copy: a file-sized write and a second model per point);
  delta  the file as it is, the target kept quantized, (fmt(W) - W)·x added in F32 to its matmul outputs, against the
         sweep's one baseline (model.native_weights=delta, the default).

    python -m bench.crosscheck.native_modes [--windows 4] [--out runs/native-modes]

Sweeps `layer=range(0,30)` of ffn_down int4 and attn_v q4_K in each mode (the real CLI, one process per mode), then
prints per-point KLD side by side, and per tensor the Spearman correlation and the top-5 overlap of the 30-layer
rankings between the modes. Accuracy figures: a loaded machine changes the time, not the numbers.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
from scipy.stats import spearmanr

from sweep.store.records import gather

ROOT = Path(__file__).resolve().parents[2]

MODES = {"f32": ["model.container=f32"], "copy": ["model.container=native", "model.native_weights=copy"],
         "delta": ["model.container=native", "model.native_weights=delta"]}
POINTS = [("ffn_down", "int4"), ("attn_v", "q4_K")]


def run(out: Path, windows: int) -> pd.DataFrame:
    frames = []
    for mode, axes in MODES.items():
        for tensor, fmt in POINTS:
            d = out / f"{mode}-{tensor}"
            t0 = time.perf_counter()
            cmd = [sys.executable, "-m", "sweep", "layer=range(0,30)", f"tensor={tensor}", "kind=weight",
                   f"fmt={fmt}", f"data.n_windows={windows}", "metrics.generate=false", "run.progress=false",
                   f"run.store={out / 'store'}", f"hydra.sweep.dir={d}", *axes]
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=os.environ)
            if proc.returncode != 0:
                raise SystemExit(f"{mode} {tensor}: {proc.stderr[-2000:]}")
            print(f"{mode:6s} {tensor:9s} {fmt}: {time.perf_counter() - t0:.0f} s", flush=True)
            frames.append(gather([d]).assign(mode=mode))
    return pd.concat(frames, ignore_index=True)


def compare(df: pd.DataFrame) -> None:
    for tensor, fmt in POINTS:
        t = df[df["tensor"] == tensor].pivot_table(index="layer", columns="mode", values="kld_mean")[list(MODES)]
        print(f"\n## {tensor} {fmt}: per-point KLD (mean over scored tokens) in the three modes")
        print(t.to_string(float_format=lambda v: f"{v:.3e}"))
        print(f"\n{tensor} {fmt}: ranking agreement over {len(t)} layers")
        for a, b in (("f32", "delta"), ("f32", "copy"), ("copy", "delta")):
            rho = spearmanr(t[a], t[b]).statistic
            top = len(set(t[a].nlargest(5).index) & set(t[b].nlargest(5).index))
            ratio = (t[b] / t[a]).median()
            print(f"  {a:5s} vs {b:5s}: Spearman {rho:.3f}, top-5 overlap {top}/5, median KLD ratio {b}/{a} "
                  f"{ratio:.2f}")
    sec = df.groupby("mode")["seconds"].median()
    print("\nmedian seconds per point: " + ", ".join(f"{m} {sec[m]:.2f}" for m in MODES))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "native-modes")
    ap.add_argument("--table", type=Path, help="compare an existing table (parquet) instead of sweeping")
    args = ap.parse_args()
    if args.table:
        df = pd.read_parquet(args.table)
    else:
        df = run(args.out, args.windows)
        args.out.mkdir(parents=True, exist_ok=True)
        df.to_parquet(args.out / "modes.parquet")
    compare(df)


if __name__ == "__main__":
    main()
