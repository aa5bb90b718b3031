"""The ranking a finished sweep prints: most sensitive points first, no-op and failed points listed apart."""

from __future__ import annotations

import math

import pandas as pd

from ..scoring.metrics import RANKABLE, worst_first


def ranking(df: pd.DataFrame, metric: str = "delta_ppl", top: int | None = 20) -> pd.DataFrame:
    """Most sensitive points first; no-op and failed points are listed apart, never ranked as insensitive."""
    measured = df[df["status"].isin(["ok", "diverged"])].copy()
    # diverged: the worst of all
    measured["_order"] = worst_first(measured, metric).where(measured["status"] == "ok", math.inf)
    measured = measured.sort_values("_order", ascending=False).drop(columns="_order")
    stderr = RANKABLE[metric].stderr if metric in RANKABLE else None
    tests = [c for m in RANKABLE.values() if m.test for c in (m.test.p, m.test.q, m.test.flag)]
    cols = ["layer", "layers", "tensor", "kind", "fmt", "status", metric, stderr, *tests, "stopped_early", "ppl",
            "baseline_ppl", "kld_mean", "top1_agree", "frac_changed", "sqnr_db",
            "ggml_type", "fallback_from", "bpw", "bpw_orig", "kld_per_bit_saved"]  # the last: GGUF-type points
    out = measured[[c for c in dict.fromkeys(cols) if c and c in measured]].reset_index(drop=True)
    out.index += 1
    return out if top is None else out.head(top)


def format_ranking(df: pd.DataFrame, metric: str = "delta_ppl", top: int = 20) -> str:
    if df.empty:
        return "no records found"
    stderr = RANKABLE[metric].stderr if metric in RANKABLE else None
    ranked = ranking(df, metric, top)
    n_measured = int(df["status"].isin(["ok", "diverged"]).sum())
    alpha = float(df["alpha"].dropna().iloc[0]) if "alpha" in df and df["alpha"].notna().any() else 0.05
    n_tested = int(df["status"].eq("ok").sum())
    lines = [f"most sensitive first by {metric} ({len(ranked)} of {n_measured} measured points; ± paired stderr; "
             f"* ΔNLL q <= {alpha:g}: Benjamini-Hochberg false discovery rate over the {n_tested} ok points):"]
    for i, r in ranked.iterrows():
        err = f" ± {r[stderr]:.4g}" if stderr and stderr in r and pd.notna(r[stderr]) else ""
        q = r.get("delta_nll_q")
        star = " *" if q is not None and pd.notna(q) and q <= alpha else ""
        stopped = r.get("stopped_early")
        extra = f"  q {q:.2g}" if q is not None and pd.notna(q) else \
            ("  (stopped early: untested)" if pd.notna(stopped) and bool(stopped) else "")
        if "kld_mean" in r and pd.notna(r.get("kld_mean")):
            extra += f"  KLD {r['kld_mean']:.3g}  top-1 {100 * r['top1_agree']:.2f}%"
        lines.append(f"{i:>4}. {r['kind']:<10} {r['tensor']:<12} L{str(r['layers']):<6} {r['fmt']:<24} "
                     f"{r[metric]:+.4g}{err}{star}   PPL {r['ppl']:.4f} (base {r['baseline_ppl']:.4f}){extra}"
                     + ("  DIVERGED" if r["status"] == "diverged" else ""))
    for status in ("no-op", "failed"):
        sub = df[df["status"] == status]
        if len(sub):
            first = sub.iloc[0]
            lines.append(f"{status}: {len(sub)} point(s), not ranked -- e.g. {first['kind']} {first['tensor']} "
                         f"L{first['layers']} {first['fmt']}: {first.get('reason')}")
    return "\n".join(lines)
