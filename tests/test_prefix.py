"""Prefix reuse (sweep/prefix/reuse.py): stage files decoded from the captured residual stream give the full model's
logits bit for bit on the tiny llama, qwen2 and gemma3 models; a sweep gives the same table with and without reuse;
a stage that cannot match falls back to the full decode, and every fallback says why."""

from __future__ import annotations

import itertools
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import make_settings
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from test_sweep import run_sweep, tiny_args

from sweep.commands.cli import main as cli_main
from sweep.llama.cache import RESIDUALS, STAGES, residuals_file
from sweep.llama.container import compute_settings
from sweep.llama.gguf_names import block_name, block_of, in_block, split_block
from sweep.llama.model_file import sha256
from sweep.llama.stage_check import probe_stage, stage_refusal
from sweep.llama.stage_file import stage_name, write_stage_file
from sweep.llama.stage_view import StageView
from sweep.pipeline import costs as planning
from sweep.pipeline.grid import plan
from sweep.pipeline.point import run_point
from sweep.pipeline.reference import open_reference
from sweep.prefix.reuse import (
    Prefixes,
    PrefixSettings,
    residuals_key,
    stage_for,
    stage_path,
    writes_weights,
)
from sweep.prefix.solve import MARGIN, StageCosts, decoded_blocks, plan_stages, spread_starts
from sweep.quant.formats import make_format
from sweep.quant.targets import resolve
from sweep.store import readahead
from sweep.testing.tiny_model import Q, write_tiny_model

WINDOW_COLUMNS = ["window_dnll", "window_kld", "window_top1", "window_baseline_nll"]


@pytest.fixture(scope="module")
def models(tmp_path_factory, smollm2):
    d = tmp_path_factory.mktemp("prefix-models")
    return {arch: write_tiny_model(d / f"{arch}.gguf", smollm2, arch=arch) for arch in ("llama", "qwen2", "gemma3")}


def test_a_tensor_name_says_its_block():
    assert [block_of(n) for n in ("blk.0.attn_q.weight", "blk.27.ffn_down_exps.weight", "blk.3.attn_q.bias")] == \
        [0, 27, 3]
    assert [block_of(n) for n in ("token_embd.weight", "output.weight", "output_norm.weight", "blk.x.y", "blk")] == \
        [None] * 5
    assert split_block("blk.12.ffn_up.weight") == (12, "ffn_up.weight") and split_block("output.weight") is None
    assert block_name(12, "ffn_up.weight") == "blk.12.ffn_up.weight" and in_block("blk.1.attn_k.bias") == "attn_k.bias"
    assert stage_name("blk.12.ffn_up.weight", 10) == "blk.2.ffn_up.weight" and stage_name("output.weight", 10) == \
        "output.weight"


def test_stages_without_a_plan_are_spread_over_the_blocks():
    assert spread_starts(30, 5) == (5, 10, 15, 20, 25)
    assert spread_starts(3, 6) == (1, 2)  # never block 0, never past the last block
    assert stage_for((7,), (5, 10)) == 5 and stage_for((12, 3), (5, 10)) is None and stage_for((4,), (5,)) is None
    assert PrefixSettings(True, 5, None).starts_for(30) == (5, 10, 15, 20, 25)
    assert PrefixSettings(True, 5, None, (0, 29, 7, 7, 30)).starts_for(30) == (7, 29)  # given: inside the blocks


def decoding(costs: StageCosts, points: dict, starts) -> float:
    """Seconds the plan weighs for `points` ({first layer: windows}) decoded from `starts`: the block time, and
    MARGIN times each stage's overhead (identity window with the head, preparation) and the residuals' capture."""
    return decoded_blocks(costs.n_layers, points, starts) * costs.block_s + \
        MARGIN * (sum(costs.overhead_s(s) for s in starts) + (costs.capture_s if starts else 0.0))


