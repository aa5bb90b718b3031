"""Why q4_K and q6_K damage SmolLM2-Q4_1 about equally: its weights already lie on a Q4_1 grid.

SQNR of each GGUF type on one tensor of the embedded model (Q4_1 values, dequantized to F32 as the sweep's F32
container holds them) and on Gaussian values of the same shape and spread. q4_K's per-32 affine sub-blocks nearly
re-encode a Q4_1 grid, so on this model q4_K is far better than on fresh weights, and q4_1 itself is lossless.

    python -m bench.studies.ggml_source_grid [--tensor blk.12.ffn_down.weight]
"""

from __future__ import annotations

import argparse

import numpy as np

from sweep.llama.container import dequantized
from sweep.llama.model_file import embedded_model_path
from sweep.quant.formats import make_format


def sqnr_db(x: np.ndarray, y: np.ndarray) -> float:
    err = ((x.astype(np.float64) - y) ** 2).sum()
    return float("inf") if err == 0 else float(10 * np.log10((x.astype(np.float64) ** 2).sum() / err))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tensor", default="blk.12.ffn_down.weight")
    ap.add_argument("--types", default="q4_K,q5_K,q6_K,q8_0,q4_1")
    args = ap.parse_args()
    from gguf import GGUFReader

    t = next(t for t in GGUFReader(embedded_model_path()).tensors if t.name == args.tensor)
    w = dequantized(t)
    g = (np.random.default_rng(0).standard_normal(w.shape) * w.std()).astype(np.float32)
    print(f"SQNR (dB) of {args.tensor} {w.shape} ({t.tensor_type.name} values) vs Gaussian values of that shape")
    for name in args.types.split(","):
        fmt = make_format(name)
        print(f"  {name:<6} {sqnr_db(w, fmt(w, tensor=args.tensor)):8.1f} {sqnr_db(g, fmt(g)):8.1f}")


if __name__ == "__main__":
    main()
