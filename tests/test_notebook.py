"""The analysis notebook runs headless on a small real sweep of the embedded model, and its figures hold the
expected series."""

from __future__ import annotations

import nbformat
import pytest
from nbclient import NotebookClient
from test_sweep import ROOT, run_sweep

from sweep.report import plots

pytestmark = pytest.mark.slow  # one real sweep of the embedded model serves every test here

AXES = ["layer=0,15,29", "fmt=bf16,int8", "kind=weight,activation", "tensor=ffn_norm", "data.n_windows=2",
        "metrics.max_new_tokens=8", "run.progress=false"]


@pytest.fixture(scope="module")
def real_sweep(tmp_path_factory, wikitext, cache_dir):
    import os

    tmp = tmp_path_factory.mktemp("nb")
    env = {**os.environ, "SWEEP_WIKITEXT": str(wikitext), "SWEEP_CACHE": str(cache_dir)}
    run_sweep([*AXES, f"run.store={tmp / 'store'}", f"hydra.sweep.dir={tmp / 'sweep'}"], env)
    return tmp / "sweep"


@pytest.mark.real_model
def test_the_table_has_what_the_figures_need(real_sweep):
    df = plots.load_results(real_sweep)
    assert len(df) == 12
    noop = df[df["status"] == "no-op"]
    assert set(noop["kind"]) == {"weight"} and set(noop["fmt"]) == {"bf16"} and len(noop) == 3


@pytest.mark.real_model
def test_curves_hold_one_series_per_tensor_kind_and_mark_no_ops(real_sweep):
    df = plots.load_results(real_sweep)
    fig = plots.sensitivity_curves(df, "delta_ppl")
    panels = {ax.get_title(): ax for ax in fig.axes}
    assert set(panels) == {"fmt = bf16", "fmt = int8/per_row"}
    labels = lambda ax: {t.get_text() for t in ax.get_legend().get_texts()}  # noqa: E731
    assert labels(panels["fmt = int8/per_row"]) == {"ffn_norm (activation)", "ffn_norm (weight)"}
    assert labels(panels["fmt = bf16"]) == {"ffn_norm (activation)", "ffn_norm (weight): no-op, nothing changed"}
    (line,) = panels["fmt = int8/per_row"].get_lines()[:1]
    assert list(line.get_xdata()) == [0, 15, 29]
    assert len(panels["fmt = bf16"].collections) >= 2  # the activation's band and the no-op markers
    fig = plots.sensitivity_curves(df, "kld_mean")
    kld_panels = {ax.get_title(): ax for ax in fig.axes}
    assert set(kld_panels) == {"fmt = bf16", "fmt = int8/per_row"}
    assert {ax.get_yscale() for ax in kld_panels.values()} == {"log"}
    assert labels(kld_panels["fmt = int8/per_row"]) == {"ffn_norm (activation)", "ffn_norm (weight)"}
    assert all((line.get_ydata() > 0).all() for line in kld_panels["fmt = int8/per_row"].get_lines()[:2])
    fig, rho = plots.proxy_scatter(df, "kld_mean")
    assert -1 <= rho <= 1 and "Spearman" in fig.axes[0].get_title()
    fig = plots.heatmaps(df, "kld_mean")
    assert [ax.get_title() for ax in fig.axes if ax.get_title()] == [
        "kld_mean — fmt = bf16 (hatched: no-op)", "kld_mean — fmt = int8/per_row (hatched: no-op)"]


@pytest.mark.real_model
def test_notebook_executes_headless(real_sweep, monkeypatch, tmp_path):
    monkeypatch.setenv("SWEEP_RESULTS", str(real_sweep))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(ROOT / "notebooks" / "sensitivity.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 4
    text = "".join(o.get("text", "") for o in outputs)
    assert "12 points" in text and "Spearman rho" in text


@pytest.mark.real_model
def test_report_writes_the_same_figures_as_pngs(real_sweep, tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "sweep.report", str(real_sweep), "--plots", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in tmp_path.glob("*.png")} == {
        "curves_delta_ppl.png", "heatmap_delta_ppl.png", "curves_kld.png", "heatmap_kld.png",
        "proxy_sqnr_vs_kld.png", "proxy_sqnr_vs_delta_ppl.png",
        "size_vs_damage.png"}  # weight points carry bits per weight (here bf16/int8 against the F32 norms)