def test_the_plan_is_the_cheapest_set_of_stages():
    """Against every subset of starts on random small sweeps, in seconds: the head, the files' preparation, the
    residuals' capture; the disk's or memory's veto, a stage llama.cpp cannot run, and stages that do not pay."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        n, k = int(rng.integers(2, 10)), int(rng.integers(0, 4))
        points = {int(layer): float(rng.choice([0.5, 1, 2, 8])) for layer in rng.integers(0, n, rng.integers(1, n))}
        prepare = float(rng.choice([0.0, 0.5, 3.0]))
        costs = StageCosts(n, float(rng.choice([0.1, 1.0])), float(rng.choice([0.0, 0.5, 4.0])),
                           prepare_s=lambda s, p=prepare: p * s, capture_s=float(rng.choice([0.0, 2.0])),
                           allowed=lambda s: s != 3)
        cands = sorted(layer for layer in points if layer > 0 and layer != 3)
        best = min(decoding(costs, points, c) for m in range(k + 1) for c in itertools.combinations(cands, m))
        got = plan_stages(points, costs, k)
        assert len(got.starts) <= k and 3 not in got.starts
        assert decoding(costs, points, got.starts) == pytest.approx(best)
        assert got.full_s == pytest.approx(decoding(costs, points, ()))
        assert got.starts == () or got.net_s > 0  # chosen only where it saves more than it costs
    sweep30 = {layer: 8 for layer in range(30)}
    cheap = StageCosts(30, 1.0, 0.0)
    assert len(plan_stages(sweep30, cheap, 8).starts) == 8 and plan_stages(sweep30, cheap, 8).block_ratio < 0.6
    fits = StageCosts(30, 1.0, 0.0, fits=lambda starts: len(starts) <= 3)
    assert len(plan_stages(sweep30, fits, 8).starts) == 3
    assert plan_stages({2: 1}, StageCosts(3, 1.0, 1.0), 8).starts == ()  # saves 2, costs 1.5 x (1 + 1)
    assert plan_stages({2: 3}, StageCosts(3, 1.0, 1.0), 8).starts == (2,)  # saves 6
    # a large vocabulary: the head is half of every window and each stage's identity window decodes it too
    assert plan_stages({5: 4, 9: 4}, StageCosts(18, 0.05, 0.9), 8).starts == ()
    assert plan_stages({5: 4, 9: 4}, StageCosts(18, 0.05, 0.0), 8).starts == (5, 9)  # a head-less model


def test_the_sweep_settles_its_stages_once_for_every_job(models, tmp_path, wikitext, capsys):
    """grid.plan gives every job the same run.prefix_starts, planned in seconds from its layers and windows, and
    says both sides; a given choice is kept; points that cannot reuse a prefix plan none."""
    args = [*tiny_args(models["llama"], tmp_path, "layer=0,1,2", "kind=activation", "tensor=l_out", "fmt=int8",
                       "metrics.generate=false"), f"data.path={wikitext}"]
    p = plan(args)
    (starts,) = {o for job in p.jobs for o in job if o.startswith("run.prefix_starts=")}
    assert all(f"run.prefix_starts={list(s.run.prefix.starts)}".replace(" ", "") == starts for s, _ in p.points)
    # the tiny model: 3 blocks 64 wide under a 49,152-token head, which every identity window decodes too
    (settled,) = p.stages
    assert settled.plan.starts == () and settled.head_share > 0.9
    assert "prefix reuse: none for llama.gguf: no stage pays here (a plan must save 1.5x what its stages cost" in \
        capsys.readouterr().out
    given = plan([*args, "run.prefix_starts=[1]"])
    assert all(s.run.prefix.starts == (1,) for s, _ in given.points)
    assert all(sum(o.startswith("run.prefix_starts=") for o in job) == 1 for job in given.jobs)
    assert all(s.run.prefix.starts == () for s, _ in plan([*args, "metrics.generate=true"]).points)


@pytest.mark.slow
def test_a_timed_window_plans_the_stages_and_is_kept(models, tmp_path, wikitext, capsys):
    """Where the FLOPs say a stage may pay, one window is timed (blocks and head apart) and kept in the cache: the
    next plan reads it; --plan shows what reuse saves and what it costs."""
    cache = tmp_path / "cache"
    # blocks that outweigh the 49,152-token head: 8 of width 512 and FFN 2048, all F32 (no quantizing to write);
    # 256 windows: only planned (one window is timed), so that stages can pay for their files
    big = write_tiny_model(tmp_path / "wide.gguf", models["llama"], n_layers=8, n_embd=512, n_ff=2048, n_head=4,
                           n_head_kv=2, matmul_type=Q.F32, embd_type=Q.F32)
    args = [*tiny_args(big, tmp_path, "layer=range(0,8)", "kind=activation", "tensor=l_out", "fmt=int8",
                       "metrics.generate=false", "data.n_windows=256", "model.container=native",
                       f"model.cache_dir={cache}"),
            f"data.path={wikitext}"]
    (settled,) = plan(args).stages
    assert "timed now" in settled.costs.source and settled.costs.block_s > 0 and settled.costs.head_s > 0
    assert len(list((cache / STAGES).glob("profile-*.json"))) == 1
    again = plan(args).stages[0]
    assert "timed before" in again.costs.source and again.costs.block_s == settled.costs.block_s
    out = planning.render(planning.costs(plan(args)), wikitext)
    assert "  prefix      " in out and ("saves ~" in out or "none for wide.gguf" in out), out
    # a plan that would not shorten the sweep's decode by run.prefix_min_gain is not worth its memory and disk
    (loose,) = plan([*args, "run.prefix_min_gain=0"]).stages
    (strict,) = plan([*args, "run.prefix_min_gain=0.99"]).stages
    assert loose.plan.starts and loose.plan.net_s > 0, loose.line()
    assert strict.plan.starts == () and "below run.prefix_min_gain=0.99" in strict.line()


@pytest.mark.slow
def test_a_gemma3_stage_of_global_blocks_only_is_never_loaded(smollm2, tmp_path, env):
    """gemma3 with llama.cpp's built-in pattern (every 6th block global): a stage at block 5 holds only a global
    block, on which llama.cpp aborts the process. The plan leaves it out, a given stage there falls back with the
    reason, a child-process probe of such a file reports the abort, and an all-layer sweep with reuse on finishes
    with the table of reuse off, bit for bit."""
    model = write_tiny_model(tmp_path / "gemma3-6.gguf", smollm2, arch="gemma3", n_layers=6, swa_pattern=None)
    assert stage_refusal(model, 5).startswith("stage 5 would hold only global-attention blocks (block 5)")
    assert stage_refusal(model, 4) is None and stage_refusal(smollm2, 29) is None
    costs = StageCosts(6, 1.0, 0.0, allowed=lambda s: stage_refusal(model, s) is None)
    assert plan_stages({5: 100}, costs, 8).starts == () and 5 in plan_stages({5: 100}, costs, 8).refused
    stage = write_stage_file(model, tmp_path / "global-only.gguf", 5)
    why = probe_stage(stage, 64, 1, compute_settings("f32"))
    assert why is not None and "SIGABRT" in why and "is_swa_any" in why, why
    assert probe_stage(stage, 64, 1, compute_settings("f32")) == why  # kept beside the file
    env = {**env, "SWEEP_CACHE": str(tmp_path / "cache")}
    axes = ("layer=range(0,6)", "kind=weight", "tensor=ffn_down", "fmt=int8", "metrics.generate=false",
            "run.threads=1", "run.prefix_starts=[1,2,3,4,5]")
    tables = {}
    for reuse in ("true", "false"):
        run_sweep(tiny_args(model, tmp_path, *axes, f"run.prefix_reuse={reuse}", store=f"store-{reuse}",
                            sweep_dir=f"sweep-{reuse}"), env)
        tables[reuse] = table(tmp_path / f"sweep-{reuse}")
    on, off = tables["true"], tables["false"]
    assert len(on) == len(off) == 6 and (on["status"] == "ok").all()
    for column in [*WINDOW_COLUMNS, "kld_mean", "ppl", "n_changed"]:
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(on[column], off[column])), column
    last = on.set_index("layer").loc[5]
    assert last["prefix_reuse"] == "fallback" and last["prefix_reason"].startswith("stage 5 would hold only")
    assert (on.set_index("layer").loc[1:4, "prefix_reuse"] == "ok").all()


def all_windows(view, ref) -> bool:
    """Every window's logits through the stage equal the full model's bit for bit."""
    w = ref.windows
    return all(np.array_equal(np.array(view.decode_window(t, w.output_mask)),
                              np.array(ref.backend.decode_window(t, w.output_mask))) for t in w.tokens)


@pytest.mark.parametrize("container", ["f32", "native"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_a_stage_is_the_full_model(arch, container, models, wikitext, cache_dir):
    """Stages 1 and 2 of a 3-block model; gemma3's pattern [sliding, global, sliding] is cut inside at both."""
    cfg = make_settings(models[arch], wikitext, 64, 2, container, cache_dir, "run.threads=1")
    with open_reference(cfg) as ref:
        prefixes = Prefixes()
        try:
            for start in (1, 2):
                view = prefixes.view(ref, start, (1, 2), cache_dir)
                assert isinstance(view, StageView), view  # else: the reason identity failed
                assert view.stage.n_layers == 3 - start
                assert all_windows(view, ref)
        finally:
            prefixes.close()


