"""Mixed-precision recipes (sweep.recipe): the exact solver, the budget over every tensor, groups, the one-line
errors, recipe.txt as llama-quantize reads it, and the file llama.cpp's quantizer builds from it.

A tiny all-F32 model (rows of 256 and 512: the K-quants' blocks divide them, so q6_K is not q8_0 here) is swept at
two types on three tensors of every block, once per module."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader
from test_sweep import ROOT, run_sweep, tiny_args

from sweep.errors import SweepError
from sweep.recipe.export import read_recipe_txt, types_from_patterns, write_recipe_txt
from sweep.recipe.sizes import SourceModel
from sweep.recipe.solve import make_recipe, solve_groups
from sweep.recipe.table import read_table
from sweep.testing.tiny_model import write_tiny_model

TENSORS = ("attn_q", "attn_k", "ffn_down")
TYPES = ("q4_K", "q8_0")


def brute_force(costs: np.ndarray, weights: np.ndarray, capacity: float):
    best, best_pick = np.inf, None
    for pick in itertools.product(range(costs.shape[1]), repeat=costs.shape[0]):
        idx = (np.arange(costs.shape[0]), np.array(pick))
        if weights[idx].sum() <= capacity and costs[idx].sum() < best:
            best, best_pick = costs[idx].sum(), pick
    return best, best_pick


@pytest.mark.parametrize("seed", range(6))
def test_solver_is_exact_on_small_instances(seed):
    rng = np.random.default_rng(seed)
    g, t = 6, 3
    weights = rng.integers(100, 1000, size=(g, t)).astype(float)
    costs = rng.exponential(1e-4, size=(g, t))  # damages as small as real KLDs
    costs[rng.random((g, t)) < 0.1] = np.inf  # diverged candidates are never chosen
    costs[:, 0] = np.where(np.isinf(costs).all(axis=1), 1e-4, costs[:, 0])
    capacity = np.where(np.isfinite(costs), weights, np.inf).min(axis=1).sum() + rng.uniform(0, 1500)
    pick, info = solve_groups(costs, weights, capacity)
    best, _ = brute_force(costs, weights, capacity)
    chosen = (np.arange(g), pick)
    assert info["optimal"] and weights[chosen].sum() <= capacity
    assert costs[chosen].sum() == pytest.approx(best, rel=1e-9)


def sweep_f32_model(tmp, smollm2, wikitext, cache_dir, tensors, types):
    """A tiny F32 model (so that every type is a real change) swept over layers 0-2 x `tensors` x `types`, ranked by
    KLD: the tables a recipe is built from. Returns (model, sweep dir, env)."""
    import os

    model = write_tiny_model(tmp / "tiny-f32.gguf", smollm2, n_embd=256, n_ff=512,
                             matmul_type=GGMLQuantizationType.F32, embd_type=GGMLQuantizationType.F32)
    env = {**os.environ, "SWEEP_WIKITEXT": str(wikitext), "SWEEP_CACHE": str(cache_dir)}
    run_sweep(tiny_args(model, tmp, "layer=0,1,2", f"tensor={','.join(tensors)}", "kind=weight",
                        f"fmt={','.join(types)}", "metrics.generate=false", "metrics.rank_by=kld_mean"), env)
    return model, tmp / "sweep", env


@pytest.fixture(scope="module")
def swept(tmp_path_factory, smollm2, wikitext, cache_dir):
    return sweep_f32_model(tmp_path_factory.mktemp("recipe"), smollm2, wikitext, cache_dir, TENSORS, TYPES)


def recipe_cli(args, env, check=True):
    proc = subprocess.run([sys.executable, "-m", "sweep.recipe", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_budget_counts_every_tensor_and_groups_share_a_type(swept):
    model, runs, _ = swept
    table = read_table([runs])
    source = SourceModel(model)
    assert len(table.rows) == 3 * len(TENSORS) * len(TYPES)
    lo = make_recipe(table, source, list(TYPES), 10**12, "file", "q8_0").predicted_file_bytes  # all q8_0 at most
    groups = [r"attn_[qk]"]
    all_small = make_recipe(table, source, ["q4_K"], 10**12, "file", "q8_0")
    budget = (all_small.predicted_file_bytes + lo) // 2
    recipe = make_recipe(table, source, list(TYPES), budget, "file", "q8_0", groups)
    assert recipe.predicted_file_bytes <= budget
    # every tensor of the file is in the recipe and in the size: norms in F32, token_embd at the default type
    assert {c.tensor for c in recipe.choices} == set(source.by_name)
    assert recipe.predicted_file_bytes == source.file_bytes({c.tensor: c.bytes for c in recipe.choices})
    types = recipe.types()
    assert types["token_embd.weight"] == "q8_0" and types["blk.0.attn_norm.weight"] == "f32"
    for layer in range(3):
        assert types[f"blk.{layer}.attn_q.weight"] == types[f"blk.{layer}.attn_k.weight"]
    # the same optimum as enumerating every assignment of the groups (2 types ^ 6 groups)
    keys = [("attn", i) for i in range(3)] + [("ffn_down", i) for i in range(3)]
    members = {k: ([f"blk.{k[1]}.attn_q.weight", f"blk.{k[1]}.attn_k.weight"] if k[0] == "attn"
                   else [f"blk.{k[1]}.ffn_down.weight"]) for k in keys}
    fixed = sum(-(-c.bytes // source.alignment) * source.alignment for c in recipe.choices if c.type_asked is None)
    best = np.inf
    for pick in itertools.product(TYPES, repeat=len(keys)):
        a = source.alignment
        size = source.header_bytes + fixed + sum(-(-source.tensor(n).bytes_as(ty) // a) * a
                                                 for k, ty in zip(keys, pick) for n in members[k])
        if size <= budget:
            best = min(best, sum(table.rows[(n, ty)].damage for k, ty in zip(keys, pick) for n in members[k]))
    assert recipe.damage == pytest.approx(best, rel=1e-9)
    # a mix, not a uniform file: the budget binds
    assert {types[n] for k in keys for n in members[k]} == set(TYPES)


def test_a_type_llama_cpp_cannot_build_here_is_no_candidate_and_no_missing_measurement(swept):
    """iq2_xxs needs importance data (ggml's quantizer and llama-quant refuse it without): tables measured without
    an importance matrix cannot have it, and the token embedding never has it (imatrix files do not hold it)."""
    from sweep.recipe.solve import missing_measurements, unbuildable

    model, runs, _ = swept
    table, source = read_table([runs]), SourceModel(model)
    types = [*TYPES, "iq2_xxs"]
    assert unbuildable(table, source, "blk.0.ffn_down.weight", "iq2_xxs")
    assert not unbuildable(table, source, "blk.0.ffn_down.weight", "q4_K")  # measured
    assert not unbuildable(table, source, "blk.0.ffn_down.weight", "q6_K")  # buildable, only not measured
    assert missing_measurements(table, source, types) == []
    smallest = make_recipe(table, source, ["q4_K"], 10**9, "file", "q4_K").predicted_file_bytes
    recipe = make_recipe(table, source, types, smallest, "file", "q4_K")  # iq2_xxs would be smaller still
    assert "iq2_xxs" not in {c.type_stored for c in recipe.choices}
    table.imatrix = True  # with an importance matrix the blocks' tensors can take it: then it is a missing point
    assert ("blk.0.attn_k.weight", "iq2_xxs") in missing_measurements(table, source, types)
    assert unbuildable(table, source, "token_embd.weight", "iq2_xxs")  # ... but never the token embedding


def test_build_writes_the_recipes_types_and_recipe_txt_round_trips(swept, tmp_path):
    model, runs, env = swept
    out = tmp_path / "r"
    proc = recipe_cli([runs, "--types", ",".join(TYPES), "--bpw", "5.3", "--default-type", "token_embd=q4_K",
                       "--source", model, "--group", "attn_[qk]", "--out", out, "--build", out / "built.gguf",
                       "--threads", "2"], env)
    assert "every tensor's type and bytes as the recipe says" in proc.stdout
    spec = json.loads((out / "recipe.json").read_text())
    want = {t["name"]: t for t in spec["tensors"]}
    reader = GGUFReader(out / "built.gguf")
    got = {t.name: t for t in reader.tensors}
    assert set(got) == set(want)
    for name, t in got.items():
        assert t.tensor_type.name.lower() == want[name]["type"].lower(), name
        assert int(t.n_bytes) == want[name]["bytes"], name
    assert spec["built"]["file_bytes"] == (out / "built.gguf").stat().st_size == spec["predicted_file_bytes"]
    assert 8 * spec["tensor_bytes"] / sum(int(t.n_elements) for t in reader.tensors) <= 5.3
    # llama.cpp loads it and it computes
    from sweep.llama.backend import Backend
    from sweep.llama.container import compute_settings

    with Backend(out / "built.gguf", 32, 2, settings=compute_settings("f32")) as b:
        assert np.isfinite(b.decode_window(np.arange(32, dtype=np.int32), np.ones(32, dtype=np.int8))).all()
    # recipe.txt as llama-quantize parses it, and as its regex_search applies it: the same type for every tensor
    lines = read_recipe_txt(out / "recipe.txt")
    assert types_from_patterns(lines, list(want)) == {n: t["type"] for n, t in want.items()
                                                       if not n.endswith("_norm.weight")}
    write_recipe_txt(tmp_path / "again.txt", lines)
    assert (tmp_path / "again.txt").read_text() == (out / "recipe.txt").read_text()


def test_a_tie_is_one_type_per_block_in_the_built_file_and_its_cost_is_stated(swept, tmp_path):
    model, runs, env = swept
    table, source = read_table([runs]), SourceModel(model)

    def split_blocks(recipe):
        t = recipe.types()
        return [i for i in range(3) if t[f"blk.{i}.attn_q.weight"] != t[f"blk.{i}.attn_k.weight"]]

    def untied(b):
        try:
            return make_recipe(table, source, list(TYPES), int(b * source.n_elements / 8), "tensors", "q4_K")
        except SweepError:  # below the smallest recipe
            return None

    # a budget where the untied recipe gives attn_q and attn_k of a block different types: the tie must bite
    bpw = next(b for b in np.round(np.arange(4.5, 8.5, 0.05), 2) if (r := untied(b)) and split_blocks(r))
    out = tmp_path / "tied"
    proc = recipe_cli([runs, "--types", ",".join(TYPES), "--bpw", f"{bpw:.2f}", "--tie", "q,k", "--default-type",
                       "q4_K", "--source", model, "--out", out, "--build", out / "built.gguf", "--threads", "2"], env)
    assert "; 3 ties of one type each, read back" in proc.stdout
    got = {t.name: t.tensor_type.name.lower() for t in GGUFReader(out / "built.gguf").tensors}
    for i in range(3):  # read back from the file llama.cpp's quantizer wrote
        assert got[f"blk.{i}.attn_q.weight"] == got[f"blk.{i}.attn_k.weight"], i
    spec = json.loads((out / "recipe.json").read_text())
    tie = spec["ties"]
    assert spec["tie"] == ["q,k"] and tie["tensors_changed"] >= 1
    assert tie["predicted"] == pytest.approx(spec["predicted_damage"]) and tie["cost"] > 0
    assert tie["cost"] == pytest.approx(tie["predicted"] - tie["predicted_untied"])
    assert f"tie q,k: predicted kld_mean {tie['predicted']:.4g} against {tie['predicted_untied']:.4g} untied" \
        in proc.stdout
    bad = recipe_cli([runs, "--types", ",".join(TYPES), "--bpw", "6", "--tie", "q,zz", "--source", model,
                      "--out", tmp_path / "bad"], env, check=False)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --tie 'q,zz': unknown tensor class 'zz'")
    assert len(bad.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()


def test_missing_measurement_infeasible_budget_and_source_are_one_line_errors(swept, tmp_path):
    model, runs, env = swept
    cases = [(["--types", "q4_K,q6_K,q8_0", "--size", "90MB"], "9 candidate measurement(s) missing: "
              "blk.0.attn_k.weight q6_K"),
             (["--types", ",".join(TYPES), "--size", "1KB"], "infeasible budget: the smallest recipe"),
             (["--types", ",".join(TYPES), "--size", "90MB", "--build", model], "is the source")]
    for extra, message in cases:
        out = tmp_path / "o"
        proc = recipe_cli([runs, "--source", model, "--out", out, *extra], env, check=False)
        assert proc.returncode == 2 and proc.stderr.startswith("error: ") and message in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
        assert not out.exists()  # nothing written
    proc = recipe_cli([runs, "--source", model, "--out", tmp_path / "o", "--types", "q4_K,q6_K,q8_0", "--size",
                       "90MB"], env, check=False)
    assert "python -m sweep 'layer=range(0,3)' tensor=attn_k,attn_q,ffn_down kind=weight fmt=q6_K" in proc.stderr


def test_validate_scores_recipe_and_presets_on_windows_after_the_tables(swept, tmp_path):
    model, runs, env = swept
    out = tmp_path / "v"
    proc = recipe_cli([runs, "--types", ",".join(TYPES), "--size", "Q4_K_M", "--default-type", "q4_K",
                       "--source", model, "--out", out, "--build", out / "built.gguf", "--validate",
                       "--presets", "Q4_K_M,Q8_0", "--heldout-windows", "3", "--threads", "2"], env)
    report = json.loads((out / "validation.json").read_text())
    assert report["heldout"]["first_token"] == 3 * 64 and report["heldout"]["windows"] == 3  # after the tables' slice
    rows = {r["file"]: r for r in report["files"]}
    assert set(rows) == {"recipe", "Q4_K_M", "Q8_0"}
    assert rows["recipe"]["file_bytes"] <= rows["Q4_K_M"]["file_bytes"]  # --size Q4_K_M: the preset's real size
    for r in rows.values():
        lo, hi = r["kld_ci95"]
        assert 0 < lo <= r["kld_mean"] <= hi and r["ppl"] > 0
    for name in ("recipe", "Q8_0"):  # Q4_K_M uses q6_K/q5_K on some measured tensors: not predictable here
        assert rows[name]["predicted"] > 0 and "residual_sweep_windows" in rows[name]
    assert "predicted" not in rows["Q4_K_M"]
    assert rows["recipe"]["vs_Q4_K_M"]["ci95"][0] <= rows["recipe"]["vs_Q4_K_M"]["diff"]
    assert (out / "validation_pareto.png").stat().st_size > 0 and "held-out validation" in proc.stdout
    # the notebook shows the same figure (sweep.report.plots.recipe_pareto draws validation_pareto.png)
    from sweep.report import plots

    fig = plots.recipe_pareto(plots.load_validation(out))
    assert {t.get_text() for t in fig.axes[0].texts} == set(rows)
    assert {t.get_text() for t in fig.axes[1].texts} == {"recipe", "Q8_0"}  # the files with a prediction
    nb = execute_notebook(runs, out, tmp_path)
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "held-out validation: 3 windows" in text and "Q4_K_M" in text
    last = [c for c in nb.cells if c.cell_type == "code"][-1]
    assert any("image/png" in o.get("data", {}) for o in last.outputs)  # the Pareto plot


def execute_notebook(results, recipe, tmp_path):
    import os

    import nbformat
    from nbclient import NotebookClient

    env = {"SWEEP_RESULTS": str(results), "SWEEP_RECIPE": str(recipe),
           "MPLBACKEND": "module://matplotlib_inline.backend_inline"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        nb = nbformat.read(ROOT / "notebooks" / "sensitivity.ipynb", as_version=4)
        NotebookClient(nb, timeout=300, kernel_name="python3",
                       resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors[0].get("evalue")
    return nb


@pytest.mark.slow
def test_joint_points_measure_a_recipe_inside_a_sweep(swept, tmp_path):
    """fmt=recipe applies a recipe's types at once (no file built): one tensor of it reproduces that tensor's single
    measurement exactly (residual 0), a block's and the whole file's joint damage are set against the sum of their
    singles, paired over the tables' windows, and the whole file's bytes are the recipe's."""
    import pandas as pd

    model, runs, env = swept
    out = tmp_path / "r"
    recipe_cli([runs, "--types", ",".join(TYPES), "--bpw", "5.3", "--default-type", "token_embd=q4_K",
                "--source", model, "--out", out, "--threads", "2"], env)
    spec = json.loads((out / "recipe.json").read_text())
    planned = {t["name"]: t for t in spec["tensors"]}
    joint = ["fmt=recipe", f"fmt.recipe={out / 'recipe.json'}", "kind=weight", "metrics.generate=false"]
    run_sweep(tiny_args(model, tmp_path, *joint, "tensor=ffn_down,all", "layer=1", sweep_dir="block"), env)
    run_sweep(tiny_args(model, tmp_path, *joint, "tensor=all", "layer=null", sweep_dir="file"), env)
    df = pd.concat([pd.read_parquet(tmp_path / d / "results.parquet") for d in ("block", "file")])
    assert (df["status"] == "ok").all() and set(df["fmt"]) == {f"recipe/{spec_sha(out)[:8]}"}
    table = pd.read_parquet(runs / "results.parquet")

    def single(name):
        t = planned[name]
        row = table[(table["targets"] == name) & (table["ggml_type"] == t["type"])]
        assert len(row) == 1
        return row.iloc[0]

    one = df[df["tensor"] == "ffn_down"].iloc[0]
    s = single("blk.1.ffn_down.weight")
    assert one["kld_mean"] == s["kld_mean"] and one["predicted"] == s["kld_mean"]
    assert one["additivity_residual"] == pytest.approx(0, abs=1e-15)  # the same computation, window by window
    block = df[(df["tensor"] == "all") & (df["layers"] == "1")].iloc[0]
    names = [n for n in planned if n.startswith("blk.1.")]
    assert block["targets"].split(",") == names and block["hook_calls"] == len(names)
    assert block["predicted_tensors"] == 3
    assert block["predicted"] == pytest.approx(sum(single(n)["kld_mean"] for n in names if planned[n]["covered"]))
    assert block["additivity_residual"] == pytest.approx(block["kld_mean"] - block["predicted"])
    assert block["additivity_residual_lo"] < block["additivity_residual"] < block["additivity_residual_hi"]
    whole = df[(df["tensor"] == "all") & (df["layers"] == "-")].iloc[0]
    assert whole["hook_calls"] == len(planned) and whole["predicted_tensors"] == 9
    # quantized tensors the tables do not cover (token_embd and 4 weights per block at their default types) are
    # in the joint measurement but in no prediction: listed
    outside = [f"{n}={t['type']}" for n, t in planned.items() if not t["covered"] and t["type"] != "f32"]
    assert whole["not_predicted"].split(",") == outside and "token_embd.weight=q4_K" in outside
    assert whole["bytes"] == spec["tensor_bytes"]  # each tensor stored as the recipe says
    assert whole["predicted"] == pytest.approx(spec["predicted_damage"])
    assert whole["additivity_residual"] == pytest.approx(whole["kld_mean"] - whole["predicted"])
    from sweep.report import plots

    fig = plots.additivity(df)
    assert len(fig.axes[0].texts) == 3 and "joint points" in fig.axes[0].get_title()


def spec_sha(out):
    import hashlib

    return hashlib.sha256((out / "recipe.json").read_bytes()).hexdigest()


@pytest.mark.slow
def test_joint_point_mistakes_are_one_line_errors(swept, tmp_path):
    model, runs, env = swept
    out = tmp_path / "r"
    recipe_cli([runs, "--types", ",".join(TYPES), "--bpw", "9", "--source", model, "--out", out], env)
    cases = [(["fmt=recipe", "tensor=all", "layer=null"], "fmt=recipe needs fmt.recipe=...: the path of a recipe"),
             (["fmt=recipe", f"fmt.recipe={tmp_path / 'nope.json'}", "tensor=all", "layer=null"],
              "cannot read the recipe"),
             (["fmt=recipe", f"fmt.recipe={out / 'recipe.txt'}", "tensor=all", "layer=null"], "is not a recipe.json"),
             (["fmt=recipe", f"fmt.recipe={out / 'recipe.json'}", "kind=activation", "tensor=l_out", "layer=0"],
              "applies to weights only"),
             (["fmt=recipe", f"fmt.recipe={out / 'recipe.json'}", f"fmt.imatrix={out / 'recipe.json'}",
               "tensor=all", "layer=0"], "was made without an importance matrix")]
    for extra, message in cases:
        proc = run_sweep(tiny_args(model, tmp_path, *extra, sweep_dir="bad"), env, check=False)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
        assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()


def test_a_build_with_an_imatrix_writes_its_provenance_as_llama_quantize_does(swept, tmp_path):
    """llama-quantize records the imatrix in the header (quantize.imatrix.*, tools/quantize/quantize.cpp); the build
    writes the same keys, and the predicted size counts them: still exact to the byte."""
    from sweep.llama.gguf_reader import gguf_tensor_table
    from sweep.quant.imatrix_file import Imatrix, provenance, write_gguf
    from sweep.recipe.build import build_recipe, stored_types
    from sweep.recipe.export import pattern_for

    model, _, _ = swept
    source = SourceModel(model)
    matrices = [t for t in source.tensors if t.quantizable and len(t.ne) == 2 and t.name.startswith("blk.")]
    rng = np.random.default_rng(0)
    im = Imatrix({t.name: rng.uniform(0.5, 2, (1, t.ne[0])).astype(np.float32) for t in matrices},
                 {t.name: np.array([64]) for t in matrices}, chunk_count=3, chunk_size=64, datasets=["wiki.test.raw"])
    path = write_gguf(tmp_path / "tiny.imatrix.gguf", im)
    keys = provenance(path)
    assert keys == [("quantize.imatrix.file", str(path)), ("quantize.imatrix.dataset", "wiki.test.raw"),
                    ("quantize.imatrix.entries_count", len(matrices)), ("quantize.imatrix.chunks_count", 3)]
    lines = [(pattern_for(t.name), "q4_K") for t in source.tensors if t.quantizable]
    built = build_recipe(model, tmp_path / "built.gguf", lines, path, threads=2)
    header = dict(GGUFReader(built).fields)
    assert str(bytes(header["quantize.imatrix.file"].parts[-1]), "utf-8") == str(path)
    assert int(header["quantize.imatrix.entries_count"].parts[-1][0]) == len(matrices)
    predicted = SourceModel(model, keys)
    assert predicted.header_bytes == gguf_tensor_table(built)[1] > source.header_bytes
    assert predicted.file_bytes({n: b for n, (_, b) in stored_types(built).items()}) == built.stat().st_size


def test_the_imatrix_tables_hold_the_token_embedding_which_no_imatrix_covers(swept, tmp_path):
    """A point measured with an importance matrix that has no entry for its tensor (the token embedding: llama-imatrix
    never sees it) is quantized without data, as the build with that matrix quantizes it: it belongs to the imatrix
    tables, not to the tables measured without one."""
    from sweep.quant.imatrix_file import Imatrix, write_gguf

    model, _, env = swept
    source = SourceModel(model)
    matrices = [t for t in source.tensors if t.quantizable and len(t.ne) == 2 and t.name.startswith("blk.")]
    im = Imatrix({t.name: np.ones((1, t.ne[0]), np.float32) for t in matrices},
                 {t.name: np.array([64]) for t in matrices}, chunk_count=3, chunk_size=64, datasets=["wiki.test.raw"])
    path = write_gguf(tmp_path / "tiny.imatrix.gguf", im)
    for axes, where in ((["layer=0", "tensor=attn_q"], "blocks"), (["layer=null", "tensor=token_embd"], "embd")):
        run_sweep(tiny_args(model, tmp_path, *axes, "kind=weight", "fmt=q4_K", f"fmt.imatrix={path}",
                            "metrics.generate=false", sweep_dir=where), env)
    runs = [tmp_path / "blocks", tmp_path / "embd"]
    table = read_table(runs, imatrix=True)
    assert set(table.rows) == {("blk.0.attn_q.weight", "q4_K"), ("token_embd.weight", "q4_K")}
    assert table.rows[("token_embd.weight", "q4_K")].damage > 0
    with pytest.raises(SweepError, match="no single-tensor weight points of GGUF types"):
        read_table(runs, imatrix=False)  # neither point was measured without the matrix
