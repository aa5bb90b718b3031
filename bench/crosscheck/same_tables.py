"""A restructuring changes no number: the same fixed sweeps run by two trees (a git revision and this working tree),
their tables compared column by column, bit for bit.

The sweeps, on the embedded SmolLM2 and text (2 windows each), through the command line (`python -m sweep`, which
both trees have, whatever their modules are called):
  * weight int8 ffn_down, activation int8 l_out, GGUF type q4_K attn_v, a recipe joint point (every tensor of
    block 3 at once), in the F32 container;
  * a weight point in the native container (its delta added to the quantized weights);
  * a prefix-reuse sweep: int8 ffn_down at layers 20..29 decoded from stages at 20 and 25.

Each tree gets its own store and sweep directories (nothing computed by one is read by the other); the F32
container is shared (it is the same file). Columns that hold wall-clock times, dates or paths differ by nature and
are listed apart, never compared. Exit status 1 on any other difference.

    python -m bench.crosscheck.same_tables --against REV [--windows 2] [--keep DIR] [--added COL,...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
from gguf import GGUFReader

from sweep.llama.model_file import embedded_model_path

ROOT = Path(__file__).resolve().parents[2]
COMMON = ["kind=weight", "metrics.generate=false", "run.progress=false"]
SWEEPS = {
    "weight_f32": ["tensor=ffn_down", "layer=5", "fmt=int8", *COMMON],
    "activation_f32": ["kind=activation", "tensor=l_out", "layer=5", "fmt=int8", "metrics.generate=false",
                       "run.progress=false"],
    "ggml_type_f32": ["tensor=attn_v", "layer=3", "fmt=q4_K", *COMMON],
    "recipe_joint_f32": ["fmt=recipe", "fmt.recipe={recipe}", "tensor=all", "layer=3", *COMMON],
    "weight_native": ["model.container=native", "tensor=ffn_down", "layer=5", "fmt=int8", *COMMON],
    "prefix_reuse": ["tensor=ffn_down", "layer=range(20,30)", "fmt=int8", "run.prefix_reuse=true",
                     "run.prefix_starts=[20,25]", *COMMON],
}
# what is not a number of the model: when and where it ran, and how long it took
VOLATILE_WORDS = ("_s", "_at", "seconds", "time", "date", "dir", "path", "host", "pid", "wall", "when", "version")


def volatile(column: str) -> bool:
    return any(column.endswith(w) or w in column.split("_") for w in VOLATILE_WORDS)


def write_recipe(path: Path) -> None:
    """Every tensor of block 3: matrices at q4_K, the rest as F32 (a recipe.json as sweep/recipe/export.py writes)."""
    reader = GGUFReader(embedded_model_path())
    tensors = [{"name": t.name, "type": "q4_K" if len(t.shape) == 2 else "f32"}
               for t in reader.tensors if t.name.startswith("blk.3.")]
    path.write_text(json.dumps({"metric": "kld_mean", "tensors": tensors}))


def run_tree(tree: Path, work: Path, windows: int, recipe: Path, cache: Path) -> dict[str, pd.DataFrame]:
    env = {**os.environ, "PYTHONPATH": str(tree), "SWEEP_CACHE": str(cache)}
    env.pop("SWEEP_WIKITEXT", None)
    tables = {}
    for name, axes in SWEEPS.items():
        args = [a.format(recipe=recipe) for a in axes]
        cmd = [sys.executable, "-m", "sweep", *args, f"data.n_windows={windows}", "run.threads=2",
               f"run.store={work / 'store'}", f"hydra.sweep.dir={work / name}"]
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{tree}: sweep {name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        tables[name] = pd.read_parquet(work / name / "results.parquet")
        print(f"  {name}: {len(tables[name])} rows", flush=True)
    return tables


def compare(a: pd.DataFrame, b: pd.DataFrame, added: frozenset[str] = frozenset()
            ) -> tuple[list[str], list[str], list[str]]:
    """(compared and equal, differing, skipped as volatile or added); columns only one side has count as differing,
    except the `added` ones that only this tree (b) has: a new column, said, not a changed number."""
    same, differ, skipped = [], [], []
    for col in sorted(set(a.columns) | set(b.columns)):
        if volatile(col) or (col in added and col in b.columns and col not in a.columns):
            skipped.append(col)
        elif col not in a.columns or col not in b.columns:
            differ.append(f"{col} (only in {'the revision' if col in a.columns else 'this tree'})")
        elif a[col].dtype != b[col].dtype or not a[col].reset_index(drop=True).equals(b[col].reset_index(drop=True)):
            differ.append(col)
        else:
            same.append(col)
    return same, differ, skipped


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", required=True, help="the git revision to compare with (e.g. main)")
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--keep", help="keep the sweeps' directories here (default: a temporary directory, removed)")
    ap.add_argument("--added", default="", help="columns this tree adds on purpose (comma-separated, e.g. estimated): "
                                                "not compared when only this tree has them; listed as not compared")
    args = ap.parse_args()
    added = frozenset(c for c in args.added.split(",") if c)
    work = Path(args.keep or tempfile.mkdtemp(prefix="same-tables-"))
    work.mkdir(parents=True, exist_ok=True)
    rev_tree = work / "rev"
    subprocess.run(["git", "worktree", "add", "--detach", str(rev_tree), args.against], cwd=ROOT, check=True,
                   capture_output=True)
    try:
        recipe = work / "recipe.json"
        write_recipe(recipe)
        cache = Path(os.environ.get("SWEEP_CACHE") or Path.home() / ".cache" / "sweep")
        print(f"revision {args.against}:", flush=True)
        before = run_tree(rev_tree, work / "before", args.windows, recipe, cache)
        print("this tree:", flush=True)
        after = run_tree(ROOT, work / "after", args.windows, recipe, cache)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(rev_tree)], cwd=ROOT, capture_output=True)
    failures = 0
    for name in SWEEPS:
        same, differ, skipped = compare(before[name], after[name], added)
        ok = not differ and len(before[name]) == len(after[name])
        failures += not ok
        print(f"{name}: {'bit-identical' if ok else 'DIFFERENT'} ({len(before[name])} rows; {len(same)} columns "
              f"equal{'; differ: ' + ', '.join(differ) if differ else ''}; not compared: {', '.join(skipped)})")
    common = set.intersection(*(set(compare(before[n], after[n], added)[0]) for n in SWEEPS))
    print(f"compared columns (every sweep): {', '.join(sorted(common))}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
