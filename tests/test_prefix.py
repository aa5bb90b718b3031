"""Prefix reuse (sweep/scoring/prefix.py): stage files decoded from the captured residual stream give the full model's
logits bit for bit on the tiny llama, qwen2 and gemma3 models; a sweep gives the same table with and without reuse;
a stage that cannot match falls back to the full decode, and every fallback says why."""

from __future__ import annotations

import itertools
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import make_cfg
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from test_sweep import run_sweep, tiny_args

from sweep import planning
from sweep.cli import main as cli_main
from sweep.grid import plan
from sweep.llama.model_file import sha256
from sweep.llama.stage_file import write_stage_file
from sweep.llama.stage_view import StageView
from sweep.quant.formats import make_format
from sweep.quant.targets import resolve
from sweep.reference import open_reference
from sweep.run import run_point
from sweep.scoring.prefix import (
    RESIDUALS_DIR,
    STAGES_DIR,
    Prefixes,
    PrefixSettings,
    residuals_key,
    residuals_path,
    stage_for,
    stage_path,
    writes_weights,
)
from sweep.scoring.stage_plan import STAGE_COST_WINDOWS, plan_stages, spread_starts
from sweep.store import readahead
from sweep.testing.tiny_model import write_tiny_model

WINDOW_COLUMNS = ["window_dnll", "window_kld", "window_top1", "window_baseline_nll"]


@pytest.fixture(scope="module")
def models(tmp_path_factory, smollm2):
    d = tmp_path_factory.mktemp("prefix-models")
    return {arch: write_tiny_model(d / f"{arch}.gguf", smollm2, arch=arch) for arch in ("llama", "qwen2", "gemma3")}


def test_stages_without_a_plan_are_spread_over_the_blocks():
    assert spread_starts(30, 5) == (5, 10, 15, 20, 25)
    assert spread_starts(3, 6) == (1, 2)  # never block 0, never past the last block
    assert stage_for((7,), (5, 10)) == 5 and stage_for((12, 3), (5, 10)) is None and stage_for((4,), (5,)) is None
    assert PrefixSettings(True, 5, None).starts_for(30) == (5, 10, 15, 20, 25)
    assert PrefixSettings(True, 5, None, (0, 29, 7, 7, 30)).starts_for(30) == (7, 29)  # given: inside the blocks


def decoding(n: int, points: dict, starts) -> float:
    """Block-windows of `points` ({first layer: windows}) decoded from `starts`, with the stages' own cost."""
    return sum(w * (n - max((s for s in starts if s <= layer), default=0)) for layer, w in points.items()) + \
        sum(STAGE_COST_WINDOWS * (n - s) for s in starts)


