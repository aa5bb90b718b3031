"""The plan before the run: points, baselines, disk, memory and time, and the refusal when the disk is too small."""

from __future__ import annotations

import os
import shutil
import sys
from collections import namedtuple

import pytest
from test_sweep import run_sweep, tiny_args

from sweep import __main__ as cli
from sweep.choices import launcher_kind
from sweep.cluster.launcher import checks_generation_in_a_task
from sweep.errors import SweepError
from sweep.llama.model_file import model_info
from sweep.pipeline import costs as planning
from sweep.pipeline.config import compose
from sweep.pipeline.grid import plan

N_CTX, N_CHUNKS = 64, 3  # tiny_args' slice
SCORED = N_CTX // 2 - 1


def args(tiny_model, tmp_path, *axes):
    return tiny_args(tiny_model, tmp_path, "run.threads=1", *axes)  # see test_architectures.py on threads


def grid(tiny_model, tmp_path, wikitext, *axes):
    return plan([*args(tiny_model, tmp_path, *axes), f"data.path={wikitext}"])


def logits_bytes(model) -> int:
    return N_CHUNKS * SCORED * model_info(model).n_vocab * 4


def listing(path):
    return sorted(p.relative_to(path) for p in path.rglob("*")) if path.exists() else []


def test_plan_prints_the_figures_and_writes_nothing(tiny_model, tmp_path, env, cache_dir):
    cache_before = listing(cache_dir)
    proc = run_sweep(args(tiny_model, tmp_path, "layer=0,1", "fmt=bf16,int8", "kind=weight,activation",
                               "--plan"), env)
    out = proc.stdout
    print(out)
    assert "points      8" in out and "baselines   1 needed, 0 already stored" in out
    size = planning.gb(logits_bytes(tiny_model))
    assert f"baseline logits {size}" in out
    assert "memory      one job ~" in out and "one window  " in out and "an estimate" in out
    assert "launcher    sequential" in out
    assert not (tmp_path / "store").exists() and not (tmp_path / "sweep").exists()  # nothing written
    assert listing(cache_dir) == cache_before  # not even the F32 container


def test_stored_points_and_baselines_count_as_zero(tiny_model, tmp_path, env, wikitext):
    axes = ("layer=0,1", "fmt=int8", "kind=activation", "tensor=l_out")
    before = planning.costs(grid(tiny_model, tmp_path, wikitext, *axes))
    assert (before.n_points, before.n_points_stored, before.logits_bytes) == (2, 0, logits_bytes(tiny_model))
    run_sweep(args(tiny_model, tmp_path, "layer=0", *axes[1:]), env)  # one of the two points
    after = planning.costs(grid(tiny_model, tmp_path, wikitext, *axes))
    assert (after.n_points, after.n_points_stored, after.logits_bytes) == (2, 1, 0)
    assert [b.stored for b in after.baselines] == [True]
    assert after.records_bytes == before.records_bytes // 2  # one point left to record


def test_native_container_needs_one_baseline_or_one_per_copied_target(tiny_model, tmp_path, wikitext):
    # ffn_down is Q4_1, ffn_norm F32. By default every point runs on the file as it is (ffn_down through its delta):
    # one baseline, no copy.
    delta = planning.costs(grid(tiny_model, tmp_path, wikitext, "model.container=native", "layer=0,1",
                                "tensor=ffn_down,ffn_norm", "kind=weight", "fmt=int8"))
    assert [b.label for b in delta.baselines] == ["native container"] and delta.groups[0].copy_bytes == 0
    assert delta.logits_bytes == logits_bytes(tiny_model)
    # model.native_weights=copy: each ffn_down layer runs on its own copy, with its own baseline
    c = planning.costs(grid(tiny_model, tmp_path, wikitext, "model.container=native", "model.native_weights=copy",
                            "layer=0,1", "tensor=ffn_down,ffn_norm", "kind=weight", "fmt=int8"))
    labels = sorted(b.label for b in c.baselines)
    assert labels == ["native container", "native container, blk.0.ffn_down.weight dequantized to F32",
                      "native container, blk.1.ffn_down.weight dequantized to F32"]
    assert c.logits_bytes == 3 * logits_bytes(tiny_model)
    assert c.groups[0].copy_bytes > c.groups[0].model_bytes  # the copy is loaded beside the model
    f32 = planning.costs(grid(tiny_model, tmp_path, wikitext, "layer=0,1", "tensor=ffn_down,ffn_norm",
                              "kind=weight", "fmt=int8"))
    assert len(f32.baselines) == 1 and f32.groups[0].copy_bytes == 0
    assert planning.costs(grid(tiny_model, tmp_path, wikitext, "layer=0", "metrics.kld=false")).logits_bytes == 0


