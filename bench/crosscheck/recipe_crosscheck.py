"""Cross-check of a recipe's build against llama.cpp's own `llama-quantize --tensor-type-file`.

`python -m sweep.recipe ... --build OUT.gguf` writes the file through llama-cpp-python's `llama_model_quantize`
with the recipe's per-tensor overrides. This gives the exported recipe.txt to the `llama-quantize` binary built
from the same llama.cpp sources (bench/llama_perplexity.py builds it on demand) with the same source and base
ftype (and the recipe's importance matrix, when it was built with one), and compares every tensor: type, stored
bytes, and the bytes themselves.

    python -m bench.crosscheck.recipe_crosscheck RECIPE_DIR [--built OUT.gguf] [--llama-quantize PATH]
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import llama_perplexity
from sweep.llama import gguf_reader


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe_dir", type=Path, help="the --out directory of sweep.recipe (recipe.txt, recipe.json)")
    ap.add_argument("--built", type=Path, help="the file sweep.recipe --build wrote (default: recipe.json's)")
    ap.add_argument("--llama-quantize", help="path of a llama-quantize binary (default: build one)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    spec = json.loads((args.recipe_dir / "recipe.json").read_text())
    built = args.built or Path(spec["built"]["path"])
    source = Path(spec["source"])
    binary = Path(args.llama_quantize) if args.llama_quantize else \
        llama_perplexity.build(targets=("llama-quantize",))
    with tempfile.TemporaryDirectory(prefix="recipe-crosscheck-", dir=built.parent) as tmp:
        theirs = Path(tmp) / "llama-quantize.gguf"
        t0 = time.perf_counter()
        # the recipe's importance matrix, if it was built with one (the same file, as llama-quantize reads it)
        imatrix = ["--imatrix", spec["imatrix"]] if spec.get("imatrix") else []
        proc = subprocess.run([str(binary), *imatrix, "--tensor-type-file", str(args.recipe_dir / "recipe.txt"),
                               str(source), str(theirs), "Q8_0", str(args.threads)], capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"llama-quantize failed ({proc.returncode}): {proc.stderr[-2000:]}")
        secs = time.perf_counter() - t0
        a, _, _ = gguf_reader.gguf_tensor_table(built)
        b, _, _ = gguf_reader.gguf_tensor_table(theirs)
        assert [t.name for t in a] == [t.name for t in b], "different tensor lists"
        same_type = same_bytes = 0
        for ta, tb in zip(a, b):
            same_type += ta.type_id == tb.type_id
            ra = gguf_reader.read_gguf_tensor(built, ta.name)[2]
            rb = gguf_reader.read_gguf_tensor(theirs, tb.name)[2]
            same_bytes += ra.size == rb.size and bool(np.array_equal(ra, rb))
        print(f"{' '.join(['llama-quantize', *imatrix])} --tensor-type-file {args.recipe_dir / 'recipe.txt'} "
              f"{source.name} Q8_0 "
              f"({secs:.1f} s): {len(a)} tensors; same type {same_type}/{len(a)}, identical bytes "
              f"{same_bytes}/{len(a)}; file sizes {built.stat().st_size} (sweep.recipe --build) vs "
              f"{theirs.stat().st_size} (llama-quantize); the files are "
              f"{'identical' if filecmp.cmp(built, theirs, shallow=False) else 'not identical'} byte for byte")
        if same_type != len(a) or same_bytes != len(a):
            raise SystemExit(1)


if __name__ == "__main__":
    main()
