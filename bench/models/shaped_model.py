"""Write a GGUF with the shapes of a model people quantize and random weights: F16 written by gguf's writer, then
quantized by llama.cpp's own quantizer (the one llama-quantize runs) to a K-quant preset.

  tinyllama: TinyLlama-1.1B (llama, 22 blocks, n_embd 2048, n_ff 5632, 32 heads / 4 KV heads, 32,000 tokens)
  7b:        Llama-2-7B   (llama, 32 blocks, n_embd 4096, n_ff 11008, 32 heads / 32 KV heads, 32,000 tokens)

Neither real model is obtainable offline. The tokenizer is SmolLM2's (the embedded model's) cut to its first 32,000
tokens (with the merges that stay inside them); the output layer is untied, as in both real models. Too big for CI:
run by hand, then delete the files (the 7B's F16 file is 13.5 GB, removed after quantizing unless --keep-f16).

    python -m bench.models.shaped_model tinyllama /tmp/tinyllama-shaped.gguf            # Q4_K_M, ~0.7 GB
    python -m bench.models.shaped_model 7b /tmp/llama7b-shaped.gguf --preset Q4_K_M     # ~4 GB; needs ~18 GB free disk
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter

from sweep.llama.model_file import embedded_model_path
from sweep.recipe.build import build_preset


@dataclass(frozen=True)
class Shape:
    n_layers: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    n_vocab: int = 32000
    n_ctx_train: int = 4096


SHAPES = {"tinyllama": Shape(22, 2048, 5632, 32, 4, n_ctx_train=2048), "7b": Shape(32, 4096, 11008, 32, 32)}


def tokenizer_fields(source: Path, n_vocab: int):
    """SmolLM2's tokenizer metadata with the vocabulary cut to `n_vocab` tokens."""
    reader = GGUFReader(source)
    fields = {f.name: f for f in reader.fields.values() if f.name.startswith("tokenizer.")}
    tokens = fields["tokenizer.ggml.tokens"].contents()
    if len(tokens) < n_vocab:
        raise SystemExit(f"{source} has only {len(tokens)} tokens")
    kept = set(tokens[:n_vocab])
    for name, f in fields.items():
        vtype = f.types[0]
        sub = f.types[-1] if vtype == GGUFValueType.ARRAY else None
        value = f.contents()
        if name in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
            value = value[:n_vocab]
        elif name == "tokenizer.ggml.merges":  # only merges of kept tokens into a kept token
            value = [m for m in value if (p := m.split(" ", 1)) and len(p) == 2 and p[0] in kept and p[1] in kept
                     and p[0] + p[1] in kept]
        elif name.endswith("_token_id") and int(value) >= n_vocab:
            continue
        yield name, value, vtype, sub


def write_f16(path: Path, shape: Shape, name: str, seed: int = 0) -> Path:
    """Random weights (N(0, 0.02) matrices, norms near 1) in F16, the 1-D norms in F32, as a converter writes them."""
    writer = GGUFWriter(path, "llama")
    writer.add_name(f"{name}-shaped-random")
    writer.add_context_length(shape.n_ctx_train)
    writer.add_embedding_length(shape.n_embd)
    writer.add_block_count(shape.n_layers)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_rope_dimension_count(shape.n_embd // shape.n_head)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_file_type(1)  # MOSTLY_F16
    for key, value, vtype, sub in tokenizer_fields(embedded_model_path(), shape.n_vocab):
        writer.add_key_value(key, value, vtype, sub_type=sub)
    rng = np.random.default_rng(seed)
    tensors: list[tuple[str, tuple[int, ...], bool]] = [("token_embd.weight", (shape.n_vocab, shape.n_embd), False),
                                                        ("output_norm.weight", (shape.n_embd,), True),
                                                        ("output.weight", (shape.n_vocab, shape.n_embd), False)]
    kv = shape.n_embd // shape.n_head * shape.n_head_kv
    for i in range(shape.n_layers):
        tensors += [(f"blk.{i}.attn_norm.weight", (shape.n_embd,), True),
                    (f"blk.{i}.attn_q.weight", (shape.n_embd, shape.n_embd), False),
                    (f"blk.{i}.attn_k.weight", (kv, shape.n_embd), False),
                    (f"blk.{i}.attn_v.weight", (kv, shape.n_embd), False),
                    (f"blk.{i}.attn_output.weight", (shape.n_embd, shape.n_embd), False),
                    (f"blk.{i}.ffn_norm.weight", (shape.n_embd,), True),
                    (f"blk.{i}.ffn_gate.weight", (shape.n_ff, shape.n_embd), False),
                    (f"blk.{i}.ffn_up.weight", (shape.n_ff, shape.n_embd), False),
                    (f"blk.{i}.ffn_down.weight", (shape.n_embd, shape.n_ff), False)]
    for tname, tshape, norm in tensors:  # declared first, written one at a time: never the whole model in memory
        writer.add_tensor_info(tname, tshape, np.dtype(np.float32 if norm else np.float16),
                               int(np.prod(tshape)) * (4 if norm else 2))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, tshape, norm in tensors:
        if norm:
            writer.write_tensor_data(1.0 + 0.1 * rng.standard_normal(tshape, dtype=np.float32))
        else:
            writer.write_tensor_data((0.02 * rng.standard_normal(tshape, dtype=np.float32)).astype(np.float16))
    writer.close()
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("path", type=Path)
    ap.add_argument("--preset", default="Q4_K_M", help="llama.cpp preset to quantize to (default Q4_K_M)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep-f16", action="store_true")
    args = ap.parse_args()
    f16 = args.path.with_suffix(".f16.gguf")
    t0 = time.perf_counter()
    if not f16.exists():
        write_f16(f16, SHAPES[args.shape], args.shape)
    print(f"wrote {f16}: {f16.stat().st_size / 2**30:.2f} GB in {time.perf_counter() - t0:.0f} s", flush=True)
    t0 = time.perf_counter()
    build_preset(f16, args.path, args.preset, threads=args.threads)
    print(f"quantized to {args.preset} by llama.cpp's quantizer: {args.path} {args.path.stat().st_size / 2**30:.2f} GB "
          f"in {time.perf_counter() - t0:.0f} s")
    if not args.keep_f16:
        f16.unlink()


if __name__ == "__main__":
    main()