def test_a_stage_is_memory_mapped_unless_the_point_writes_weights(models, wikitext, cache_dir):
    """Activation points and quantized weights (perturbed through a delta) write no weight: their stage is
    memory-mapped from its file and refuses a write with a clear error instead of crashing. A point that writes an
    F32 weight gets the stage read into memory, checked for identity as loaded; that stage then serves both."""
    for container, writes in (("f32", True), ("native", False)):
        cfg = make_settings(models["llama"], wikitext, 64, 2, container, cache_dir, "run.threads=1")
        with open_reference(cfg) as ref:
            weight = resolve("weight", "ffn_down", 1, ref.info, ref.backend.nodes)
            assert writes_weights(ref.backend, weight) == writes
            assert not writes_weights(ref.backend, resolve("activation", "l_out", 1, ref.info, ref.backend.nodes))
    cfg = make_settings(models["llama"], wikitext, 64, 2, "f32", cache_dir, "run.threads=1")
    with open_reference(cfg) as ref:
        prefixes = Prefixes()
        try:
            mapped = prefixes.view(ref, 1, (1,), cache_dir, writable=False)
            assert isinstance(mapped, StageView) and not mapped.stage.writable
            with pytest.raises(RuntimeError, match="loaded read-only"):
                mapped.write_weight("blk.1.ffn_down.weight", mapped.read_weight("blk.1.ffn_down.weight"))
            read = prefixes.view(ref, 1, (1,), cache_dir, writable=True)
            assert isinstance(read, StageView) and read.stage.writable and mapped.stage.closed
            assert all_windows(read, ref)
            assert prefixes.view(ref, 1, (1,), cache_dir, writable=False).stage is read.stage
            assert sorted(k[2] for k, v in prefixes.verdicts.items() if v is None) == [False, True]
        finally:
            prefixes.close()


