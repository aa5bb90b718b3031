"""The figures of a sweep, from its results table. Used by `python -m sweep.report --plots DIR` and by
notebooks/sensitivity.ipynb, so the two always show the same thing.

Every function takes the table (pandas) and returns a matplotlib Figure; none reads files or shows windows.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import matplotlib

if not os.environ.get("MPLBACKEND"):
    matplotlib.use("Agg")  # headless by default; a notebook's inline backend is set before this import
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from scipy import stats

from ..estimate.rows import gather_table
from ..scoring.metrics import RANKABLE
from .plots_moe import expert_routing

RUNS_DIR = Path(__file__).resolve().parents[1] / "runs"


def load_results(path: str | os.PathLike | None = None, runs_dir: str | os.PathLike = RUNS_DIR) -> pd.DataFrame:
    """A results table: a .parquet/.csv file, a sweep directory, or (None) the newest sweep under `runs_dir`."""
    if path in (None, ""):
        sweeps = [p for p in Path(runs_dir).glob("*") if p.is_dir() and (p / "results.parquet").exists()]
        if not sweeps:
            raise FileNotFoundError(f"no sweep with a results.parquet under {runs_dir}/: run `python -m sweep` "
                                    f"or set SWEEP_RESULTS to a sweep directory or table")
        path = max(sweeps, key=lambda p: (p / "results.parquet").stat().st_mtime)
    path = Path(path)
    if path.is_dir():
        table = path / "results.parquet"
        return pd.read_parquet(table) if table.exists() else gather_table([path])
    return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)


def _series(df: pd.DataFrame):
    """(fmt, (tensor, kind), rows sorted by layer) for the single-layer points of each curve."""
    single = df[df["layer"].notna()]
    for fmt, by_fmt in single.groupby("fmt", sort=True):
        for (tensor, kind), rows in by_fmt.groupby(["tensor", "kind"], sort=True):
            yield fmt, (tensor, kind), rows.sort_values("layer")


def sensitivity_curves(df: pd.DataFrame, metric: str = "delta_ppl") -> plt.Figure:
    """Metric vs. layer, one line per (tensor, kind), a panel per format, ±1 stderr bands.
    No-op points are drawn as hollow grey markers (not measured, not zero effect); failed ones as red x."""
    label, err_col = RANKABLE[metric].label, RANKABLE[metric].stderr
    fmts = sorted(df["fmt"].unique())
    fig, axes = plt.subplots(1, len(fmts), figsize=(6 * len(fmts), 4), squeeze=False, sharey=metric == "kld_mean")
    panels = dict(zip(fmts, axes[0]))
    for fmt, (tensor, kind), rows in _series(df):
        ax = panels[fmt]
        ok = rows[rows["status"] == "ok"]
        if len(ok) and metric in ok and ok[metric].notna().any():
            y, e = ok[metric].to_numpy(float), ok.get(err_col, pd.Series(np.nan, ok.index)).to_numpy(float)
            (line,) = ax.plot(ok["layer"], y, marker="o", ms=3, label=f"{tensor} ({kind})")
            ax.fill_between(ok["layer"], y - e, y + e, color=line.get_color(), alpha=0.2, lw=0)
        noop = rows[rows["status"] == "no-op"]
        if len(noop):
            ax.scatter(noop["layer"], np.zeros(len(noop)), facecolors="none", edgecolors="grey", s=30,
                       label=f"{tensor} ({kind}): no-op, nothing changed")
        bad = rows[rows["status"].isin(["failed", "diverged"])]
        if len(bad):
            ax.scatter(bad["layer"], np.zeros(len(bad)), marker="x", color="red", label=f"{tensor} ({kind}): failed")
    for fmt, ax in panels.items():
        ax.set_title(f"fmt = {fmt}")
        ax.set_xlabel("layer")
        ax.axhline(0, color="black", lw=0.5)
        if metric == "kld_mean" and (df[metric] > 0).any():
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel(label)
    fig.tight_layout()
    return fig


def heatmaps(df: pd.DataFrame, metric: str = "delta_ppl") -> plt.Figure:
    """Layer × (tensor, kind) per format; no-op cells hatched grey, missing cells white."""
    fmts = sorted(df["fmt"].unique())
    fig, axes = plt.subplots(len(fmts), 1, figsize=(10, 1.2 + 0.5 * df[["tensor", "kind"]].drop_duplicates().shape[0]
                                                        * len(fmts)), squeeze=False)
    single = df[df["layer"].notna()].assign(row=lambda d: d["tensor"] + " (" + d["kind"] + ")")
    for ax, fmt in zip(axes[:, 0], fmts):
        sub = single[single["fmt"] == fmt]
        grid = sub[sub["status"] == "ok"].pivot_table(index="row", columns="layer", values=metric)
        rows = sorted(sub["row"].unique())
        layers = sorted(sub["layer"].unique())
        grid = grid.reindex(index=rows, columns=layers)
        im = ax.imshow(grid.to_numpy(float), aspect="auto", cmap="magma_r")
        noop = sub[sub["status"] == "no-op"]
        for _, r in noop.iterrows():
            ax.add_patch(plt.Rectangle((layers.index(r["layer"]) - 0.5, rows.index(r["row"]) - 0.5), 1, 1,
                                       facecolor="lightgrey", edgecolor="dimgrey", hatch="//", lw=0.5))
        ax.set_yticks(range(len(rows)), rows, fontsize=8)
        ax.set_xticks(range(len(layers)), [str(int(x)) for x in layers], fontsize=7)
        ax.set_title(f"{metric} — fmt = {fmt} (hatched: no-op)")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig


def proxy_scatter(df: pd.DataFrame, metric: str = "kld_mean") -> tuple[plt.Figure, float]:
    """The cheap proxy (SQNR of the perturbed tensor) against the end-to-end effect, with Spearman's rho."""
    ok = df[(df["status"] == "ok") & df["sqnr_db"].notna() & np.isfinite(df["sqnr_db"])]
    ok = ok[ok[metric].notna()]
    rho = float(stats.spearmanr(ok["sqnr_db"], ok[metric]).statistic) if len(ok) > 2 else math.nan
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, rows in ok.groupby("kind"):
        ax.scatter(rows["sqnr_db"], rows[metric], s=14, label=kind)
    if metric == "kld_mean" and (ok[metric] > 0).all() and len(ok):
        ax.set_yscale("log")
    ax.set_xlabel("SQNR of the perturbed tensor (dB)")
    ax.set_ylabel(metric)
    ax.set_title(f"cheap proxy vs. end-to-end effect: Spearman ρ = {rho:.2f} (n = {len(ok)})")
    ax.legend()
    fig.tight_layout()
    return fig, rho