def test_a_weight_point_holds_its_targets_originals_in_f32(tiny_model, tmp_path, wikitext):
    """apply.py keeps every target's original values to restore them: a whole-file point (tensor=all layer=null)
    holds the model's weights twice, and the plan says so."""
    from gguf import GGUFReader

    elements = {t.name: int(t.n_elements) for t in GGUFReader(tiny_model).tensors}
    one = planning.costs(grid(tiny_model, tmp_path, wikitext, "layer=0", "tensor=ffn_down", "kind=weight"))
    every = planning.costs(grid(tiny_model, tmp_path, wikitext, "layer=null", "tensor=all", "kind=weight"))
    activation = planning.costs(grid(tiny_model, tmp_path, wikitext, "layer=0", "kind=activation"))
    assert one.groups[0].originals_bytes == 4 * elements["blk.0.ffn_down.weight"]
    assert every.groups[0].originals_bytes == 4 * sum(elements.values())
    assert activation.groups[0].originals_bytes == 0
    assert every.job_memory - activation.job_memory == every.groups[0].originals_bytes


def fake_disk(free: int):
    usage = namedtuple("usage", "total used free")
    return lambda path: usage(free * 4, free * 3, free)


def test_a_store_that_does_not_fit_stops_the_sweep_with_one_line(tiny_model, tmp_path, wikitext, monkeypatch,
                                                                  capsys):
    # Free space for everything but half the baseline's logits (the F32 container may have to be built too).
    without_logits = planning.costs(grid(tiny_model, tmp_path, wikitext, "layer=0", "kind=weight",
                                         "metrics.kld=false"))
    free = without_logits.needed_bytes + logits_bytes(tiny_model) // 2
    monkeypatch.setattr(shutil, "disk_usage", fake_disk(free))
    monkeypatch.setenv("SWEEP_WIKITEXT", str(wikitext))
    monkeypatch.setattr(sys, "argv", ["sweep", *args(tiny_model, tmp_path, "layer=0", "kind=weight")])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    print(err[-1])
    assert len(err) == 1 and err[0].startswith("error: the sweep needs ")
    for way_out in ("data.n_windows=N", "metrics.kld=false", "run.store=", "metrics.baseline_logits=recompute"):
        assert way_out in err[0]
    assert f"{planning.gb(free)} is free" in err[0]
    assert not (tmp_path / "store").exists() and not (tmp_path / "sweep").exists()
    # without the logits the same sweep fits
    planning.check_resources(planning.costs(grid(tiny_model, tmp_path, wikitext, "layer=0", "kind=weight",
                                                 "metrics.kld=false")))


def test_a_job_larger_than_the_memory_stops_the_sweep(tiny_model, tmp_path, wikitext, monkeypatch):
    c = planning.costs(grid(tiny_model, tmp_path, wikitext, "layer=0", "kind=weight", "model.container=f32"))
    c.available_memory = 2**20
    with pytest.raises(SweepError, match=r"^one job of tiny.gguf in the f32 container needs about .*, more than the "
                                         r"1.0 MB available on this machine now: use model.container=native"):
        planning.check_resources(c)


def test_slurm_plan_is_per_task(tiny_model, tmp_path, wikitext, capsys):
    planning.print_plan([*tiny_args(tiny_model, tmp_path, "layer=0,1,2", "kind=weight", "fmt=int8",
                                    "metrics.generate=false"), f"data.path={wikitext}", "hydra/launcher=slurm",
                         "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=8"])
    out = capsys.readouterr().out
    print(out)
    assert "launcher    slurm: 3 tasks, 1 point per task, 1 thread per task (cpus_per_task)" in out
    assert "vs mem_gb=8" in out and "per task ~" in out


def test_joblib_jobs_share_the_cores_and_add_up_their_memory(tiny_model, tmp_path, wikitext, monkeypatch):
    c = planning.costs(plan([*tiny_args(tiny_model, tmp_path, "layer=0,1,2", "kind=weight"), f"data.path={wikitext}",
                             "hydra/launcher=parallel", "hydra.launcher.n_jobs=2"]))
    cores = len(os.sched_getaffinity(0))
    assert (c.launcher, c.concurrent_jobs, c.threads) == ("joblib", 2, max(1, cores // 2))
    c.available_memory = int(1.5 * c.job_memory)
    assert planning.memory_warnings(c)[0].startswith("2 jobs at once x about ")  # one fits, two do not


@pytest.mark.parametrize("launcher, kind, task_checks", [
    (None, "basic", False), ("parallel", "joblib", False), ("slurm", "slurm", True),
    ("submitit_slurm", "slurm", False), ("submitit_local", "submitit_local", False)])
def test_the_launcher_kind_comes_from_its_class(launcher, kind, task_checks):
    """One mapping from hydra.launcher to what runs the jobs; only ours of the SLURM launchers runs the generation
    check as a task (its class says so)."""
    cfg = compose([f"hydra/launcher={launcher}"] if launcher else [], with_hydra=True).hydra.launcher
    assert launcher_kind(cfg) == kind
    assert checks_generation_in_a_task(cfg) is task_checks
    assert launcher_kind(None) == "basic" and launcher_kind({"_target_": "elsewhere.RayLauncher"}) == "other"