def test_the_next_stage_is_read_ahead(models, wikitext, cache_dir, monkeypatch):
    """While a point decodes, the files of the stage after its own (the first stage for a point before every stage)
    are read into the page cache, once; nothing after the last stage, nor what would not fit in memory."""
    cfg = make_settings(models["llama"], wikitext, 64, 2, "native", cache_dir, "run.threads=1")
    with open_reference(cfg) as ref:
        prefixes = Prefixes()
        try:
            for start in (1, 2):  # writes both stage files and the residuals
                assert isinstance(prefixes.view(ref, start, (1, 2), cache_dir), StageView)
            ahead = prefixes._ahead
            files = {s: [stage_path(cache_dir, ref, s), residuals_file(cache_dir, residuals_key(ref), s)]
                     for s in (1, 2)}
            for current, expected in ((None, files[1]), (None, []), (1, files[2]), (1, []), (2, [])):
                ahead.done.clear()
                prefixes.read_ahead(ref, current, (1, 2), cache_dir)
                ahead.wait()
                assert ahead.done == expected, current
            monkeypatch.setattr(readahead, "available_memory", lambda: 1000)
            prefixes._ahead_of = None
            prefixes.read_ahead(ref, None, (1, 2), cache_dir)
            ahead.wait()
            assert ahead.done == []
        finally:
            prefixes.close()


