"""Prefix reuse's gain: points per hour and decoded layer-tokens of a layer sweep, with and without reuse.

For each model, two sweeps (`python -m sweep`), each in a fresh store so that nothing is reused from the store:
`layer=range(0,N) tensor=ffn_down kind=weight fmt=int8` and `layer=range(0,N) tensor=l_out kind=activation
fmt=int8`, each once with `run.prefix_reuse=true` and once with `false`. The stage files are written before the
timed runs (once per model file, like the F32 container: the stages a user's later sweeps of the model use); the
residual capture and the identity checks happen inside every timed reuse run (each run has a cache of its own for
residuals), as in a user's first sweep on a text.

Decoded layer-tokens = blocks decoded x tokens: the points' decodes (each record's `decoded_blocks` x its windows x
n_ctx), plus the baseline (N blocks, every window) and, with reuse, one identity window per stage used (the
residuals are read during the baseline's decode, and the identity reference is the baseline's logits).

The two tables are compared bit for bit: per-window sums of NLL, KL and top-1, PPL, mean KL and the proofs
(`table`: same, or the columns that differ; bench/prefix_identity.py compares every token of a few points).

Timing: run on an otherwise idle machine only (two llama.cpp processes on the same cores slow each other ~10x).

    python -m bench.models.shaped_model tinyllama /tmp/tinyllama-shaped.gguf   # the TinyLlama-shaped 1.1B model
    python -m bench.perf.prefix_reuse --models embedded,/tmp/tinyllama-shaped.gguf [--windows 8] [--threads N]
    python -m bench.perf.prefix_reuse --layers 2 --windows 2                # a quick check: the last 2 layers only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pandas as pd

from bench.perf.vocab import model_for
from sweep.llama.cache import CONTAINERS, STAGES, cache_root, stage_file
from sweep.llama.container import container_path
from sweep.llama.model_file import model_info, resolve_model_path, sha256
from sweep.llama.stage_file import write_stage_file
from sweep.pipeline.config import compose
from sweep.pipeline.grid import plan as grid_plan
from sweep.prefix.reuse import note_io_speed

ROOT = Path(__file__).resolve().parents[2]
SWEEPS = {"weight ffn_down": ("kind=weight", "tensor=ffn_down"), "activation l_out": ("kind=activation",
                                                                                      "tensor=l_out")}


def prepare_stages(overrides: list[str], cache: Path) -> list[int]:
    """Write the stage files the reuse run of `overrides` will load (not timed: once per model file, like the F32
    container). The plan counts a file still to write at its cost, so the files of a first plan make other stages
    cheaper: planned again until the plan keeps to the files written (at most 3 rounds) -- the stages a user's
    later sweeps of this model use. Each write's speed is kept for the plan, as a sweep's own writes are."""
    starts: list[int] = []
    for _ in range(3):
        jobs = grid_plan(overrides).jobs
        planned = json.loads(next(o for o in jobs[0] if o.startswith("run.prefix_starts=")).split("=", 1)[1])
        if planned == starts:
            break
        starts = planned
        cfg = compose(jobs[0])
        source = resolve_model_path(cfg.model.path)
        loaded = container_path(source, str(cfg.model.container), cache)
        for s in starts:
            path = stage_file(cache, sha256(source), str(cfg.model.container), s)
            if not path.exists():
                print(f"  writing stage {s} of {source.name} ({cfg.model.container}) -> {path}", flush=True)
                t0 = time.perf_counter()
                write_stage_file(loaded, path, s)
                note_io_speed(cache, "write", path.stat().st_size, time.perf_counter() - t0)
    return starts


def overrides(model: str, axes, layers: str, reuse: bool, args) -> list[str]:
    return [f"model.path={model}", f"model.container={args.container}", f"layer={layers}", *axes, "fmt=int8",
            f"data.n_windows={args.windows}", f"data.n_ctx={args.n_ctx}", "metrics.generate=false",
            f"run.threads={args.threads}", "run.progress=false", f"run.prefix_reuse={str(reuse).lower()}",
            f"run.prefix_stages={args.stages}"]


def sweep(model: str, axes, layers: str, reuse: bool, args, work: Path, cache: Path
          ) -> tuple[float, int, pd.DataFrame]:
    """Wall seconds, peak RSS in bytes and the table of one `python -m sweep` run."""
    name = f"{Path(model).stem}-{'-'.join(a.split('=')[1] for a in axes)}-{'reuse' if reuse else 'full'}"
    cmd = [sys.executable, "-m", "sweep", *overrides(model, axes, layers, reuse, args),
           f"run.store={work / name / 'store'}", f"hydra.sweep.dir={work / name / 'sweep'}"]
    # a cache of its own per run, sharing the F32 containers and stage files but no captured residuals: every reuse
    # run pays its capture, as a first sweep does
    own = work / name / "cache"
    own.mkdir(parents=True)
    for sub in (CONTAINERS, STAGES):
        (cache / sub).mkdir(parents=True, exist_ok=True)
        (own / sub).symlink_to(cache / sub)
    log = work / name / "sweep.log"
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "SWEEP_CACHE": str(own)}, stdout=out,
                                stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS, not the largest of all children
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{log.read_text()[-3000:]}")
    said = [line for line in log.read_text().splitlines() if line.startswith("prefix reuse:")]
    if said:
        print(f"  {said[0]}", flush=True)
    return wall, usage.ru_maxrss * 1024, pd.read_parquet(work / name / "sweep" / "results.parquet")


SAME = ["window_dnll", "window_kld", "window_top1", "window_baseline_nll", "ppl", "kld_mean", "n_changed",
        "hook_calls"]


def identical(full: pd.DataFrame, reuse: pd.DataFrame) -> list[str]:
    """The columns (per-window NLL, KL and top-1 sums, proofs) where the two tables differ in any bit."""
    a, b = (t.sort_values("layer").reset_index(drop=True) for t in (full, reuse))
    return [c for c in SAME if c in a and not all(np.array_equal(np.asarray(x), np.asarray(y))
                                                  for x, y in zip(a[c], b[c]))]


def layer_tokens(df: pd.DataFrame, n_layers: int, reuse: bool) -> int:
    n_windows, n_ctx = int(df["n_windows"].max()), int(df["n_ctx"].iloc[0])
    points = int((df["decoded_blocks"] * df["n_windows"] * df["n_ctx"]).sum())
    baseline = n_layers * n_windows * n_ctx
    used = df.loc[df["prefix_reuse"] == "ok", "prefix_stage"].dropna().astype(int).unique()
    overhead = sum((n_layers - s) * n_ctx for s in used) if reuse else 0
    return points + baseline + overhead


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="embedded", help="comma-separated: embedded, gemma3-262k (Gemma-3-270M's "
                                                          "shape and 262k vocabulary, random weights, written once) "
                                                          "and/or GGUF paths")
    ap.add_argument("--layers", type=int, default=0, help="only the last K layers (0: all)")
    ap.add_argument("--at", default=None, help="only these layers, comma-separated (e.g. 5,9)")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--n-ctx", type=int, default=512, help="data.n_ctx")
    ap.add_argument("--stages", type=int, default=8, help="run.prefix_stages (the most stages the plan may use)")
    ap.add_argument("--container", default="f32")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--sweeps", default=",".join(SWEEPS), help=f"comma-separated, of: {', '.join(SWEEPS)}")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--keep", type=Path, help="run in this directory and keep its stores and tables (default: a "
                                              "temporary one)")
    args = ap.parse_args()
    sweeps = {label: SWEEPS[label] for label in args.sweeps.split(",")}
    cache = cache_root()
    figures = []
    with tempfile.TemporaryDirectory(prefix="prefix-reuse-") if args.keep is None else nullcontext(args.keep) as tmp:
        for model in args.models.split(","):
            if model == "gemma3-262k":
                model = str(model_for(262144, "gemma"))
            n = model_info(resolve_model_path(None if model == "embedded" else model)).n_layers
            first = n - args.layers if args.layers else 0
            layers = args.at or f"range({first},{n})"
            starts = {label: prepare_stages(overrides(model, axes, layers, True, args), cache)
                      for label, axes in sweeps.items()}
            print(f"\n## {model}: {n} blocks, layer={layers}, {args.windows} windows, {args.container} container, "
                  f"{args.threads} threads, stages {starts}")
            print(f"{'sweep':<20}{'points':>7}{'full pts/h':>12}{'reuse pts/h':>13}{'speed-up':>10}"
                  f"{'layer-tokens full':>19}{'reuse':>14}{'ratio':>8}{'wall':>7}{'peak RSS':>10}  table  fallbacks")
            for label, axes in sweeps.items():
                wall_full, rss_full, full = sweep(model, axes, layers, False, args, Path(tmp), cache)
                wall_reuse, rss_reuse, reuse = sweep(model, axes, layers, True, args, Path(tmp), cache)
                assert len(full) == len(reuse)
                lt_full, lt_reuse = layer_tokens(full, n, False), layer_tokens(reuse, n, True)
                pph_full, pph_reuse = 3600 * len(full) / wall_full, 3600 * len(reuse) / wall_reuse
                # one count per kind of reason (the layer and the stages listed apart)
                fallbacks = reuse["prefix_reason"].dropna().str.replace(r"layer \d+ \(.*\)$", "its layer",
                                                                        regex=True).value_counts().to_dict()
                differ = identical(full, reuse)
                print(f"{label:<20}{len(full):>7}{pph_full:>12.0f}{pph_reuse:>13.0f}{pph_reuse / pph_full:>9.2f}x"
                      f"{lt_full:>19,}{lt_reuse:>14,}{lt_reuse / lt_full:>8.3f}{wall_reuse / wall_full:>6.3f}x"
                      f"{rss_reuse / rss_full:>9.3f}x  "
                      f"{'same' if not differ else 'DIFFER: ' + ','.join(differ)}  {fallbacks or '-'}")
                figures.append({"model": model, "sweep": label, "points": len(full), "wall_full_s": wall_full,
                                "wall_reuse_s": wall_reuse, "peak_rss_full": rss_full, "peak_rss_reuse": rss_reuse,
                                "points_per_hour_full": pph_full,
                                "points_per_hour_reuse": pph_reuse, "layer_tokens_full": lt_full,
                                "layer_tokens_reuse": lt_reuse, "fallbacks": fallbacks, "differ": differ})
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1, default=int))  # numpy integers


if __name__ == "__main__":
    main()
