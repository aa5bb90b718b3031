"""The sensitivity map (run.estimate=map, sweep/estimate/): every point of the grid gets a row and `estimated` is
right, the exact rows are the exact points, the predictions follow the exact grid on a tiny F32 model, activations
are refused, a wrong calibration point fails the fit's check, and --refine measures the ambiguous points and no
others. The figures on the real model are bench/estimate/map_vs_grid.py's (docs/estimate.md)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from gguf import GGMLQuantizationType
from test_sweep import ROOT, run_sweep, tiny_args

from sweep.errors import SweepError
from sweep.estimate import law
from sweep.estimate.plan import Cell, MapPlan, cell_of, choose
from sweep.estimate.rows import gather_table
from sweep.estimate.weight_error import relative_errors
from sweep.pipeline.config import compose
from sweep.pipeline.settings import job_settings
from sweep.quant.formats import make_format
from sweep.recipe.refine import ambiguous
from sweep.recipe.sizes import SourceModel
from sweep.recipe.solve import make_recipe
from sweep.recipe.table import read_table
from sweep.store.records import gather
from sweep.testing.tiny_model import write_tiny_model

TYPES = ("q2_K", "q3_K", "q4_K", "q6_K", "q8_0")


# ---- the parts, on numbers ---------------------------------------------------------------------------------------

def test_weighted_error_weighs_columns_by_their_input_power():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 8)).astype(np.float32)
    q = w.copy()
    q[:, 0] += 0.1  # error only in column 0
    flat = relative_errors(w, q, None)
    assert flat.weighted == flat.unweighted == pytest.approx(np.sum((q - w) ** 2) / np.sum(w ** 2))
    stat = np.ones(8)
    stat[0] = 100.0  # column 0's input is loud: its error counts 100x
    loud = relative_errors(w, q, stat)
    assert loud.unweighted == flat.unweighted and loud.weighted > 5 * flat.weighted
    stat[0] = 0.0  # ... or silent: its error costs nothing
    assert relative_errors(w, q, stat).weighted == 0.0


def _cells(n_layers=6, fmts=("q2_K", "q4_K", "q8_0"), cls="ffn_down.weight"):
    bpw = {"q2_K": 2.625, "q3_K": 3.44, "q4_K": 4.5, "q6_K": 6.56, "q8_0": 8.5}
    return [Cell(i * len(fmts) + j, f"blk.{i}.{cls}", cls, i, f, f, bpw[f]) for i in range(n_layers)
            for j, f in enumerate(fmts)]


def test_plan_measures_one_calibration_per_tensor_and_spread_checks():
    cells = _cells(9)
    plan = choose(cells, len(cells) + 2, None, 3)  # two jobs that are not cells: measured as they are
    assert set(plan.calibration.values()) == {"q4_K"} and len(plan.calibration) == 9
    assert plan.checks == {"blk.1.ffn_down.weight": "q2_K", "blk.4.ffn_down.weight": "q2_K",
                           "blk.7.ffn_down.weight": "q2_K"}
    assert plan.unmapped == 2 and len(plan.exact_jobs) == 9 + 3 + 2 and len(plan.predicted) == 27 - 12
    assert MapPlan.from_json(json.loads(json.dumps(plan.to_json()))).to_json() == plan.to_json()


@pytest.mark.parametrize("overrides, mapped", [
    (["fmt=q4_K", "fmt.imatrix=/x.imatrix.gguf"], True),
    (["fmt=q4_K", "fmt.granularity=per_tensor"], True),
    (["fmt=int8"], False),  # a float format: measured exactly
    (["fmt=q4_K", "kind=activation"], False),
])
def test_a_cell_is_read_from_a_points_settings(overrides, mapped):
    """The grid's points are (settings, target): a cell's params are fmt.* as configured, JSON and back the same
    format."""
    cfg = compose(["tensor=ffn_down", *overrides])
    s = job_settings(cfg)
    target = SimpleNamespace(names=["blk.3.ffn_down.weight"], layers=(3,), experts=())
    info = SimpleNamespace(tensor_shapes={"blk.3.ffn_down.weight": (256, 64)}, n_experts=0)
    c = cell_of(7, s, target, info)
    if not mapped:
        assert c is None
        return
    assert c is not None and (c.job, c.cls, c.layer, c.fmt, c.stored) == (7, "ffn_down.weight", 3, "q4_K", "q4_K")
    assert c.params == {k: v for k, v in dict(cfg.fmt).items() if v is not None}
    assert make_format(**json.loads(json.dumps(c.params))) == s.point.fmt


def test_law_recovers_the_exponent_and_its_check_catches_a_wrong_point():
    cells = _cells(6)
    errors = {(c.tensor, c.fmt): {"q2_K": 1e-1, "q4_K": 4e-3, "q8_0": 1e-4}[c.fmt] * (1 + c.layer)
              for c in cells}
    scale = {i: 1e-3 * (i + 1) ** 2 for i in range(6)}  # each layer its own sensitivity
    truth = {(c.tensor, c.fmt): scale[c.layer] * (errors[c.tensor, c.fmt] / errors[c.tensor, "q4_K"]) ** 1.2
             for c in cells}
    plan = choose(cells, len(cells), None, 3)
    exact = {k: law.Exact(truth[k], 0.0) for k in truth if next(c.job for c in cells if (c.tensor, c.fmt) == k)
             in plan.exact_jobs}
    classes = {c.tensor: c.cls for c in cells}
    fit = law.fit(classes, errors, exact, plan.calibration, tolerance=3.0)
    assert fit.alpha["ffn_down.weight"] == pytest.approx(1.2)
    c = next(c for c in cells if c.fmt == "q8_0")
    p = law.predict(fit, c.cls, c.tensor, c.fmt, errors, "q4_K", exact[c.tensor, "q4_K"])
    assert p.kld == pytest.approx(truth[c.tensor, c.fmt]) and p.lo <= p.kld <= p.hi
    wrong = dict(exact)
    checked = next(iter(plan.checks))
    wrong[checked, "q4_K"] = law.Exact(truth[checked, "q4_K"] * 20, 0.0)  # a planted calibration point
    with pytest.raises(SweepError, match="the map's check failed: .*off"):
        law.fit(classes, errors, wrong, plan.calibration, tolerance=3.0)
    with pytest.raises(SweepError, match="measured on another weight or format"):
        law.check_calibration(checked, "q4_K", measured_rel_mse=1e-1, computed=4e-3)


# ---- the sweep, on a tiny F32 model ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mapped(tmp_path_factory, smollm2, wikitext, cache_dir):
    """A map of layers 0-2 x attn_q, ffn_down x five types (plus bf16, which the map cannot predict), then the
    same grid exactly, both on one store."""
    import os

    tmp = tmp_path_factory.mktemp("estimate")
    model = write_tiny_model(tmp / "tiny-f32.gguf", smollm2, n_embd=256, n_ff=512,
                             matmul_type=GGMLQuantizationType.F32, embd_type=GGMLQuantizationType.F32)
    env = {**os.environ, "SWEEP_WIKITEXT": str(wikitext), "SWEEP_CACHE": str(cache_dir)}
    axes = ["layer=0,1,2", "tensor=attn_q,ffn_down", "kind=weight", f"fmt={','.join(TYPES)},bf16",
            "metrics.generate=false"]
    proc = run_sweep(tiny_args(model, tmp, *axes, "run.estimate=map", "run.map_checks=1", sweep_dir="map"), env)
    exact = run_sweep(tiny_args(model, tmp, *axes, sweep_dir="exact"), env)
    return {"tmp": tmp, "model": model, "env": env, "out": proc.stdout, "exact_out": exact.stdout}


def test_every_point_gets_a_row_and_estimated_says_which(mapped):
    tmp = mapped["tmp"]
    df = pd.read_parquet(tmp / "map" / "results.parquet")
    plan = MapPlan.read(tmp / "map")
    assert len(df) == 3 * 2 * 6 == len(plan.jobs)  # every point of the grid
    assert df[["layer", "tensor", "fmt"]].drop_duplicates().shape[0] == len(df)
    exact_keys = {(c.tensor, c.fmt) for c in plan.cells if c.job in plan.exact_jobs}
    for r in df.itertuples():
        measured = r.fmt == "bf16" or (r.targets, r.fmt) in exact_keys
        assert bool(r.estimated) == (not measured), (r.targets, r.fmt)
        assert (pd.notna(r.ppl)) == measured  # a prediction has no perplexity: nothing is made up
        if not measured:
            assert r.estimate_lo <= r.kld_mean <= r.estimate_hi and "q4_K" in r.calibrated_by
    assert (df["fmt"] == "bf16").sum() == 6 and not df.loc[df["fmt"] == "bf16", "estimated"].any()
    assert "6 the map cannot predict" in mapped["out"] and "layer-tokens" in mapped["out"]
    assert "estimated (~" in mapped["out"]  # the ranking says which rows are predictions


def test_exact_rows_are_the_exact_points_and_predictions_follow_them(mapped):
    tmp = mapped["tmp"]
    m = pd.read_parquet(tmp / "map" / "results.parquet").set_index(["targets", "fmt"])
    e = pd.read_parquet(tmp / "exact" / "results.parquet").set_index(["targets", "fmt"])
    assert not e["estimated"].any()
    measured = m[~m["estimated"]]
    assert (measured["kld_mean"] == e.loc[measured.index, "kld_mean"]).all()  # the same points, from the store
    pred = m[m["estimated"]]
    ratio = np.abs(np.log(pred["kld_mean"] / e.loc[pred.index, "kld_mean"]))
    assert float(np.median(ratio)) < 0.3, ratio.describe()


def test_report_and_recipe_read_the_map(mapped):
    tmp = mapped["tmp"]
    df = gather_table([tmp / "map"])
    assert df["estimated"].sum() == len(MapPlan.read(tmp / "map").predicted)
    table = read_table([tmp / "map"])
    assert any(m.estimated for m in table.rows.values()) and any(not m.estimated for m in table.rows.values())
    proc = subprocess.run([sys.executable, "-m", "sweep", "report", str(tmp / "map")], cwd=ROOT, env=mapped["env"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "estimated from q4_K" in proc.stdout


def test_activations_are_refused_in_one_line(tmp_path, tiny_model, env):
    proc = run_sweep(tiny_args(tiny_model, tmp_path, "layer=0", "tensor=ffn_out", "kind=activation", "fmt=bf16",
                               "run.estimate=map"), env, check=False)
    assert proc.returncode == 2 and not (tmp_path / "sweep").exists()
    assert proc.stderr.strip().count("\n") == 0 and "activation points stay exact" in proc.stderr


def test_a_planted_calibration_point_fails_the_check(mapped, tmp_path):
    """A check tensor's calibration record made 20x worse in the store: rerun, the check fails in one line, exit
    1, and the table keeps the measured rows only."""
    tmp = mapped["tmp"]
    plan = MapPlan.read(tmp / "map")
    tensor = next(iter(plan.checks))
    records = gather([tmp / "map"])
    key = records[(records["targets"] == tensor) & (records["fmt"] == plan.calibration[tensor])]["key"].iloc[0]
    stored = tmp / "store" / "points" / f"{key}.json"
    original = stored.read_text()
    try:
        data = json.loads(original)
        data["kld_mean"] *= 20
        stored.write_text(json.dumps(data))
        axes = ["layer=0,1,2", "tensor=attn_q,ffn_down", "kind=weight", f"fmt={','.join(TYPES)},bf16",
                "metrics.generate=false", "run.estimate=map", "run.map_checks=1"]
        proc = run_sweep(tiny_args(mapped["model"], tmp, *axes, sweep_dir="planted"), mapped["env"], check=False)
    finally:
        stored.write_text(original)
    assert proc.returncode == 1, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "the map's check failed" in errors[0] and tensor in errors[0]
    df = pd.read_parquet(tmp / "planted" / "results.parquet")
    assert not df["estimated"].any() and len(df) == len(plan.exact_jobs)


def test_refine_measures_the_ambiguous_points_and_no_others(mapped, tmp_path):
    """Types of nearly equal damage (q4_0, q4_1, q4_K, q5_0): their predicted intervals overlap."""
    tmp, env = mapped["tmp"], mapped["env"]
    fmts = ["q4_0", "q4_1", "q4_K", "q5_0"]
    run_sweep(tiny_args(mapped["model"], tmp, "layer=0,1,2", "tensor=attn_q,ffn_down", "kind=weight",
                        f"fmt={','.join(fmts)}", "metrics.generate=false", "run.estimate=map", "run.map_checks=1",
                        sweep_dir="near"), env)
    table, source = read_table([tmp / "near"]), SourceModel(mapped["model"])
    bpw = 8.345
    first = make_recipe(table, source, fmts, int(bpw * source.n_elements / 8), "tensors")
    expected = ambiguous(first, table, source, fmts)
    assert len(expected) > 2  # else this test would check nothing
    out = tmp_path / "recipe"
    proc = subprocess.run([sys.executable, "-m", "sweep", "recipe", str(tmp / "near"), "--types", ",".join(fmts),
                           "--bpw", str(bpw), "--out", str(out), "--refine", "2"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "refine: round 1:" in proc.stdout and "measured 2 exactly" in proc.stdout
    measured = gather([out / "refine" / "round-1"])
    assert set(zip(measured["targets"], measured["fmt"])) == set(expected[:2])
    assert not (out / "refine" / "round-2").exists()  # the budget of 2 points is spent in round 1
    assert math.isfinite(json.loads((out / "recipe.json").read_text())["predicted_damage"])


def test_experts_of_a_stack_are_mapped_one_by_one(tmp_path, smollm2, env):
    """A MoE model's expert stack: each expert asked for is a weight of the map, with its own calibration."""
    model = write_tiny_model(tmp_path / "tiny-qwen3moe.gguf", smollm2, arch="qwen3moe")
    proc = run_sweep(tiny_args(model, tmp_path, "layer=0,1", "tensor=ffn_down_exps", "kind=weight", "expert=0,1",
                               "fmt=q4_0,q3_K,q8_0", "metrics.generate=false", "run.estimate=map",
                               "run.map_checks=1"), env)
    df = pd.read_parquet(tmp_path / "sweep" / "results.parquet")
    assert len(df) == 2 * 2 * 3 and set(df["expert"]) == {"0", "1"}
    plan = MapPlan.read(tmp_path / "sweep")
    assert set(plan.calibration) == {f"blk.{b}.ffn_down_exps.weight[{e}]" for b in (0, 1) for e in (0, 1)}
    assert df["estimated"].sum() == len(plan.predicted) > 0 and "predicted from 4 calibration" in proc.stdout


def test_a_predicted_format_that_holds_the_weight_exactly_is_a_no_op(tmp_path, tiny_model, env):
    """The tiny model is Q4_1: q4_1 re-encodes it exactly. Predicted from q8_0, its rows say no-op, never 'ok'."""
    run_sweep(tiny_args(tiny_model, tmp_path, "layer=0,1", "tensor=ffn_down", "kind=weight", "fmt=q4_0,q4_1,q8_0",
                        "metrics.generate=false", "run.estimate=map", "run.map_calibrate=q8_0", "run.map_checks=1"),
              env)
    df = pd.read_parquet(tmp_path / "sweep" / "results.parquet").set_index(["layer", "fmt"])
    exact = df.loc[[(layer, "q4_1") for layer in (0, 1)]]
    assert exact["estimated"].all() and (exact["status"] == "no-op").all() and (exact["kld_mean"] == 0).all()
    assert exact["reason"].str.contains("holds the weight exactly").all()
