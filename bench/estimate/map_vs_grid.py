"""The map against the exact grid it stands for: predictions from a few exact points, refereed by every point.

    python -m bench.estimate.map_vs_grid runs/GRID [--stats FILE.imatrix.gguf] [--calibrate q4_K] [--checks 3]

GRID is an exact sweep of weight points of GGUF types (every layer of a few classes x several types, e.g.
`sweep kind=weight 'layer=range(0,30)' tensor=ffn_down,attn_v,ffn_up fmt=q2_K,q3_K,q4_K,q5_K,q6_K,q8_0
data.n_windows=2 metrics.generate=false`). The map's plan (sweep/estimate/plan.py) picks its calibration and check
points among the grid's points, its law (law.py) predicts the rest from the weight errors (weight_error.py; weighted
by --stats, an imatrix of the grid's own windows, `sweep imatrix data.n_windows=2 out=...`), and every prediction is
compared with the exact point. Printed per method: Spearman overall, per class and per (class, type) across layers
(the worst), top-10 overlap, median |log(predicted/exact)|, the share of predictions inside their 95% interval, and
the decoded layer-tokens of the exact points spent against the whole grid's. The methods:
  * `baseline`: the issue's reference: one exact point per tensor at --calibrate, scaled by the unweighted error
    (10^(-SQNR/10)) with exponent 1;
  * `weighted`: the same scaled by the imatrix-weighted error;
  * `map`: the product's law: the weighted error with each class's exponent fitted on the check points.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from sweep.estimate import law
from sweep.estimate.plan import Cell, choose
from sweep.estimate.weight_error import weight_errors
from sweep.llama.gguf_names import split_block
from sweep.llama.gguf_reader import read_gguf_tensor
from sweep.llama.model_file import resolve_model_path
from sweep.llama.quantize import ggml_dequantize
from sweep.quant.formats import make_format
from sweep.quant.ggml_types import TYPES
from sweep.quant.imatrix_file import load
from sweep.store.records import gather


def grid_table(runs: list[Path]) -> pd.DataFrame:
    df = gather(runs)
    df = df[(df["kind"] == "weight") & (df["status"].isin(["ok", "no-op"])) & df["ggml_type"].notna()]
    df = df[~df["targets"].astype(str).str.contains(",")].copy()
    df["cls"] = [split_block(t)[1] if split_block(t) else t for t in df["targets"]]
    return df.reset_index(drop=True)


def error_table(df: pd.DataFrame, model: Path, stats_file: Path | None) -> dict[tuple[str, str], law.Exact]:
    st = load(stats_file) if stats_file else {}
    out = {}
    for tensor, rows in df.groupby("targets"):
        tid, shape, data = read_gguf_tensor(model, str(tensor))
        w = ggml_dequantize(data, tid, shape)
        fmts = {f: make_format(f) for f in rows["fmt"].unique()}
        for f, e in weight_errors(w, fmts, str(tensor), st.get(str(tensor))).items():
            out[str(tensor), f] = e
    return out


def evaluate(df: pd.DataFrame, pred: dict[tuple[str, str], law.Prediction], exact_keys: set) -> dict:
    d = df.assign(pred=[pred[t, f].kld if (t, f) in pred else np.nan for t, f in zip(df["targets"], df["fmt"])],
                  lo=[pred[t, f].lo if (t, f) in pred else np.nan for t, f in zip(df["targets"], df["fmt"])],
                  hi=[pred[t, f].hi if (t, f) in pred else np.nan for t, f in zip(df["targets"], df["fmt"])])
    d["is_exact"] = [(t, f) in exact_keys for t, f in zip(d["targets"], d["fmt"])]
    d.loc[d["is_exact"], "pred"] = d.loc[d["is_exact"], "kld_mean"]
    rho = stats.spearmanr(d["pred"], d["kld_mean"]).statistic
    per_cls = {c: stats.spearmanr(g["pred"], g["kld_mean"]).statistic for c, g in d.groupby("cls")}
    cells = {}
    for (c, f), g in d.groupby(["cls", "fmt"]):
        cells[c, f] = stats.spearmanr(g["pred"], g["kld_mean"]).statistic if g["kld_mean"].nunique() > 1 else 1.0
    predicted = d[~d["is_exact"]]
    ratio = np.abs(np.log(np.maximum(predicted["pred"], law.FLOOR) / np.maximum(predicted["kld_mean"], law.FLOOR)))
    inside = ((predicted["kld_mean"] >= predicted["lo"]) & (predicted["kld_mean"] <= predicted["hi"])).mean()
    top = set(d.nlargest(10, "kld_mean").index) & set(d.nlargest(10, "pred").index)
    spent = d.loc[d["is_exact"], "decoded_blocks"].sum() * 1.0
    return {"spearman": rho, "per_class": per_cls, "cells": cells, "top10": len(top),
            "median_abs_log_ratio": float(np.median(ratio)), "p90_abs_log_ratio": float(np.quantile(ratio, 0.9)),
            "inside_95": float(inside), "exact_points": int(d["is_exact"].sum()), "points": len(d),
            "layer_tokens": spent / d["decoded_blocks"].sum()}


def run(df: pd.DataFrame, errors: dict, calibrate: str, checks: int, method: str, tolerance: float) -> dict:
    cells = [Cell(i, str(r.targets), str(r.cls), int(r.layer), str(r.fmt), str(r.ggml_type),
                  TYPES[str(r.ggml_type)].bpw if str(r.ggml_type) in TYPES else 16.0)
             for i, r in enumerate(df.itertuples())]
    mp = choose(cells, len(cells), calibrate, checks if method == "map" else 0, tolerance)
    exact_rows = {(c.tensor, c.fmt): law.Exact(float(df.kld_mean[c.job]), float(df.kld_stderr[c.job]),
                                               float(df.rel_mse[c.job])) for c in cells if c.job in mp.exact_jobs}
    which = "unweighted" if method == "baseline" else "weighted"
    e = {k: getattr(v, which) for k, v in errors.items()}
    classes = {c.tensor: c.cls for c in cells}
    fit = law.fit(classes, e, exact_rows, mp.calibration, tolerance=1e9)
    for t, f in mp.calibration.items():
        law.check_calibration(t, f, exact_rows[t, f].rel_mse, errors[t, f].unweighted)
    pred = {(c.tensor, c.fmt): law.predict(fit, c.cls, c.tensor, c.fmt, e, mp.calibration[c.tensor],
                                           exact_rows[c.tensor, mp.calibration[c.tensor]])
            for c in cells if (c.tensor, c.fmt) not in exact_rows}
    out = evaluate(df, pred, set(exact_rows))
    out["alpha"], out["sigma"] = fit.alpha, fit.sigma
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--stats", type=Path, help="an imatrix of the grid's windows (the input statistics)")
    p.add_argument("--model", help="the model the grid measured (default: the embedded one)")
    p.add_argument("--calibrate", default="q4_K")
    p.add_argument("--checks", type=int, default=3)
    p.add_argument("--tolerance", type=float, default=3.0)
    a = p.parse_args(argv)
    df = grid_table(a.runs)
    errors = error_table(df, resolve_model_path(a.model), a.stats)
    print(f"grid: {len(df)} exact points, {df['cls'].nunique()} classes x {df['fmt'].nunique()} types x "
          f"{df['layer'].nunique()} layers, {int(df['n_windows'].max())} windows")
    results = {m: run(df, errors, a.calibrate, a.checks, m, a.tolerance) for m in ("baseline", "weighted", "map")}
    print("| method | exact points | layer-tokens | Spearman | worst (class, type) | top-10 | median abs log ratio "
          "| 90th pct | inside 95% |")
    print("|---|---|---|---|---|---|---|---|---|")
    for m, r in results.items():
        worst = min(r["cells"].items(), key=lambda kv: kv[1])
        print(f"| {m} | {r['exact_points']}/{r['points']} | {r['layer_tokens']:.3f} | {r['spearman']:.4f} | "
              f"{worst[1]:.3f} {worst[0][0]} {worst[0][1]} | {r['top10']}/10 | {r['median_abs_log_ratio']:.3f} | "
              f"{r['p90_abs_log_ratio']:.3f} | {r['inside_95']:.2f} |")
    fmts = sorted({f for _, f in results["map"]["cells"]}, key=lambda f: TYPES[f].bpw)
    for m, r in results.items():
        print(f"\n{m}: Spearman per (class, type) across layers" + (
            f"; exponents {', '.join(f'{c} {v:.3f}' for c, v in r['alpha'].items())}" if m == "map" else ""))
        print("| class | " + " | ".join(fmts) + " | class overall |")
        print("|---|" + "---|" * (len(fmts) + 1))
        for c in sorted(r["per_class"]):
            print(f"| {c} | " + " | ".join(f"{r['cells'].get((c, f), math.nan):.3f}" for f in fmts)
                  + f" | {r['per_class'][c]:.4f} |")


if __name__ == "__main__":
    main()
