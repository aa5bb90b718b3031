"""The figure of a MoE expert sweep: each expert's damage against its share of the routing, one panel per layer.

An expert that the scored tokens rarely select can only do little damage on this text; one that does much damage
with a small share is the one a recipe should keep precise (docs/moe.md, "Reading an expert sweep").
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd


def expert_points(df: pd.DataFrame) -> pd.DataFrame:
    """Single-expert points of one layer with routing columns (`expert` a number, not "all" or a list)."""
    if "expert" not in df or "router_share" not in df:
        return df.iloc[0:0]
    single = df["expert"].astype(str).str.fullmatch(r"\d+") & df["layer"].notna() & df["router_share"].notna()
    return df[single & df["status"].isin(["ok", "no-op"])]


def expert_routing(df: pd.DataFrame, metric: str = "kld_mean") -> plt.Figure | None:
    """Per layer: the metric against router_share, one marker per (tensor, format) series, labelled with the
    expert; no-op points (experts never selected) drawn as crosses at 0. None when the table has no expert points."""
    points = expert_points(df)
    if points.empty or metric not in points:
        return None
    layers = sorted(points["layer"].dropna().astype(int).unique())
    fig, axes = plt.subplots(1, len(layers), figsize=(max(6.0, 4.5 * len(layers)), 4), squeeze=False)
    for ax, layer in zip(axes[0], layers):
        rows = points[points["layer"] == layer]
        for (tensor, fmt), series in rows.groupby(["tensor", "fmt"]):
            ok = series[series["status"] == "ok"]
            ax.scatter(ok["router_share"], ok[metric], s=18, label=f"{tensor} {fmt}")
            noop = series[series["status"] == "no-op"]
            ax.scatter(noop["router_share"], [0.0] * len(noop), marker="x", color="grey")
            for r in series.itertuples():
                y = getattr(r, metric) if r.status == "ok" else 0.0
                ax.annotate(f"E{r.expert}", (r.router_share, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("router share of the expert (scored tokens)")
        ax.set_ylabel(metric)
        ax.set_title(f"layer {layer}")
        ax.legend(fontsize=7)
    fig.suptitle("expert damage vs. routing share (x: never selected, a no-op)", fontsize=9)
    fig.tight_layout()
    return fig