def test_the_plan_is_the_cheapest_set_of_stages():
    """Against every subset of starts on random small sweeps; the disk's veto and a stage that does not pay."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        n, k = int(rng.integers(2, 10)), int(rng.integers(0, 4))
        points = {int(layer): float(rng.choice([0.5, 1, 2, 8])) for layer in rng.integers(0, n, rng.integers(1, n))}
        cands = sorted(layer for layer in points if layer > 0)
        best = min(decoding(n, points, c) for m in range(k + 1) for c in itertools.combinations(cands, m))
        got = plan_stages(n, points, k)
        assert len(got.starts) <= k and got.cost == pytest.approx(best)
        assert got.cost == pytest.approx(decoding(n, points, got.starts))
        assert got.full_cost == pytest.approx(decoding(n, points, ()))
    sweep30 = {layer: 8 for layer in range(30)}
    assert len(plan_stages(30, sweep30, 8).starts) == 8 and plan_stages(30, sweep30, 8).ratio < 0.6
    assert len(plan_stages(30, sweep30, 8, fits=lambda starts: len(starts) <= 3).starts) == 3
    assert plan_stages(3, {2: 1}, 8).starts == ()  # saves 1 block-window, costs STAGE_COST_WINDOWS
    assert plan_stages(3, {2: 3}, 8).starts == (2,)


def test_the_sweep_settles_its_stages_once_for_every_job(models, tmp_path, wikitext, capsys):
    """grid.plan gives every job the same run.prefix_starts, planned from its layers and windows, and says so; a
    given choice is kept; points that cannot reuse a prefix plan none."""
    args = [*tiny_args(models["llama"], tmp_path, "layer=0,1,2", "kind=activation", "tensor=l_out", "fmt=int8",
                       "metrics.generate=false"), f"data.path={wikitext}"]
    p = plan(args)
    # 3 windows per point: stage 2 alone (decoding 9 + 9 + 3, + 2 for its identity and load) beats 1 and 2 (24)
    assert {o for job in p.jobs for o in job if o.startswith("run.prefix_starts=")} == {"run.prefix_starts=[2]"}
    assert all(list(cfg.run.prefix_starts) == [2] for cfg, _ in p.points)
    assert "prefix reuse: stages at blocks 2, decoding 0.85 of the full decodes' block-windows" in \
        capsys.readouterr().out
    given = plan([*args, "run.prefix_starts=[1]"])
    assert all(list(cfg.run.prefix_starts) == [1] for cfg, _ in given.points)
    assert all(sum(o.startswith("run.prefix_starts=") for o in job) == 1 for job in given.jobs)
    assert all(list(cfg.run.prefix_starts) == [] for cfg, _ in plan([*args, "metrics.generate=true"]).points)


def all_windows(view, ref) -> bool:
    """Every window's logits through the stage equal the full model's bit for bit."""
    w = ref.windows
    return all(np.array_equal(np.array(view.decode_window(t, w.output_mask)),
                              np.array(ref.backend.decode_window(t, w.output_mask))) for t in w.tokens)


@pytest.mark.parametrize("container", ["f32", "native"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_a_stage_is_the_full_model(arch, container, models, wikitext, cache_dir):
    """Stages 1 and 2 of a 3-block model; gemma3's pattern [sliding, global, sliding] is cut inside at both."""
    cfg = make_cfg(models[arch], wikitext, 64, 2, container, cache_dir, "run.threads=1")
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
        cfg = make_cfg(models["llama"], wikitext, 64, 2, container, cache_dir, "run.threads=1")
        with open_reference(cfg) as ref:
            weight = resolve("weight", "ffn_down", 1, ref.info, ref.backend.nodes)
            assert writes_weights(ref.backend, weight) == writes
            assert not writes_weights(ref.backend, resolve("activation", "l_out", 1, ref.info, ref.backend.nodes))
    cfg = make_cfg(models["llama"], wikitext, 64, 2, "f32", cache_dir, "run.threads=1")
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
    cfg = make_cfg(models["llama"], wikitext, 64, 2, "native", cache_dir, "run.threads=1")
    with open_reference(cfg) as ref:
        prefixes = Prefixes()
        try:
            for start in (1, 2):  # writes both stage files and the residuals
                assert isinstance(prefixes.view(ref, start, (1, 2), cache_dir), StageView)
            ahead = prefixes._ahead
            files = {s: [stage_path(cache_dir, ref, s), residuals_path(cache_dir, residuals_key(ref), s)]
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

    cfg = make_cfg(src, wikitext, 64, 2, "native", tmp_path / "cache", "run.threads=1")
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


def test_a_sweep_gives_the_same_table_with_and_without_reuse(models, tmp_path, env, smollm2):
    """Bit-identical per-window NLL, KL and top-1 with reuse on and off, for weights and activations; a stage that
    cannot match (planted: the stage of another model) falls back to the full decode, with the reason."""
    model = models["llama"]
    env = {**env, "SWEEP_CACHE": str(tmp_path / "cache")}
    other = write_tiny_model(tmp_path / "other.gguf", smollm2, seed=1)
    planted = tmp_path / "cache" / STAGES_DIR / f"{sha256(model)}.f32.stage2.gguf"
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


def test_native_quantized_weights_reuse_the_prefix_through_their_delta(models, tmp_path, env):
    """In the native container a norm (F32) is written in the stage and a Q4_1 matmul gets its delta there (the
    stage keeps the file's types): both bit-identical to the full decode. With model.native_weights=copy the matmul
    runs on its matched copy of the whole model, and says so."""
    tables = {}
    for reuse in ("true", "false"):
        run_sweep(tiny_args(models["qwen2"], tmp_path, "layer=1", "kind=weight", "tensor=attn_norm,ffn_up", "fmt=int8",
                            "model.container=native", "metrics.generate=false", "run.threads=1",
                            f"run.prefix_reuse={reuse}", store=f"store-{reuse}", sweep_dir=f"sweep-{reuse}"), env)
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
    written = sum(f.stat().st_size for d in (STAGES_DIR, RESIDUALS_DIR) for f in (cache / d).glob("*.*")
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
    cfg = make_cfg(models["qwen2"], wikitext, 64, 2, "f32", cache_dir, "run.threads=1")
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
    cfg = make_cfg(models["gemma3"], wikitext, 64, 3, "f32", tmp_path / "cache", "run.threads=1")
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
