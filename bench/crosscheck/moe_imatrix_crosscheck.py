"""Cross-check of `python -m sweep.imatrix` on Mixture-of-Experts models against llama.cpp's own `llama-imatrix`
(built from the same sources, as bench/crosscheck/imatrix_crosscheck.py builds it).

The models are the tests' tiny random-weight qwen3moe and qwen2moe GGUFs (sweep/testing/tiny_model.py: 5 experts, 2 per
token, expert 4 never routed by construction), or any GGUF given with --model. Both tools run on the file itself
(native container), the same text and windows (-c N_CTX -b N_CTX: one window per batch, as the sweep decodes;
-nr: no weight repacking). Compared: the tensors covered, the counts of every tensor -- for an expert stack one count
per expert, the tokens routed to it -- exactly, and the sums of squared activations (relative difference per value).

    python -m bench.crosscheck.moe_imatrix_crosscheck [--llama-imatrix PATH] [--chunks 8] [--n-ctx 64]
        [--model PATH ...]

Seen on 2026-12-02 (llama-imatrix built from llama-cpp-python 0.3.36's vendored source, 8 windows of 64, 2 threads):
both tiny models "24 tensors (same set), counts equal: True, max relative difference 0" (qwen2moe: 36 tensors), all
9 expert stacks' per-expert counts equal, e.g. blk.0.ffn_down_exps.weight [134, 237, 378, 275, 0] on both sides.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench import llama_perplexity
from bench.crosscheck import imatrix_crosscheck
from sweep.imatrix.compute import collect
from sweep.llama.model_file import embedded_model_path, model_info
from sweep.pipeline.config import compose
from sweep.pipeline.reference import open_reference
from sweep.pipeline.settings import job_settings
from sweep.quant.imatrix_file import Imatrix, read
from sweep.scoring.text import embedded_text_path
from sweep.testing.tiny_model import MOE_ARCHITECTURES, write_tiny_model


def crosscheck(binary: Path, model: Path, text: Path, chunks: int, n_ctx: int, threads: int, tmp: Path) -> bool:
    cfg = compose([f"model.path={model}", "model.container=native", f"data.path={text}", f"data.n_ctx={n_ctx}",
                   f"data.n_windows={chunks}", f"run.threads={threads}", "run.progress=false"])
    info = model_info(model)
    with open_reference(job_settings(cfg)) as ref:
        col = collect(ref.backend, ref.windows.tokens)
        ours = Imatrix(col.sums, col.counts, chunk_count=ref.windows.n_windows, chunk_size=n_ctx)
    out = tmp / f"{model.stem}.imatrix.gguf"
    imatrix_crosscheck.llama_imatrix(binary, model, text, chunks, threads, out, "gguf", n_ctx=n_ctx)
    theirs = read(out)
    print(f"{model.name} ({info.arch}, {info.n_experts} experts, {info.n_experts_used} per token), {chunks} windows "
          f"of {n_ctx}:")
    imatrix_crosscheck.compare("gguf", ours, theirs)
    stacks = sorted(n for n in ours.counts if ours.counts[n].size == info.n_experts > 1)
    equal = all(np.array_equal(ours.counts[n], theirs.counts.get(n)) for n in stacks)
    print(f"  expert stacks: {len(stacks)}, per-expert counts equal to llama-imatrix's: {equal}; e.g. "
          f"{stacks[0] if stacks else '-'} counts {ours.counts[stacks[0]].tolist() if stacks else '-'} (ours) vs "
          f"{theirs.counts[stacks[0]].tolist() if stacks else '-'} (llama-imatrix)")
    return equal and set(ours.sums) == set(theirs.sums)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-imatrix", help="path of a llama-imatrix binary (default: build one)")
    ap.add_argument("--model", nargs="*", help="MoE GGUF files (default: the tests' tiny qwen3moe and qwen2moe)")
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--n-ctx", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--text", default=os.environ.get("SWEEP_WIKITEXT") or str(embedded_text_path()))
    args = ap.parse_args()
    binary = Path(args.llama_imatrix) if args.llama_imatrix else \
        llama_perplexity.build(targets=("llama-imatrix", "llama-quantize", "llama-perplexity")).parent / "llama-imatrix"
    with tempfile.TemporaryDirectory(prefix="moe-imatrix-crosscheck-") as tmp:
        models = [Path(m) for m in args.model] if args.model else \
            [write_tiny_model(Path(tmp) / f"tiny-{arch}.gguf", embedded_model_path(), arch=arch)
             for arch in MOE_ARCHITECTURES]
        ok = [crosscheck(binary, m, Path(args.text), args.chunks, args.n_ctx, args.threads, Path(tmp)) for m in models]
    print(f"MoE imatrix cross-check: {sum(ok)} of {len(ok)} models with the same tensors and per-expert counts as "
          f"llama-imatrix")
    sys.exit(0 if all(ok) else 1)


if __name__ == "__main__":
    main()
