"""The ranking a finished sweep prints: most sensitive points first, no-op and failed points listed apart."""

from __future__ import annotations

import math

import pandas as pd

from ..scoring.metrics import RANKABLE, worst_first


def ranking(df: pd.DataFrame, metric: str = "kld_mean", top: int | None = 20) -> pd.DataFrame:
    """Most sensitive points first; no-op and failed points are listed apart, never ranked as insensitive."""
    measured = df[df["status"].isin(["ok", "diverged"])].copy()
    # diverged: the worst of all
    measured["_order"] = worst_first(measured, metric).where(measured["status"] == "ok", math.inf)
    measured = measured.sort_values("_order", ascending=False).drop(columns="_order")
    stderr = RANKABLE[metric].stderr if metric in RANKABLE else None
    tests = [c for m in RANKABLE.values() if m.test for c in (m.test.p, m.test.q, m.test.flag)]
    cols = ["layer", "layers", "tensor", "expert", "kind", "fmt", "status", "estimated", metric, stderr,
            "estimate_lo", "estimate_hi", "calibrated_by", "delta_ppl",
            "delta_ppl_stderr", *tests, "stopped_early", "ppl",
            "baseline_ppl", "kld_mean", "top1_agree", "frac_changed", "sqnr_db",
            "ggml_type", "fallback_from", "bpw", "bpw_orig", "kld_per_bit_saved",  # GGUF-type points
            "routed_tokens", "router_share", "routing_changed"]  # MoE models (sweep/llama/routing.py)
    out = measured[[c for c in dict.fromkeys(cols) if c and c in measured]].reset_index(drop=True)
    out.index += 1
    return out if top is None else out.head(top)


DEFAULT_METRIC = "kld_mean"  # KL ranks (resolved on a few windows); ΔPPL ± its error, beside it, judges
FALLBACK_METRIC = "delta_ppl"  # what every point has (metrics.kld=false leaves no KL)


def default_metric(df: pd.DataFrame) -> str:
    return DEFAULT_METRIC if DEFAULT_METRIC in df and df[DEFAULT_METRIC].notna().any() else FALLBACK_METRIC


def format_ranking(df: pd.DataFrame, metric: str = DEFAULT_METRIC, top: int = 20) -> str:
    if df.empty:
        return "no records found"
    note = ""
    if metric not in df or not df[metric].notna().any():  # e.g. KL asked for, but the points ran with kld=false
        note, metric = f"; no {metric} in these points", FALLBACK_METRIC
    stderr = RANKABLE[metric].stderr if metric in RANKABLE else None
    ranked = ranking(df, metric, top)
    n_measured = int(df["status"].isin(["ok", "diverged"]).sum())
    n_estimated = int(df["estimated"].fillna(False).astype(bool).sum()) if "estimated" in df else 0
    alpha = float(df["alpha"].dropna().iloc[0]) if "alpha" in df and df["alpha"].notna().any() else 0.05
    n_tested = int(df["status"].eq("ok").sum())
    ok_q = df.loc[df["status"].eq("ok"), "delta_nll_q"] if "delta_nll_q" in df else pd.Series(dtype=float)
    if ok_q.notna().any() and not (ok_q <= alpha).any():
        note += (f"; no point's ΔNLL is distinguishable from zero (every q > {alpha:g}): an order by ΔPPL would be "
                 f"noise" + ("" if metric.startswith("kld") else ", rank by metrics.rank_by=kld_mean"))
    ppl_beside = metric != FALLBACK_METRIC and FALLBACK_METRIC in df
    of = f"{n_measured} points: {n_measured - n_estimated} measured, {n_estimated} estimated (~, with its 95% " \
        f"interval: run.estimate=map)" if n_estimated else f"{n_measured} measured points"
    lines = [f"most sensitive first by {metric}{' (ΔPPL ± stderr beside)' if ppl_beside else ''} ({len(ranked)} of "
             f"{of}; ± paired stderr; * ΔNLL q <= {alpha:g}: Benjamini-Hochberg false "
             f"discovery rate over the {n_tested} ok points{note}):"]
    for rank, (_, r) in enumerate(ranked.iterrows(), start=1):  # (ranking's index is the rank: 1, 2, ...)
        lines.append(_row(rank, r, metric, stderr, alpha, ppl_beside))
    for status in ("no-op", "failed"):
        sub = df[df["status"] == status]
        if len(sub):
            first = sub.iloc[0]
            lines.append(f"{status}: {len(sub)} point(s), not ranked -- e.g. {first['kind']} {_tensor(first)} "
                         f"L{first['layers']} {first['fmt']}: {first.get('reason')}")
    return "\n".join(lines)


def _row(i: int, r: pd.Series, metric: str, stderr: str | None, alpha: float, ppl_beside: bool) -> str:
    """One ranked point: the ranked value ± its stderr, ΔPPL ± its stderr beside it (starred when its ΔNLL's q is
    at most alpha), PPL against the baseline's, q, and KLD with top-1 agreement when the point has them. A
    predicted point (the map's): its KLD with its 95% interval, marked ~, and nothing it does not have."""
    if bool(r.get("estimated")) and pd.notna(r.get("estimated")):
        return (f"{i:>4}. {r['kind']:<10} {_tensor(r):<12} L{str(r['layers']):<6} {r['fmt']:<24} "
                f"~{r['kld_mean']:.4g} [{r['estimate_lo']:.3g}, {r['estimate_hi']:.3g}]   estimated from "
                f"{str(r['calibrated_by']).split(' ')[0]}")
    err = f" ± {r[stderr]:.4g}" if stderr and stderr in r and pd.notna(r[stderr]) else ""
    q = r.get("delta_nll_q")
    star = " *" if q is not None and pd.notna(q) and q <= alpha else ""
    stopped = r.get("stopped_early")
    extra = f"  q {q:.2g}" if q is not None and pd.notna(q) else \
        ("  (stopped early: untested)" if pd.notna(stopped) and bool(stopped) else "")
    if "kld_mean" in r and pd.notna(r.get("kld_mean")):
        extra += f"  KLD {r['kld_mean']:.3g}  top-1 {100 * r['top1_agree']:.2f}%"
    if pd.notna(r.get("routed_tokens")) and _expert(r):
        extra += f"  routed_tokens {int(r['routed_tokens'])}"
    value = f"{r[metric]:+.4g}{err}" if not ppl_beside else f"{r[metric]:.4g}{err}"
    if ppl_beside:
        ppl_err = r.get("delta_ppl_stderr")
        value += f"   ΔPPL {r[FALLBACK_METRIC]:+.4g}" + (f" ± {ppl_err:.4g}" if pd.notna(ppl_err) else "")
    return (f"{i:>4}. {r['kind']:<10} {_tensor(r):<12} L{str(r['layers']):<6} {r['fmt']:<24} "
            f"{value}{star}   PPL {r['ppl']:.4f} (base {r['baseline_ppl']:.4f}){extra}"
            + ("  DIVERGED" if r["status"] == "diverged" else ""))


def _expert(r: pd.Series) -> str:
    """The experts of a MoE point ('' for the whole stack or a dense model)."""
    expert = r.get("expert")
    return "" if expert is None or pd.isna(expert) or expert == "all" else str(expert)


def _tensor(r: pd.Series) -> str:
    return f"{r['tensor']} E{_expert(r)}" if _expert(r) else r["tensor"]