def without_key(src, dst, key):
    """A copy of a GGUF without one metadata key."""
    reader = GGUFReader(src)
    writer = GGUFWriter(dst, reader.get_field("general.architecture").contents())
    for f in reader.fields.values():
        if f.name in (key, "general.architecture") or f.name.startswith("GGUF."):
            continue
        writer.add_key_value(f.name, f.contents(), f.types[0],
                             sub_type=f.types[-1] if f.types[0] == GGUFValueType.ARRAY else None)
    for t in reader.tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        writer.write_tensor_data(np.asarray(t.data))
    writer.close()
    return dst


def test_gemma3_built_in_pattern_is_written_out(smollm2, wikitext, tmp_path):
    """A gemma3 file without a per-layer array slides on blocks 0-4 and attends globally on block 5 (llama.cpp's
    built-in period of 6). Its stage from block 3 must say so explicitly: left to the built-in rule, the stage's
    blocks 0-4 (the source's 3-7) would all slide."""
    src = write_tiny_model(tmp_path / "gemma3-8.gguf", smollm2, arch="gemma3", n_layers=8, swa_pattern=None)
    stage = write_stage_file(src, tmp_path / "stage3.gguf", 3)
    fields = GGUFReader(stage).fields
    assert fields["gemma3.block_count"].contents() == 5
    assert fields["gemma3.attention.sliding_window_pattern"].contents() == [True, True, False, True, True]

    cfg = make_settings(src, wikitext, 64, 2, "native", tmp_path / "cache", "run.threads=1")
    with open_reference(cfg) as ref:
        prefixes = Prefixes()
        try:
            view = prefixes.view(ref, 3, (3,), tmp_path / "cache")
            assert isinstance(view, StageView), view
            assert all_windows(view, ref)
            # the same stage without the explicit pattern is not the full model: the identity check refuses it
            path = view.stage.path
            prefixes.close()
            without_key(stage, path, "gemma3.attention.sliding_window_pattern")
            reason = Prefixes().view(ref, 3, (3,), tmp_path / "cache")
            assert isinstance(reason, str) and reason.startswith("stage 3 is not the full model"), reason
        finally:
            prefixes.close()


def table(directory) -> pd.DataFrame:
    return pd.read_parquet(directory / "results.parquet").sort_values(["kind", "tensor", "layer"]) \
        .reset_index(drop=True)


@pytest.mark.slow
def test_a_sweep_gives_the_same_table_with_and_without_reuse(models, tmp_path, env, smollm2):
    """Bit-identical per-window NLL, KL and top-1 with reuse on and off, for weights and activations; a stage that
    cannot match (planted: the stage of another model) falls back to the full decode, with the reason."""
    model = models["llama"]
    env = {**env, "SWEEP_CACHE": str(tmp_path / "cache")}
    other = write_tiny_model(tmp_path / "other.gguf", smollm2, seed=1)
    planted = tmp_path / "cache" / STAGES / f"{sha256(model)}.f32.stage2.gguf"
    planted.parent.mkdir(parents=True)
    write_stage_file(other, planted, 2)
    axes = ("layer=0,1,2", "fmt=int8", "metrics.generate=false", "run.threads=1", "run.prefix_starts=[1,2]")
    tables = {}
    for reuse in ("true", "false"):
        for kind, tensor in (("weight", "ffn_down"), ("activation", "ffn_out")):
            run_sweep(tiny_args(model, tmp_path, *axes, f"kind={kind}", f"tensor={tensor}",
                                f"run.prefix_reuse={reuse}", store=f"store-{reuse}",
                                sweep_dir=f"sweep-{reuse}-{kind}"), env)
        tables[reuse] = pd.concat([table(tmp_path / f"sweep-{reuse}-{kind}") for kind in ("activation", "weight")],
                                  ignore_index=True)
    on, off = tables["true"], tables["false"]
    with pd.option_context("display.width", 220, "display.max_columns", 20, "display.max_colwidth", 70):
        print(on[["kind", "tensor", "layer", "prefix_reuse", "prefix_stage", "decoded_blocks", "prefix_reason"]])
    assert len(on) == len(off) == 6 and (on["status"] == "ok").all() and (off["prefix_reuse"] == "off").all()
    for column in [*WINDOW_COLUMNS, "kld_mean", "ppl", "n_changed", "hook_calls"]:
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(on[column], off[column])), column
    by_layer = on.groupby("layer")
    assert set(by_layer.get_group(0)["prefix_reason"]) == \
        {"no stage starts at or before layer 0 (stages: 1, 2; set them with run.prefix_starts=[...])"}
    assert (by_layer.get_group(1)["prefix_reuse"] == "ok").all()
    assert (by_layer.get_group(1)["decoded_blocks"] == 2).all()
    layer2 = by_layer.get_group(2)
    assert (layer2["prefix_reuse"] == "fallback").all() and (layer2["decoded_blocks"] == 3).all()
    assert layer2["prefix_reason"].str.startswith("stage 2 is not the full model: its logits on window 0 differ").all()
    assert (on[on["kind"] == "activation"]["hook_calls"] == 3).all()  # once per window, as without reuse


