"""Mixture-of-Experts models: tiny random-weight qwen3moe and qwen2moe GGUFs (sweep/testing/tiny_model.py) swept per
expert through the CLI, with the routing read from llama.cpp's own graph in every record.

Expert NEVER_ROUTED of every layer is never selected by construction (its router row is zero, every other expert
has an opposite twin): its points must be no-ops that say why. Run with `pytest -s` to see the tables.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from test_sweep import ROOT, run_sweep, tiny_args

from sweep.quant.imatrix_file import read as read_imatrix
from sweep.testing.tiny_model import MOE_ARCHITECTURES, N_EXPERT, N_EXPERT_USED, NEVER_ROUTED, write_tiny_model

N_WINDOWS, N_CTX = 3, 64
SCORED = N_WINDOWS * (N_CTX // 2 - 1)  # tokens scored per point
COLUMNS = ["tensor", "layer", "expert", "fmt", "status", "routed_tokens", "router_share", "n_elements",
           "frac_changed", "delta_ppl", "kld_mean", "reason"]


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory, smollm2):
    directory = tmp_path_factory.mktemp("moe-models")
    return {arch: write_tiny_model(directory / f"tiny-{arch}.gguf", smollm2, arch=arch) for arch in MOE_ARCHITECTURES}


def show(title: str, df: pd.DataFrame) -> None:
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.max_colwidth", 60):
        print(f"\n{title}: {len(df)} points\n{df[[c for c in COLUMNS if c in df]].to_string(index=False)}")


def test_expert_each_sweep_of_one_layer(moe_models, tmp_path, env):
    """expert=each on ffn_down_exps of layer 1: one point per expert, each with its routed tokens; the never-routed
    expert is a no-op with that reason, the routed ones changed the output; the routed tokens add up to every
    scored token's N_EXPERT_USED choices."""
    proc = run_sweep(tiny_args(moe_models["qwen3moe"], tmp_path, "layer=1", "kind=weight", "tensor=ffn_down_exps",
                               "expert=each", "fmt=int4", "metrics.generate=false", "run.threads=1"), env)
    df = pd.read_parquet(tmp_path / "sweep" / "results.parquet").sort_values("expert")
    show("qwen3moe, ffn_down_exps L1, expert=each", df)
    print(proc.stdout[-2500:])
    assert df["expert"].tolist() == [str(k) for k in range(N_EXPERT)]
    never = df[df["expert"] == str(NEVER_ROUTED)].iloc[0]
    assert never["status"] == "no-op" and never["routed_tokens"] == 0 and never["router_share"] == 0
    assert "never selected" in never["reason"], never["reason"]
    routed = df[df["expert"] != str(NEVER_ROUTED)]
    assert (routed["status"] == "ok").all(), routed[["expert", "status", "reason"]]
    assert (routed["routed_tokens"] > 0).all() and (routed["kld_mean"] > 0).all()
    assert df["routed_tokens"].sum() == SCORED * N_EXPERT_USED
    assert np.isclose(df["router_share"].sum(), 1.0)
    # one expert's slice only: n_elements is one matrix of the stack
    assert (df["n_elements"] == df["n_elements"].iloc[0]).all()
    per_layer = json.loads(never["routing"])
    assert per_layer["1"][str(NEVER_ROUTED)]["routed_tokens"] == 0
    assert f"E{NEVER_ROUTED}" in proc.stdout and "routed_tokens" in proc.stdout
    # the report's figure of damage against routing share: one panel for the layer, every expert on it
    report = subprocess.run([sys.executable, "-m", "sweep.report", str(tmp_path / "sweep"), "--plots",
                             str(tmp_path / "plots")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-2000:]
    assert (tmp_path / "plots" / "experts_damage_vs_routing.png").stat().st_size > 0


@pytest.mark.slow
def test_activation_per_expert_and_shared_expert(moe_models, tmp_path, env):
    """qwen2moe (shared expert): the rows of ffn_moe_down routed to one expert, per_tensor scale of that expert
    alone, and the shared expert's output node; the never-routed expert rounds no row."""
    model = moe_models["qwen2moe"]
    run_sweep(tiny_args(model, tmp_path, "layer=0", "kind=activation", "tensor=ffn_moe_down",
                        f"expert=0,{NEVER_ROUTED}", "fmt=int8", "fmt.granularity=per_tensor",
                        "metrics.generate=false", "run.threads=1"), env)
    run_sweep(tiny_args(model, tmp_path, "layer=0", "kind=activation", "tensor=ffn_shexp_out", "fmt=int8",
                        "metrics.generate=false", "run.threads=1", sweep_dir="sweep-shexp"), env)
    df = pd.concat([pd.read_parquet(tmp_path / d / "results.parquet") for d in ("sweep", "sweep-shexp")])
    show("qwen2moe activations", df)
    one = df[df["expert"] == "0"].iloc[0]
    assert one["status"] == "ok" and one["routed_tokens"] > 0 and one["kld_mean"] > 0
    # rows of expert 0 in every window, all tokens (context included): more than the scored ones routed to it
    assert one["n_elements"] % 64 == 0 and one["n_elements"] // 64 >= one["routed_tokens"]
    never = df[df["expert"] == str(NEVER_ROUTED)].iloc[0]
    assert never["status"] == "no-op" and never["n_elements"] == 0 and "never selected" in never["reason"]
    shared = df[df["tensor"] == "ffn_shexp_out"].iloc[0]
    assert shared["status"] == "ok" and shared["expert"] == "all"


def test_routing_changes_are_counted(moe_models, tmp_path, env):
    """Rounding the router's logits hard (int4, one scale per token's 5 logits) changes which experts some tokens
    select: the record counts them."""
    run_sweep(tiny_args(moe_models["qwen3moe"], tmp_path, "layer=0", "kind=activation", "tensor=ffn_moe_logits",
                        "fmt=int4", "fmt.group_size=5", "metrics.generate=false", "run.threads=1"), env)
    rec = pd.read_parquet(tmp_path / "sweep" / "results.parquet").iloc[0]
    print(f"\nffn_moe_logits L0 int4/g5: routing_changed {rec['routing_changed']} of {rec['scored_tokens']}"
          f" scored tokens; by layer {rec['routing_changed_by_layer']}")
    assert rec["status"] == "ok" and 0 < rec["routing_changed"] <= SCORED
    assert json.loads(rec["routing_changed_by_layer"])["0"] > 0


@pytest.mark.parametrize("axes, expected", [
    (["kind=activation", "tensor=ffn_moe_argsort"], "holds integer expert ids"),
    (["kind=activation", "tensor=ffn_moe_topk"], "holds integer expert ids"),
    (["kind=weight", "tensor=ffn_gate_inp", "fmt=q4_K"], "never stores this tensor as q4_K"),
    (["kind=weight", "tensor=ffn_gate_inp_shexp", "fmt=q8_0"], "never stores this tensor as q8_0"),
    (["kind=weight", "tensor=ffn_down_exps", f"expert={N_EXPERT}"], "out of range"),
    (["kind=weight", "tensor=attn_q", "expert=1"], "is not a stack of experts"),
    (["kind=activation", "tensor=ffn_out", "expert=1"], "has no rows per expert"),
])
def test_refusals_are_one_line_before_any_job(axes, expected, moe_models, tmp_path, env):
    proc = run_sweep(tiny_args(moe_models["qwen2moe"], tmp_path, "layer=0", *axes), env, check=False)
    lines = proc.stderr.strip().splitlines()
    print(f"\n{' '.join(axes)}: exit {proc.returncode}: {proc.stderr.strip()}")
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0]
    if "integer" in expected:
        assert "ffn_moe_logits" in lines[0] and "ffn_moe_probs" in lines[0]
    assert not (tmp_path / "sweep").exists() and not (tmp_path / "store").exists()


