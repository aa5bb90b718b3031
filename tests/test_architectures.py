"""Architectures other than llama: tiny gemma3 and qwen2 GGUFs swept over weights and activations through the CLI.

Each sweep targets what only that architecture has (gemma3's post-attention/post-FFN norms, per-head Q/K norms and
non-square Q/K/V; qwen2's Q/K/V biases), so a name or shape assumption of the llama graph anywhere in the code
fails here. Run with `pytest -s` to see the tables.
"""

from __future__ import annotations

import math

import pandas as pd
import pytest
from test_sweep import run_sweep, tiny_args

from sweep.errors import SweepError
from sweep.pipeline.grid import plan
from sweep.testing.tiny_model import write_tiny_model

# Per architecture: the weights and graph nodes swept, and the GGUF/graph name of each for layer 0.
SWEEPS = {
    "gemma3": {
        "weight": {"post_attention_norm": "blk.0.post_attention_norm.weight",
                   "post_ffw_norm": "blk.0.post_ffw_norm.weight",
                   "attn_q_norm": "blk.0.attn_q_norm.weight",  # one head wide (32), not n_embd
                   "attn_q": "blk.0.attn_q.weight"},  # 128 x 64: heads x head size != n_embd
        "activation": {"attn_post_norm": "attn_post_norm-0", "ffn_post_norm": "ffn_post_norm-0",
                       "sa_out": "sa_out-0", "Qcur_normed": "Qcur_normed-0"},
    },
    "qwen2": {
        "weight": {"attn_q": "blk.0.attn_q.weight", "attn_q.bias": "blk.0.attn_q.bias",
                   "attn_v.bias": "blk.0.attn_v.bias"},
        "activation": {"attn_norm": "attn_norm-0", "ffn_inp": "ffn_inp-0", "l_out": "l_out-0"},
    },
}
LAYERS = "layer=0,1,2"  # gemma3: layers 0 and 2 use the sliding window, layer 1 the whole context
# One llama.cpp thread: a model this small gains nothing from two, and two threads that spin-wait on each other
# are many times slower on a machine whose cores are busy with other work.
COLUMNS = ["kind", "tensor", "layer", "fmt", "status", "n_elements", "frac_changed", "hook_calls", "ppl",
           "delta_ppl", "kld_mean", "targets"]


@pytest.fixture(scope="session")
def arch_models(tmp_path_factory, smollm2):
    directory = tmp_path_factory.mktemp("arch-models")
    return {arch: write_tiny_model(directory / f"tiny-{arch}.gguf", smollm2, arch=arch) for arch in SWEEPS}


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(SWEEPS))
def test_weights_and_activations_of_another_architecture(arch, arch_models, tmp_path, env):
    model = arch_models[arch]
    tables = []
    for kind, names in SWEEPS[arch].items():
        run_sweep(tiny_args(model, tmp_path, LAYERS, f"kind={kind}", f"tensor={','.join(names)}", "fmt=int8",
                            "metrics.generate=false", "run.threads=1", sweep_dir=f"sweep-{kind}"), env)
        tables.append(pd.read_parquet(tmp_path / f"sweep-{kind}" / "results.parquet"))
    df = pd.concat(tables).sort_values(["kind", "tensor", "layer"]).reset_index(drop=True)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(f"\n{arch} ({model.name}): {len(df)} points\n{df[COLUMNS].to_string(index=False)}")

    assert len(df) == 3 * sum(len(names) for names in SWEEPS[arch].values())
    assert (df["status"] == "ok").all(), df[["tensor", "status", "reason"]]
    assert (df["frac_changed"] > 0).all() and (df["hook_calls"] > 0).all() and (df["kld_mean"] > 0).all()
    assert df["ppl"].map(math.isfinite).all() and df["baseline_ppl"].nunique() == 1
    for kind, names in SWEEPS[arch].items():  # the names come from this model's file and graph
        for tensor, name in names.items():
            row = df[(df["kind"] == kind) & (df["tensor"] == tensor) & (df["layer"] == 0)]
            assert row["targets"].tolist() == [name]


@pytest.mark.parametrize("arch", list(SWEEPS))
def test_the_native_container_of_another_architecture(arch, arch_models, tmp_path, env):
    """The model as stored (Q4_1 matmuls, F32 norms), with the native container's flash attention and F16 KV cache:
    a quantized weight is perturbed on its F32-matched copy (and paired with that copy's baseline), an F32 weight
    and the activations on the file itself. One small sweep: layer 0, a norm and ffn_up, as weight and node."""
    model = arch_models[arch]
    run_sweep(tiny_args(model, tmp_path, "layer=0", "kind=weight,activation", "tensor=attn_norm,ffn_up", "fmt=int8",
                        "model.container=native", "metrics.generate=false", "run.threads=1"), env)
    df = pd.read_parquet(tmp_path / "sweep" / "results.parquet").sort_values(["kind", "tensor"])
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(f"\n{arch} ({model.name}), native container: {len(df)} points\n"
              f"{df[[*COLUMNS, 'baseline']].to_string(index=False)}")

    assert len(df) == 4 and (df["status"] == "ok").all(), df[["kind", "tensor", "status", "reason"]]
    assert (df["container"] == "native").all() and (df["flash_attn"] == "on").all() and (df["kv_type"] == "f16").all()
    assert (df["frac_changed"] > 0).all() and (df["kld_mean"] > 0).all() and df["ppl"].map(math.isfinite).all()
    activations = df[df["kind"] == "activation"]
    assert (activations["hook_calls"] == 3).all()  # once per window (data.n_windows=3), one node each
    assert activations["targets"].tolist() == ["attn_norm-0", "ffn_up-0"]
    weights = df[df["kind"] == "weight"].set_index("tensor")
    assert (weights["hook_calls"] == 1).all()  # one tensor written
    assert weights.loc["ffn_up", "baseline"].startswith("native container (the file as it is); blk.0.ffn_up.weight "
                                                        "kept in Q4_1 with (fmt(W) - W)·x added")
    assert weights.loc["ffn_up", "delta_calls"] == 3  # its one matmul, in each of the 3 windows
    assert weights.loc["attn_norm", "baseline"] == "native container"  # F32 already: written in place
    # the same file and settings: every point shares the one baseline of the file as it is
    assert df["baseline_ppl"].nunique() == 1


@pytest.mark.parametrize("arch, kind, listed, absent", [
    ("gemma3", "weight", ["post_ffw_norm", "post_attention_norm", "attn_q_norm"], ["attn_q.bias"]),
    ("gemma3", "activation", ["attn_post_norm", "ffn_post_norm", "sa_out", "inp_scaled"], ["ffn_swiglu"]),
    ("qwen2", "weight", ["attn_q.bias", "attn_k.bias", "attn_v.bias"], ["post_ffw_norm"]),
    ("qwen2", "activation", ["ffn_inp", "ffn_swiglu"], ["attn_post_norm", "attn_out"]),
])
def test_the_valid_names_are_this_models(arch, kind, listed, absent, arch_models, tmp_path, wikitext):
    with pytest.raises(SweepError) as e:
        plan([*tiny_args(arch_models[arch], tmp_path, "layer=0", f"kind={kind}", "tensor=nope"),
              f"data.path={wikitext}"])
    message = str(e.value)
    assert all(name in message for name in listed), message
    assert not any(f" {name}," in message or f" {name};" in message for name in absent), message