@pytest.mark.slow
def test_native_quantized_weights_reuse_the_prefix_through_their_delta(models, tmp_path, env):
    """In the native container a norm (F32) is written in the stage and a Q4_1 matmul gets its delta there (the
    stage keeps the file's types): both bit-identical to the full decode. With model.native_weights=copy the matmul
    runs on its matched copy of the whole model, and says so."""
    tables = {}
    for reuse in ("true", "false"):
        run_sweep(tiny_args(models["qwen2"], tmp_path, "layer=1", "kind=weight", "tensor=attn_norm,ffn_up", "fmt=int8",
                            "model.container=native", "metrics.generate=false", "run.threads=1",
                            "run.prefix_starts=[1]", f"run.prefix_reuse={reuse}", store=f"store-{reuse}",
                            sweep_dir=f"sweep-{reuse}"), env)
        tables[reuse] = table(tmp_path / f"sweep-{reuse}").set_index("tensor").sort_index()
    on, off = tables["true"], tables["false"]
    assert (on["status"] == "ok").all() and (on["prefix_reuse"] == "ok").all() and (on["prefix_stage"] == 1).all()
    assert on.loc["ffn_up", "delta_calls"] == off.loc["ffn_up", "delta_calls"] == 3  # one matmul x 3 windows
    for column in [*WINDOW_COLUMNS, "kld_mean", "ppl", "n_changed"]:
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(on[column], off[column])), column
    run_sweep(tiny_args(models["qwen2"], tmp_path, "layer=1", "kind=weight", "tensor=ffn_up", "fmt=int8",
                        "model.container=native", "model.native_weights=copy", "metrics.generate=false",
                        "run.threads=1", store="store-copy", sweep_dir="sweep-copy"), env)
    copy = table(tmp_path / "sweep-copy").iloc[0]
    assert copy["prefix_reuse"] == "fallback"
    assert copy["prefix_reason"].startswith("quantized weight in the native container (blk.1.ffn_up")


def test_plan_counts_stage_files_and_residuals(tiny_model, tmp_path, env, wikitext):
    """--plan's disk figure holds the stage files still to write and the residuals; a sweep then writes about
    that much, and with reuse off nothing is counted."""
    cache = tmp_path / "cache"
    axes = ("layer=1,2", "kind=activation", "tensor=l_out", "fmt=int8", "metrics.generate=false", "run.threads=1",
            f"model.cache_dir={cache}", "run.prefix_starts=[1,2]")
    costs = planning.costs(plan([*tiny_args(tiny_model, tmp_path, *axes), f"data.path={wikitext}"]))
    (group,) = costs.groups
    residuals = 2 * 3 * 64 * 64 * 4  # stages 1 and 2 x 3 windows x 64 tokens x n_embd 64 x float32
    assert group.prefix_dir == cache and group.prefix_bytes > residuals
    run_sweep(tiny_args(tiny_model, tmp_path, *axes), env)
    written = sum(f.stat().st_size for d in (STAGES, RESIDUALS) for f in (cache / d).glob("*.*")
                  if f.suffix in (".gguf", ".npy"))
    assert abs(written - group.prefix_bytes) < 0.01 * written, (written, group.prefix_bytes)
    assert group.prefix_model_bytes > 0 and f"prefix reuse: stage files and residuals up to " \
        f"{planning.gb(group.prefix_bytes)}" in planning.render(costs, wikitext)
    off = planning.costs(plan([*tiny_args(tiny_model, tmp_path, *axes, "run.prefix_reuse=false"),
                               f"data.path={wikitext}"]))
    assert off.groups[0].prefix_bytes == 0 and off.groups[0].prefix_model_bytes == 0