def size_tradeoff(df: pd.DataFrame, metric: str = "kld_mean") -> plt.Figure:
    """Damage against storage (bits per weight of the target, e.g. GGUF types): one marker per point, a colour per
    format, with the original file's bits per weight as a dashed line (bits saved lie to its left)."""
    ok = df[(df["status"] == "ok") & df["bpw"].notna() & df[metric].notna()]
    fig, ax = plt.subplots(figsize=(6, 4))
    for fmt, rows in ok.groupby("fmt", sort=True):
        ax.scatter(rows["bpw"], rows[metric], s=14, label=fmt)
    if "bpw_orig" in ok and ok["bpw_orig"].notna().any():
        for bpw in ok["bpw_orig"].dropna().unique():
            ax.axvline(bpw, color="grey", ls="--", lw=0.8)
    if metric == "kld_mean" and len(ok) and (ok[metric] > 0).all():
        ax.set_yscale("log")
    ax.set_xlabel("bits per weight of the target (dashed: original file)")
    ax.set_ylabel(metric)
    ax.set_title("damage vs. size")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def load_validation(path: str | os.PathLike | None = None, runs_dir: str | os.PathLike = RUNS_DIR) -> dict | None:
    """The validation.json of `python -m sweep.recipe --validate`: a file, its directory, or (None) the newest under
    `runs_dir`; None when there is none."""
    import json

    if path in (None, ""):
        found = sorted(Path(runs_dir).glob("**/validation.json"), key=lambda p: p.stat().st_mtime)
        if not found:
            return None
        path = found[-1]
    path = Path(path)
    return json.loads((path / "validation.json" if path.is_dir() else path).read_text())


def recipe_pareto(report: dict) -> plt.Figure:
    """A validation (sweep/recipe/validate.py) in two panels: file size against held-out KL divergence for the
    recipe (red) and llama.cpp's presets (95% intervals), and each file's predicted damage (sum of single-tensor
    damages) against the damage measured on the sweep's own windows (the additivity check)."""
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    files = report["files"]
    for r in files:
        mb = r["file_bytes"] / 1e6
        lo, hi = r["kld_ci95"]
        is_recipe = r["file"] == "recipe"
        ax.errorbar([mb], [r["kld_mean"]], yerr=[[r["kld_mean"] - lo], [hi - r["kld_mean"]]], fmt="o",
                    color="C3" if is_recipe else "C0", ms=8 if is_recipe else 6, capsize=3, label=r["file"])
        ax.annotate(r["file"], (mb, r["kld_mean"]), textcoords="offset points", xytext=(6, 4))
    presets = sorted((r for r in files if r["file"] != "recipe"), key=lambda r: r["file_bytes"])
    ax.plot([r["file_bytes"] / 1e6 for r in presets], [r["kld_mean"] for r in presets], color="C0", lw=0.8, ls=":")
    ax.set_xlabel("file size (MB)")
    ax.set_ylabel("held-out KL divergence (F32 ‖ file)")
    ax.set_yscale("log")
    ax.set_title(f"size vs damage on {report['heldout']['windows']} held-out windows: recipe (red), llama.cpp "
                 f"presets (95% CI)", fontsize=9)
    predicted = [r for r in files if r.get("predicted") is not None]
    for r in predicted:
        rs = r.get("residual_sweep_windows")
        measured = rs["measured"] if rs else r["kld_mean"]
        ax2.scatter([r["predicted"]], [measured], color="C3" if r["file"] == "recipe" else "C0")
        ax2.annotate(r["file"], (r["predicted"], measured), textcoords="offset points", xytext=(6, 4))
    if predicted:
        values = [r["predicted"] for r in predicted] + [r["kld_mean"] for r in predicted]
        lim = [min(v for v in values if v > 0) / 2, max(values) * 2]
        ax2.plot(lim, lim, "k--", lw=0.8)
        ax2.set_xscale("log")
        ax2.set_yscale("log")
    ax2.set_xlabel(f"predicted {report['metric']} (sum of single-tensor damages; tables' tensors only)")
    ax2.set_ylabel("measured on the sweep's windows")
    ax2.set_title("additivity: predicted vs measured (dashed: equal)", fontsize=9)
    fig.tight_layout()
    return fig


