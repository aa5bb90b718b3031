"""The recipe solved from the map against the one solved from the exact grid, on held-out text, paired.

    python -m bench.estimate.recipe_vs_grid --grid runs/GRID --map runs/MAP [--sizes Q3_K_M,Q4_K_M,Q5_K_M]
        [--refine 30] [--heldout-windows 16] [--out runs/recipe-vs-grid]

GRID is an exact sweep of weight points of GGUF types, MAP the same grid with run.estimate=map (on the same store:
its exact points are the grid's). At each size, as the ladder does (sweep/recipe/ladder.py): llama.cpp's preset is
built from the F32 source, its size is the budget and its types stay on the tensors the tables do not cover; the
recipe is solved from the exact table and from the map's (refined with --refine N points, sweep/recipe/refine.py),
both are built with llama.cpp's quantizer and scored with the preset on the same held-out windows, paired with the
source in F32. Printed per size: each file's held-out KLD with its 95% interval, the map's recipe minus the exact
one (paired over windows), and whether the map's KLD lies inside the exact recipe's interval.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sweep.cores import available_cores
from sweep.recipe.build import build_and_check, preset_file
from sweep.recipe.command import default_source
from sweep.recipe.export import write_recipe
from sweep.recipe.ladder import preset_defaults
from sweep.recipe.refine import refine
from sweep.recipe.sizes import SourceModel
from sweep.recipe.solve import make_recipe
from sweep.recipe.table import read_table
from sweep.recipe.validate import References, file_row, paired


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", type=Path, required=True)
    p.add_argument("--map", type=Path, required=True)
    p.add_argument("--sizes", default="Q3_K_M,Q4_K_M,Q5_K_M")
    p.add_argument("--types", default="q2_K,q3_K,q4_K,q5_K,q6_K,q8_0")
    p.add_argument("--refine", type=int, default=30)
    p.add_argument("--heldout-windows", type=int, default=16)
    p.add_argument("--out", type=Path, default=Path("runs/recipe-vs-grid"))
    a = p.parse_args(argv)
    threads = available_cores()
    types = a.types.split(",")
    exact, mapped = read_table([a.grid]), read_table([a.map])
    source_path = default_source(exact)
    source = SourceModel(source_path)
    rows = []
    for size in a.sizes.split(","):
        preset = preset_file(a.out, source_path, size, None, threads)
        budget, defaults = preset.stat().st_size, preset_defaults(preset)

        def solve(t, budget=budget, defaults=defaults):
            return make_recipe(t, source, types, budget, "file", defaults)

        files = {"preset": preset}
        r_exact = solve(exact)
        r_map, _, rounds, _ = refine(solve, lambda r: read_table(r), [a.map], mapped, source, types, a.refine,
                                     a.out / size / "refine", threads, None)
        for label, recipe in (("exact", r_exact), ("map", r_map)):
            d = a.out / size / label
            txt, js = write_recipe(d, recipe, source, {"size": size, "from": label})
            files[label] = build_and_check(recipe, source_path, d / "recipe.gguf", txt, js, None, threads)
        same = sum(x.type_stored == y.type_stored for x, y in zip(r_exact.choices, r_map.choices))
        rows.append((size, files, r_exact, r_map, same, rounds))
    with References(exact, source_path, a.out, a.heldout_windows, threads) as refs:
        print(f"held-out: {a.heldout_windows} windows of {exact.n_ctx} tokens after the tables' {exact.n_windows}")
        print("| size | preset KLD [95%] | exact-grid recipe KLD [95%] | map recipe KLD [95%] | map - exact (paired) "
              "[95%] | map inside exact's interval | tensors of the same type | refined points |")
        print("|---|---|---|---|---|---|---|---|")
        for size, files, r_exact, _, same, rounds in rows:
            n = r_exact.n_elements
            s = {k: refs.score(f"{size} {k}", f, n) for k, f in files.items()}
            row = {k: file_row(v) for k, v in s.items()}
            d = paired(s["map"].window_damage, s["exact"].window_damage)
            lo, hi = row["exact"]["kld_ci95"]
            inside = lo <= row["map"]["kld_mean"] <= hi
            measured = sum(len(r["measured"]) for r in rounds)
            print(f"| {size} | {_ci(row['preset'])} | {_ci(row['exact'])} | {_ci(row['map'])} | {d['diff']:+.4f} "
                  f"[{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}] | {'yes' if inside else 'NO'} | "
                  f"{same}/{len(r_exact.choices)} | {measured} |")


def _ci(row: dict) -> str:
    return f"{row['kld_mean']:.4f} [{row['kld_ci95'][0]:.4f}, {row['kld_ci95'][1]:.4f}]"


if __name__ == "__main__":
    main()
