"""The sweep's front door: config composition, grid validation before any job, records, resume, launchers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from sweep.errors import SweepError
from sweep.pipeline.config import CONF_DIR
from sweep.pipeline.config import compose as sweep_compose
from sweep.pipeline.grid import JobComposer, plan
from sweep.pipeline.job import cores_for_this_job
from sweep.scoring.metrics import EarlyStop, StopRule

ROOT = Path(__file__).resolve().parents[1]
REQUIRED_COLUMNS = ["layer", "tensor", "kind", "fmt", "status", "ppl", "ppl_stderr", "baseline_ppl", "delta_ppl",
                    "delta_ppl_stderr", "frac_changed", "n_elements", "container", "model_sha256", "n_windows",
                    "n_ctx"]


def tiny_args(tiny_model, tmp_path, *axes, store="store", sweep_dir="sweep"):
    return [f"model.path={tiny_model}", "data.n_ctx=64", "data.n_windows=3", "run.progress=false",
            f"run.store={tmp_path / store}", f"hydra.sweep.dir={tmp_path / sweep_dir}", *axes]


def run_sweep(args, env, check=True, **kw):
    proc = subprocess.run([sys.executable, "-m", "sweep", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600, **kw)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


# ---- configuration --------------------------------------------------------------------------------------------

def test_config_composes_as_a_sweep_by_default():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", return_hydra_config=True)
        assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
        assert cfg.hydra.sweeper.params == {"kind": "weight,activation", "layer": "each"}
        assert (cfg.tensor, cfg.fmt.name, cfg.model.container, cfg.data.n_ctx) == ("ffn_norm", "bf16", "auto", 512)
        cfg = compose("config", overrides=["fmt=int8", "fmt.granularity=per_tensor"])
        assert (cfg.fmt.name, cfg.fmt.granularity) == ("int8", "per_tensor")


def test_each_job_is_composed_as_hydra_composes_it(tiny_model, wikitext):
    """The grid's fast composition (one Hydra compose per choice of config groups, the other values set on a copy)
    gives every job exactly the configuration of Hydra's own compose; what it cannot set goes through compose."""
    base = [f"model.path={tiny_model}", f"data.path={wikitext}"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        groups = set(compose("config", return_hydra_config=True).hydra.runtime.choices)
    composer = JobComposer(groups)
    jobs = [[*base, f"layer={layer}", f"fmt={fmt}", f"kind={kind}", "tensor=ffn_down"]
            for layer in (0, 2) for fmt in ("bf16", "int8", "q4_K") for kind in ("weight", "activation")]
    jobs += [[*base, "fmt=int8", "fmt.granularity=per_tensor", "layer=1", "data.n_ctx=64", "run.prefix_starts=[1,2]"],
             [*base, "fmt=fp8_e4m3", "layer=null", "model.container=native", "metrics.generate=top:2"],
             [*base, "+run.note=x"],  # an added key: through Hydra's compose
             [*base, "run.thredas=2"]]  # a typo the schema refuses: Hydra's compose says so, in one line
    for job in jobs[:-1]:
        assert OmegaConf.to_container(composer(job)) == OmegaConf.to_container(sweep_compose(job)), job
    assert len(composer.composed) == 4  # bf16, int8, q4_K, fp8_e4m3: one Hydra compose each
    with pytest.raises(SweepError, match="bad configuration.*thredas"):
        composer(jobs[-1])


def test_plan_expands_the_grid_and_layer_each(tiny_model, wikitext):
    jobs = plan([f"model.path={tiny_model}", f"data.path={wikitext}", "layer=range(0,3)", "fmt=bf16,int8",
                 "kind=weight"]).jobs
    assert len(jobs) == 6
    p = plan([f"model.path={tiny_model}", f"data.path={wikitext}"])  # defaults: layer=each, kind=weight,activation
    assert len(p.jobs) == 3 * 2 and {a for job in p.launch for a in job if a.startswith("layer=")} == {
        "layer=0", "layer=1", "layer=2"}


@pytest.mark.parametrize("args, message", [
    (["layer=40"], "layer 40 is out of range: the model has 3 blocks (layers 0..2)"),
    (["layer=1", "tensor=ffn_nrom", "kind=weight"], "unknown weight tensor 'ffn_nrom'"),
    (["layer=1", "tensor=ffn_nrom", "kind=activation"], "the graph has no node 'ffn_nrom-1'; per-layer nodes:"),
    (["layer=1", "fmt=bf17"], "Could not find 'fmt/bf17' Available options in 'fmt': bf16 fp16"),
    (["layer=1", "fmt=bf16,int9"], "Could not find 'fmt/int9'"),
    (["layer=1", "fmt=int8", "fmt.granularity=per_col"], "'per_col', expected one of [per_tensor, per_row, per_token]"),
    (["layer=1", "fmt.granulrity=x"], "Key 'granulrity' not in 'FormatConfig'"),
    (["layer=1", "kind=weights"], "Invalid value 'weights', expected one of [weight, activation]"),
    (["layer=1", "model.container=q8"], "Invalid value 'q8', expected one of [auto, f32, native]"),
    (["layer=1", "metrics.rank_by=kld"], "Invalid value 'kld', expected one of [delta_ppl, delta_nll, kld_mean"),
    (["layer=1", "metrics.baseline_logits=disk"], "Invalid value 'disk', expected one of [store, recompute]"),
    (["layer=1", "kind=activation", "tensor=Qcur"], "2 computed graph nodes are named 'Qcur-1'"),
    (["layer=1", "kind=activation", "tensor=kq", "fmt=int8"], "node 'kq' does not have one row per token"),
    (["layer=1", "model.rpc=127.0.0.1:50052"], "offloads nothing with model.n_gpu_layers=0"),
    (["layer=1", "model.rpc=localhost", "model.n_gpu_layers=-1"], "'localhost' is not HOST:PORT"),
])
def test_bad_configs_fail_before_any_job_with_one_line(args, message, tiny_model, tmp_path, env):
    proc = run_sweep(tiny_args(tiny_model, tmp_path, *args), env, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert not (tmp_path / "sweep").exists() and not (tmp_path / "store").exists()  # nothing written


def test_plan_raises_sweep_error_in_process(tiny_model, wikitext):
    with pytest.raises(SweepError, match="out of range"):
        plan([f"model.path={tiny_model}", f"data.path={wikitext}", "layer=3"])


def test_threads_are_shared_among_parallel_jobs():
    from omegaconf import OmegaConf

    cores = len(os.sched_getaffinity(0))
    assert cores_for_this_job(None) == cores
    assert cores_for_this_job(OmegaConf.create({"n_jobs": cores})) == 1
    assert cores_for_this_job(OmegaConf.create({"n_jobs": -1})) == 1
    assert cores_for_this_job(OmegaConf.create({"cpus_per_task": 3})) == 3


# ---- running ----------------------------------------------------------------------------------------------------

AXES = ["layer=0,2", "fmt=bf16,int8", "kind=weight,activation", "tensor=ffn_norm"]


def read_table(sweep_dir: Path) -> pd.DataFrame:
    df = pd.read_parquet(sweep_dir / "results.parquet")
    return df.sort_values(["kind", "tensor", "fmt", "layer"]).reset_index(drop=True)


def test_sequential_sweep_writes_one_row_per_point_and_loads_the_model_once(tiny_model, tmp_path, env):
    proc = run_sweep(tiny_args(tiny_model, tmp_path, *AXES), env)
    df = read_table(tmp_path / "sweep")
    assert len(df) == 8 and df["key"].is_unique
    assert set(REQUIRED_COLUMNS) <= set(df.columns)
    assert set(df["status"]) == {"ok"} and (df["frac_changed"] > 0).all()
    assert (tmp_path / "sweep" / "results.csv").exists()
    assert proc.stderr.count("loading ") == 1  # one model load for the eight jobs of this process
    assert "most sensitive first" in proc.stdout
    assert len(list((tmp_path / "sweep").glob("*/record.json"))) == 8
    # a re-run recomputes nothing and gives the same table
    again = run_sweep(tiny_args(tiny_model, tmp_path, *AXES, sweep_dir="sweep2"), env)
    assert again.stderr.count("already done") == 8 and "loading " not in again.stderr
    pd.testing.assert_frame_equal(read_table(tmp_path / "sweep2")[REQUIRED_COLUMNS], df[REQUIRED_COLUMNS])


@pytest.mark.slow
def test_early_stopping_is_recorded_and_stored_apart_from_full_points(tiny_model, tmp_path, env):
    # a rule that stops points whose ΔNLL is confidently below 2e-3 nats: rounding the residual stream to bf16 moves
    # ΔNLL by ~1e-4 per window, so 2 windows settle it; zeroing it moves ΔNLL by 0.02-0.11 nats from window to
    # window, so the same rule lets that point score all 3
    axes = ["layer=1", "fmt=zero,bf16", "kind=activation", "tensor=l_out"]
    early = ["metrics.early_stop.enabled=true", "metrics.early_stop.min_windows=2", "metrics.early_stop.atol=2e-3",
             "metrics.rank_by=delta_nll"]  # the rule watches ΔNLL (the default rank_by is KL)
    run_sweep(tiny_args(tiny_model, tmp_path, *axes, *early, sweep_dir="early"), env)
    df = read_table(tmp_path / "early").set_index("fmt")
    assert df.loc["bf16", "stopped_early"] and df.loc["bf16", "n_windows"] == 2
    assert not df.loc["zero", "stopped_early"] and df.loc["zero", "n_windows"] == 3
    assert len(df.loc["bf16", "window_dnll"]) == 2 and len(df.loc["bf16", "window_baseline_nll"]) == 2
    assert not df.loc["bf16", "significant"] and pd.isna(df.loc["bf16", "delta_nll_p"])  # stopped: untested
    assert pd.notna(df.loc["zero", "delta_nll_p"]) and pd.notna(df.loc["zero", "delta_nll_q"])
    full = run_sweep(tiny_args(tiny_model, tmp_path, *axes, sweep_dir="full"), env)
    assert "already done" not in full.stderr  # an early-stopped record never stands in for a full one
    df_full = read_table(tmp_path / "full").set_index("fmt")
    assert not df_full["stopped_early"].any() and (df_full["n_windows"] == 3).all()
    # the decisions are the rule's on the data: replayed on the full points' first 2 windows, it stops the same ones
    rule = StopRule("delta_nll", EarlyStop(min_windows=2, atol=2e-3))
    for fmt in ("zero", "bf16"):
        first_two = np.asarray(df_full.loc[fmt, "window_dnll"][:2])
        assert bool(rule.settled_means(first_two)) == df.loc[fmt, "stopped_early"]
    bad = run_sweep(tiny_args(tiny_model, tmp_path, *axes, "metrics.early_stop.enabled=true",
                              "metrics.early_stop.min_windows=1", sweep_dir="bad"), env, check=False)
    assert bad.returncode == 2 and "metrics.early_stop needs min_windows >= 2" in bad.stderr


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["parallel", "submitit_local"])
def test_launchers_give_the_sequential_table(launcher, tiny_model, tmp_path, env):
    axes = ["layer=0,2", "fmt=int8", "kind=weight,activation", "tensor=ffn_norm"]
    run_sweep(tiny_args(tiny_model, tmp_path, *axes, store="s1", sweep_dir="seq"), env)
    run_sweep(tiny_args(tiny_model, tmp_path, *axes, f"hydra/launcher={launcher}", store="s2", sweep_dir="par"), env)
    numbers = REQUIRED_COLUMNS + ["delta_nll", "sqnr_db", "n_changed"]
    pd.testing.assert_frame_equal(read_table(tmp_path / "par")[numbers], read_table(tmp_path / "seq")[numbers])


@pytest.mark.slow
def test_kill_9_then_rerun_loses_and_duplicates_nothing(tiny_model, tmp_path, env):
    axes = ["layer=0,1,2", "fmt=bf16,int8,fp16,int4", "kind=activation", "tensor=l_out,ffn_out",
            "data.n_windows=40"]
    args = tiny_args(tiny_model, tmp_path, *axes)
    points = tmp_path / "store" / "points"
    proc = subprocess.Popen([sys.executable, "-m", "sweep", *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and (not points.exists() or len(list(points.glob("*.json"))) < 4):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = sorted(p.name for p in points.glob("*.json"))
    assert 4 <= len(before) < 24, "the sweep must be killed mid-way"
    for p in points.glob("*.json"):
        json.loads(p.read_text())  # every visible record is complete
    rerun = run_sweep(tiny_args(tiny_model, tmp_path, *axes, sweep_dir="rerun"), env)
    assert rerun.stderr.count("already done") == len(before)
    df = read_table(tmp_path / "rerun")
    assert len(df) == 24 and df["key"].is_unique
    assert sorted(p.name for p in points.glob("*.json")) == sorted(f"{k}.json" for k in df["key"])


def test_report_rebuilds_the_table_from_sweep_dirs(tiny_model, tmp_path, env):
    run_sweep(tiny_args(tiny_model, tmp_path, "layer=0,1", "fmt=int8", "kind=weight", "tensor=ffn_down"), env)
    (tmp_path / "sweep" / "results.parquet").unlink()
    proc = subprocess.run([sys.executable, "-m", "sweep.report", str(tmp_path / "sweep")], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "most sensitive first" in proc.stdout and len(read_table(tmp_path / "sweep")) == 2
    bad = subprocess.run([sys.executable, "-m", "sweep.report", str(tmp_path / "nope")], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: not found")