def test_imatrix_counts_per_expert(moe_models, tmp_path, env):
    """sweep.imatrix on a MoE model: one count per expert of each stack, and they add up to every token's
    N_EXPERT_USED choices; the never-routed expert has none."""
    out = tmp_path / "moe.imatrix.gguf"
    proc = subprocess.run([sys.executable, "-m", "sweep.imatrix", f"model.path={moe_models['qwen3moe']}",
                           "data.n_ctx=64", "data.n_windows=3", "run.progress=false", f"out={out}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    im = read_imatrix(out)
    counts = np.asarray(im.counts["blk.0.ffn_down_exps.weight"]).ravel()
    print(f"\nimatrix counts of blk.0.ffn_down_exps.weight per expert: {counts.tolist()}")
    assert len(counts) == N_EXPERT and counts[NEVER_ROUTED] == 0 and (np.delete(counts, NEVER_ROUTED) > 0).all()
    assert counts.sum() == N_WINDOWS * N_CTX * N_EXPERT_USED  # every token of layer 0 chose N_EXPERT_USED experts


def test_recipe_on_the_moe_model_from_its_own_f32_container(moe_models, tmp_path, env):
    """Expert stacks measured in two GGUF types, then sweep.recipe without --source: the measured model's F32
    container is the source (found from the records), the router stays F32 and the built file loads."""
    model = moe_models["qwen3moe"]
    run_sweep(tiny_args(model, tmp_path, "layer=0,1,2", "tensor=ffn_gate_exps,ffn_up_exps,ffn_down_exps",
                        "kind=weight", "fmt=q4_0,q8_0", "metrics.generate=false", "metrics.rank_by=kld_mean",
                        "run.threads=1"), env)
    out = tmp_path / "recipe"
    proc = subprocess.run([sys.executable, "-m", "sweep.recipe", str(tmp_path / "sweep"), "--types", "q4_0,q8_0",
                           "--default-type", "q4_0", "--bpw", "4.6", "--out", str(out), "--build",
                           str(out / "built.gguf"), "--threads", "1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    print(proc.stdout[-2000:])
    assert proc.returncode == 0, proc.stderr[-2000:]
    spec = json.loads((out / "recipe.json").read_text())
    types = {t["name"]: t["type"].lower() for t in spec["tensors"]}
    assert types["blk.0.ffn_gate_inp.weight"] == "f32"  # a router: llama.cpp keeps it F32
    stacks = {types[f"blk.{i}.{t}.weight"] for i in range(3) for t in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")}
    assert stacks == {"q4_0", "q8_0"}, stacks  # the budget binds: a mix
    from sweep.llama.backend import Backend
    from sweep.llama.container import compute_settings

    with Backend(out / "built.gguf", 32, 1, settings=compute_settings("f32")) as b:
        assert np.isfinite(b.decode_window(np.arange(32, dtype=np.int32), np.ones(32, dtype=np.int8))).all()