def additivity(df: pd.DataFrame) -> plt.Figure | None:
    """Joint points (`fmt=recipe`): the damage measured with the recipe's tensors perturbed at once against the sum
    of their single-tensor damages, with the paired 95% interval of the residual; None without joint points.
    A colour per kind of joint point: one block's weights, one tensor over several blocks, the whole file."""
    joint = df[df.get("predicted", pd.Series(np.nan, df.index)).notna() & (df["status"] == "ok")]
    if joint.empty:
        return None
    metric = str(joint["additivity_metric"].iloc[0])
    fig, ax = plt.subplots(figsize=(7, 5.5))

    def kind(r) -> str:
        if r["layers"] == "-":
            return "the whole file"
        if "," not in str(r["layers"]):
            return "one block" if r["tensor"] == "all" else "one tensor"
        return "one tensor, many blocks" if r["tensor"] != "all" else "many blocks"

    groups = joint.assign(_kind=joint.apply(kind, axis=1))
    for i, (name, rows) in enumerate(groups.groupby("_kind", sort=True)):
        measured, predicted = rows[metric].to_numpy(float), rows["predicted"].to_numpy(float)
        lo = rows.get("additivity_residual_lo", pd.Series(np.nan, rows.index)).to_numpy(float)
        hi = rows.get("additivity_residual_hi", pd.Series(np.nan, rows.index)).to_numpy(float)
        res = measured - predicted
        # the interval of the residual, drawn around the measurement; clipped above 0 on the log axis
        down = np.nan_to_num(np.minimum(res - lo, 0.9 * measured), nan=0.0).clip(min=0)
        up = np.nan_to_num(hi - res, nan=0.0).clip(min=0)
        ax.errorbar(predicted, measured, yerr=[down, up], fmt="o", ms=4, capsize=2, color=f"C{i}",
                    label=f"{name} ({len(rows)})")
        if len(rows) <= 8:
            for _, r in rows.iterrows():
                text = "all" if name in ("the whole file", "many blocks") else r["tensor"]
                ax.annotate(text, (r["predicted"], r[metric]), textcoords="offset points", xytext=(4, 3),
                            fontsize=7)
    values = np.concatenate([joint[metric].to_numpy(float), joint["predicted"].to_numpy(float)])
    values = values[values > 0]
    if len(values):
        lim = [values.min() / 2, values.max() * 2]
        ax.plot(lim, lim, "k--", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel(f"predicted {metric}: sum of the tensors' single damages")
    ax.set_ylabel(f"measured {metric}, tensors perturbed jointly")
    ax.set_title("additivity inside the sweep: joint points (dashed: equal; bars: 95% CI of the residual)",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def write_all(df: pd.DataFrame, directory: str | os.PathLike) -> list[Path]:
    """Every figure as a PNG in `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    figures = {"curves_delta_ppl.png": sensitivity_curves(df, "delta_ppl"),
               "heatmap_delta_ppl.png": heatmaps(df, "delta_ppl")}
    if "kld_mean" in df and df["kld_mean"].notna().any():
        figures["curves_kld.png"] = sensitivity_curves(df, "kld_mean")
        figures["heatmap_kld.png"] = heatmaps(df, "kld_mean")
        figures["proxy_sqnr_vs_kld.png"] = proxy_scatter(df, "kld_mean")[0]
    figures["proxy_sqnr_vs_delta_ppl.png"] = proxy_scatter(df, "delta_ppl")[0]
    if "bpw" in df and df["bpw"].notna().any():
        figures["size_vs_damage.png"] = size_tradeoff(df, "kld_mean" if "kld_mean" in df else "delta_ppl")
    if (fig := additivity(df)) is not None:
        figures["additivity.png"] = fig
    if (fig := expert_routing(df, "kld_mean" if "kld_mean" in df else "delta_ppl")) is not None:
        figures["experts_damage_vs_routing.png"] = fig
    written = []
    for name, fig in figures.items():
        fig.savefig(directory / name, dpi=110)
        plt.close(fig)
        written.append(directory / name)
    return written