@pytest.mark.parametrize("kind, tensor", [("weight", "ffn_down"), ("activation", "l_out")])
def test_recomputed_baselines_on_a_stage(kind, tensor, models, wikitext, cache_dir):
    """metrics.baseline_logits=recompute switches the perturbation off and on around each window's unperturbed
    decode: on a stage, through the stage's names. Same numbers as the full decode, stored baseline or not."""
    cfg = make_settings(models["qwen2"], wikitext, 64, 2, "f32", cache_dir, "run.threads=1")
    settings = PrefixSettings(True, 6, cache_dir)
    fmt = make_format("int8")
    with open_reference(cfg) as ref:
        target = resolve(kind, tensor, 2, ref.info, ref.backend.nodes)
        runs = [run_point(ref, target, fmt, progress=False, baseline_logits=mode, prefix=prefix)
                for mode in ("recompute", "store") for prefix in (settings, None)]
    assert [r.prefix.status for r in runs] == ["ok", "off", "ok", "off"] and runs[0].prefix.stage == 2
    for r in runs[1:]:
        assert np.array_equal(r.score.nll, runs[0].score.nll) and np.array_equal(r.score.kld, runs[0].score.kld)
        assert np.array_equal(r.score.argmax, runs[0].score.argmax)
        assert (r.proof.n_changed, r.proof.hook_calls) == (runs[0].proof.n_changed, runs[0].proof.hook_calls)
    assert runs[0].proof.n_changed > 0


def test_residuals_are_read_while_the_baseline_decodes(models, wikitext, tmp_path):
    """The residuals come from the baseline's own decode, at a sweep's first point whatever its layer, and the
    identity check compares with the baseline's logits: no window is decoded for reuse alone. The baseline and the
    point are those of a session that never reused anything."""
    cfg = make_settings(models["gemma3"], wikitext, 64, 3, "f32", tmp_path / "cache", "run.threads=1")
    fmt = make_format("int8")
    outs = []
    for prefix in (PrefixSettings(True, 6, tmp_path / "cache"), None):
        with open_reference(cfg) as ref:
            first = run_point(ref, resolve("activation", "l_out", 0, ref.info, ref.backend.nodes), fmt,
                              progress=False, prefix=prefix)
            target = resolve("activation", "l_out", 2, ref.info, ref.backend.nodes)
            outs.append(run_point(ref, target, fmt, progress=False, prefix=prefix))
            if prefix is not None:
                assert first.prefix.status == "fallback" and outs[0].prefix.status == "ok"
                assert ref.session.prefixes.extra_windows == 0
    on, off = outs
    for a, b in ((on.score, off.score), (on.baseline, off.baseline)):
        assert np.array_equal(a.nll, b.nll) and np.array_equal(a.argmax, b.argmax)
    assert np.array_equal(on.score.kld, off.score.kld) and np.array_equal(on.baseline.logits, off.baseline.logits)


def test_prefix_clean_removes_stages_and_residuals_only(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # `sweep COMMAND` sets sys.argv for the tool it runs
    for sub, name in (("stages", "a.stage3.gguf"), ("prefix", "k.l_out-2.npy"), ("containers", "a.f32.gguf")):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / name).write_bytes(b"x" * 1000)
    cli_main(["prefix-clean", "--cache-dir", str(tmp_path), "--dry-run"])
    assert "would remove" in capsys.readouterr().out and (tmp_path / "stages").exists()
    cli_main(["prefix-clean", "--cache-dir", str(tmp_path)])
    assert not (tmp_path / "stages").exists() and not (tmp_path / "prefix").exists()
    assert (tmp_path / "containers" / "a.f32.gguf").exists()  # the F32 container stays
    cli_main(["prefix-clean", "--cache-dir", str(tmp_path)])
    assert "nothing to remove" in capsys.readouterr().out
