"""Time to fake-quantize one tensor to a GGUF type (ggml's quantizer + to_float), by thread count.

The tensors are the embedded model's, dequantized to F32 (what the F32 container holds). A point of the sweep pays
this once per tensor, beside ~1.25 s per scored window of 512 tokens.

    python -m bench.perf.ggml_quant_timing [--types q4_K,q6_K,q8_0,iq4_xs,iq2_xxs] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from sweep.llama.container import dequantized
from sweep.llama.model_file import embedded_model_path
from sweep.quant.formats import make_format

TENSORS = ("blk.12.ffn_down.weight", "blk.12.attn_v.weight", "token_embd.weight")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default="q4_K,q6_K,q8_0,iq4_xs,q2_K,iq2_xxs")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--imatrix", help="imatrix file for the types that need one (default: flat importance)")
    args = ap.parse_args()
    from gguf import GGUFReader

    from sweep.llama import quantize as be
    from sweep.quant import ggml_types

    tensors = {t.name: t for t in GGUFReader(embedded_model_path()).tensors if t.name in TENSORS}
    cores = len(os.sched_getaffinity(0))
    threads = sorted({1, cores})
    print(f"{cores} cores; best of {args.repeat}; seconds per tensor (quantize + dequantize)")
    print(f"{'type':<9} {'tensor':<24} {'shape':>12} {'stored as':<9} " + " ".join(f"{t:>2} thr" for t in threads)
          + "  speed-up")
    for name in args.types.split(","):
        for tname in TENSORS:
            x = dequantized(tensors[tname])
            got, _ = ggml_types.type_for_rows(name, x.shape[-1])
            imat = np.ones(x.shape[-1], np.float32) if ggml_types.TYPES[name].needs_imatrix else None
            fmt = make_format(name)
            secs = []
            for n in threads:
                best = np.inf
                for _ in range(args.repeat):
                    t0 = time.perf_counter()
                    if imat is None:
                        fmt(x, tensor=tname, threads=n)
                    else:  # needs an imatrix: same work through the backend calls fake_quant makes
                        be.ggml_dequantize(be.ggml_quantize(x, got.type_id, imat, n), got.type_id, x.shape, n)
                    best = min(best, time.perf_counter() - t0)
                secs.append(best)
            print(f"{name:<9} {tname:<24} {'x'.join(map(str, x.shape)):>12} {got.name:<9} "
                  + " ".join(f"{s:6.3f}" for s in secs) + f"  {secs[0] / secs[-1]:.2f}x")


if __name__ == "__main__":
    main()
