"""The recipe ladder (a recipe at every preset size, each against its preset), the closed loop's stop rules, and
--heldout-text's checks, on a tiny all-F32 model (rows of 256 and 512: the K-quants are real on every tensor)."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
from gguf import GGUFReader
from test_recipe import recipe_cli, sweep_f32_model

from sweep.recipe.loop import chunks, fit_alpha, stop_reason

TENSORS = ("attn_q", "ffn_down")
TYPES = ("q3_K", "q4_K", "q8_0")  # q3_K below the Q2_K preset's q2_K: that size is out of reach


@pytest.fixture(scope="module")
def low_bit(tmp_path_factory, smollm2, wikitext, cache_dir):
    tmp = tmp_path_factory.mktemp("ladder")
    model, sweep_dir, env = sweep_f32_model(tmp, smollm2, wikitext, cache_dir, TENSORS, TYPES)
    other = tmp / "other.txt"  # another text: WikiText's last 40,000 characters, after any window the tables saw
    other.write_text(wikitext.read_text(encoding="utf-8")[-40000:], encoding="utf-8")
    return model, sweep_dir, env, other


def test_stop_rules_and_the_correction():
    agree = [{"ci95": (-1e-3, 2e-3)}, {"ci95": (-5e-4, 1e-4)}]
    off = [{"ci95": (-1e-3, 2e-3)}, {"ci95": (1e-4, 3e-4)}]  # one interval excludes 0
    assert stop_reason(agree, repeated=True, spent=40, cost=4, budget=40) == "agree"  # agreement first
    assert stop_reason(off, repeated=True, spent=4, cost=4, budget=40) == "unchanged"
    assert stop_reason(off, repeated=False, spent=36, cost=4, budget=40) is None  # exactly fits
    assert stop_reason(off, repeated=False, spent=37, cost=4, budget=40) == "budget"
    assert stop_reason([], repeated=False, spent=0, cost=5, budget=4) == "budget"  # not even one iteration
    assert stop_reason([], repeated=False, spent=0, cost=4, budget=4) is None
    parts = chunks(["blk.0.a", "blk.1.a", "blk.2.a", "blk.2.b", "token_embd.weight"], 2)
    assert parts == {"blk 0-1": [0, 1], "blk 2": [2], "outside": None}
    history = [{"points": [{"chunk": "blk 0-1", "measured": 2.0, "predicted_raw": 1.0},
                           {"chunk": "whole", "measured": 9.0, "predicted_raw": 1.0}]},
               {"points": [{"chunk": "blk 0-1", "measured": 4.0, "predicted_raw": 3.0}]}]
    assert fit_alpha(history) == {"blk 0-1": pytest.approx((2 + 12) / (1 + 9))}  # least squares through 0


@pytest.mark.slow
def test_ladder_builds_a_recipe_at_each_size_or_says_why_not(low_bit, tmp_path):
    model, runs, env, other = low_bit
    out = tmp_path / "ladder"
    proc = recipe_cli([runs, "--types", "q3_K,q4_K,q8_0", "--sizes", "Q2_K,Q4_K_M", "--source", model,
                       "--out", out, "--validate", "--heldout-windows", "2", "--heldout-text", other,
                       "--loop-sizes", "Q4_K_M", "--loop-budget", "4", "--speed-reps", "1", "--threads", "2"], env)
    report = json.loads((out / "ladder.json").read_text())
    rungs = {r["size"]: r for r in report["rungs"]}
    assert list(rungs) == ["Q2_K", "Q4_K_M"]
    # Q2_K's preset stores q2_K where the candidates' smallest is q3_K: not reachable, said in one line
    assert "not reachable with candidates q3_K,q4_K,q8_0" in rungs["Q2_K"]["note"]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("Q2_K ("))
    smallest = re.search(r"the smallest recipe \(the other tensors at the preset's types\) takes (\d+) bytes", line)
    assert smallest and int(smallest.group(1)) > rungs["Q2_K"]["preset_bytes"], line
    for size in ("Q4_K_M",):  # (one reachable size: the CI budget)
        r = rungs[size]
        built = out / size / "recipe.gguf"
        preset = GGUFReader(r["preset"])
        assert r["note"] is None and built.stat().st_size <= r["preset_bytes"] == os.path.getsize(r["preset"])
        spec = json.loads((out / size / "recipe.json").read_text())
        assert spec["built"]["file_bytes"] == built.stat().st_size == spec["predicted_file_bytes"]
        # tensors outside the tables keep the preset's type; the measured ones take candidates
        preset_types = {t.name: t.tensor_type.name.lower() for t in preset.tensors}
        for t in GGUFReader(built).tensors:
            if t.name in ("token_embd.weight",) or "attn_v" in t.name or "ffn_up" in t.name:
                assert t.tensor_type.name.lower() == preset_types[t.name], t.name
        covered = [t for t in spec["tensors"] if t["covered"]]
        assert len(covered) == 6 and {t["type_asked"] for t in covered} <= {"q3_K", "q4_K", "q8_0"}
        # validated against the preset of the same size, paired per window, on both texts
        assert r["recipe"]["file_bytes"] == built.stat().st_size and r["preset_row"]["file_bytes"] == r["preset_bytes"]
        for key in ("recipe_minus_preset", "recipe_minus_preset_other_text"):
            d = r[key]
            assert d["ci95"][0] <= d["diff"] <= d["ci95"][1]
            assert d["diff"] == pytest.approx(r["recipe"]["kld_mean"] - r["preset_row"]["kld_mean"]
                                              if key == "recipe_minus_preset" else
                                              r["recipe"]["other_text"]["kld_mean"]
                                              - r["preset_row"]["other_text"]["kld_mean"], rel=1e-6)
    assert report["heldout"]["first_token"] == 3 * 64 and report["heldout"]["windows"] == 2
    assert report["other_text"]["text_sha256"] != report["heldout"]["text_sha256"]
    assert report["other_text"]["text"] == str(other.resolve()) and report["other_text"]["first_token"] == 0
    assert (out / "ladder_pareto.png").stat().st_size > 0 and "on another text" in proc.stdout
    # speed beside quality: llama-bench's pp512/tg128 of the recipe and its preset, in the json and the table
    assert report["throughput"]["reps"] == 1 and report["throughput"]["n_prompt"] == 512
    assert "pp512 / tg128 t/s (median, range)" in proc.stdout and "Q4_K_M   speed: generation " in proc.stdout
    for label in ("recipe", "preset"):
        s = rungs["Q4_K_M"]["speed"][label]
        assert s["pp512"]["median"] > 0 and s["tg128"]["median"] > 0 and len(s["tg128"]["runs"]) == 1
    # the closed loop at Q4_K_M: one iteration of 3 blocks + the whole recipe fits the budget of 4
    loop = rungs["Q4_K_M"]["loop"]
    assert loop["joint_points_spent"] <= 4 and len(loop["iterations"]) == 1
    it = loop["iterations"][0]
    assert [p["chunk"] for p in it["points"]] == ["whole", "blk 0", "blk 1", "blk 2"]
    first = json.loads((out / "Q4_K_M" / "loop" / "iter-0" / "recipe.json").read_text())
    singles = {t["name"]: t["predicted_damage"] for t in first["tensors"] if t["covered"]}
    for p in it["points"]:
        names = [n for n in singles if p["chunk"] == "whole" or n.startswith(f"blk.{p['chunk'][4:]}.")]
        assert p["predicted_raw"] == pytest.approx(sum(singles[n] for n in names), rel=1e-9)
        assert p["predicted"] == p["predicted_raw"]  # no correction yet in the first iteration
        assert p["agrees"] == (p["ci95"][0] <= 0 <= p["ci95"][1])
    # the stop rule that fired is the one the measurements call for
    want = "agree" if all(p["agrees"] for p in it["points"]) else None
    assert loop["stop"] == (want or loop["stop"]) and loop["stop"] in ("agree", "unchanged", "budget")
    if loop["stop"] != "agree":
        assert loop["alpha_final"] and all(np.isfinite(list(loop["alpha_final"].values())))
    assert f"closed loop: stop ({loop['stop']}) after 1 iteration(s)" in proc.stdout


@pytest.mark.slow
def test_heldout_text_mistakes_are_one_line_errors(low_bit, tmp_path):
    model, runs, env, other = low_bit
    short = tmp_path / "short.txt"
    short.write_text("A few words are not two windows.\n")
    binary = tmp_path / "weights.bin"
    binary.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(range(256)))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("Caf\xe9 cr\xe8me, na\xefve fa\xe7ade.\n".encode("latin-1") * 500)
    cases = [(tmp_path / "missing.txt", "no such file"), (short, "tokens, fewer than the 2 windows of 64 tokens"),
             (binary, "is binary (a NUL byte at 5)"), (latin1, "is not UTF-8 text (undecodable byte at 3)")]
    for path, message in cases:
        out = tmp_path / "o"
        proc = recipe_cli([runs, "--types", "q4_K,q8_0", "--size", "Q4_K_M", "--source", model, "--out", out,
                           "--build", out / "r.gguf", "--validate", "--heldout-text", path], env, check=False)
        assert proc.returncode == 2 and proc.stderr.startswith(f"error: --heldout-text {path}"), proc.stderr[-2000:]
        assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert not out.exists()  # nothing written


def _rung(size, kld, windows, sweep_windows, predicted, choices, file_bytes):
    from pathlib import Path

    from sweep.recipe.ladder_table import Rung
    from sweep.recipe.solve import Choice, Recipe
    from sweep.recipe.validate import FileScore

    recipe = Recipe([Choice(n, ty if d is not None else None, ty, 100, d if d is not None else np.nan, 0.0)
                     for n, ty, d in choices], file_bytes, "file", file_bytes, file_bytes, 1000, predicted, 0.0)
    score = FileScore("recipe", Path(f"{size}.gguf"), file_bytes, 1000, {"kld_mean": kld}, np.asarray(windows),
                      np.asarray(sweep_windows), predicted, None, [])
    rung = Rung(size, preset_bytes=file_bytes, recipe=recipe)
    rung.scores = {"recipe": score, "preset": score}
    return rung


def test_the_order_check_names_why_a_larger_recipe_measured_worse():
    from sweep.recipe.ladder_table import format_order, order_check

    small = _rung("Q3_K_M", 0.10, [0.09, 0.11, 0.10, 0.10], [0.1, 0.1], 0.05,
                  [("a", "q4_K", 0.02), ("b", "q4_K", 0.03), ("token_embd.weight", "q8_0", None)], 1000)
    larger = _rung("Q4_K_S", 0.08, [0.07, 0.09, 0.08, 0.08], [0.08, 0.08], 0.04,
                   [("a", "q5_0", 0.01), ("b", "q4_K", 0.03), ("token_embd.weight", "q8_0", None)], 1100)
    # larger still, predicted better and better on the tables' windows, worse on held-out text but within noise,
    # with one tensor at a type the tables measured as exact (damage 0) and the preset's type outside the tables
    largest = _rung("Q4_K_M", 0.085, [0.06, 0.11, 0.07, 0.10], [0.07, 0.07], 0.03,
                    [("a", "q5_1", 0.0), ("b", "q4_K", 0.03), ("token_embd.weight", "q6_K", None)], 1200)
    steps = order_check([largest, small, larger])  # in any order: checked smallest file first
    assert [(s["previous"], s["size"], s["falls"]) for s in steps] == [("Q3_K_M", "Q4_K_S", True),
                                                                       ("Q4_K_S", "Q4_K_M", False)]
    reasons = " | ".join(steps[1]["reasons"])
    assert "held-out: within noise (paired +5.00e-03" in reasons
    assert "on the tables' own windows the larger recipe is better (0.07 < 0.08" in reasons
    assert "1 more tensors take a type the tables measured as an exact re-encoding of the source (damage 0, e.g. " \
           "a=q5_1)" in reasons
    assert "1 tensors outside the tables take other types (the presets', e.g. token_embd.weight=q6_K)" in reasons
    lines = format_order(steps)
    assert lines[0] == "order: the recipes' KLD falls at 1 of 2 steps; where it does not:"
    assert lines[1].startswith("  Q4_K_M after Q4_K_S: 0.085 vs 0.08: ")
    same = _rung("Q3_K_S", 0.11, [0.1, 0.12, 0.11, 0.11], [0.1, 0.1], 0.05,
                 [("a", "q4_K", 0.02), ("b", "q4_K", 0.03), ("token_embd.weight", "q8_0", None)], 1050)
    step = order_check([small, same])[0]
    assert step["reasons"] == ["the same recipe as Q3_K_M (the same file): the difference is the scoring's only"]


def test_a_file_whose_logits_go_non_finite_is_a_row_that_says_so():
    """llama.cpp's kernels on a built file can give NaN/inf logits on some text (the no-imatrix Q2_K preset did on
    the licenses): the validation reports it in its row and verdict instead of stopping the ladder."""
    from sweep.recipe.ladder_table import _diverged
    from sweep.recipe.validate import _summary, _window_damage
    from sweep.scoring.perplexity import Score

    ref = Score(np.full((2, 4), 2.0), 5, 0.0, argmax=np.zeros((2, 4), np.int32), lse=np.zeros((2, 4)))
    bad = Score(np.array([[2.0, np.nan, 1.0, 1.0]]), 5, 0.0, diverged="non-finite logits in window 0 at position 1")
    row = _summary(bad, ref)
    assert row["diverged"] == bad.diverged and np.isnan(row["kld_mean"]) and np.isnan(row["ppl"])
    assert row["ref_ppl"] == ref.ppl and _window_damage(bad, ref, "kld_mean") is None
    assert _diverged({"kld_mean": 0.1}, row) == ("preset diverged (non-finite logits in window 0 at position 1); "
                                                 "the recipe did not")
    assert _diverged({"kld_mean": 0.1}, {"kld_mean": 0.2}) is None
