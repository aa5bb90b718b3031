"""Write a GGUF with TinyLlama-1.1B's shapes and random weights, to plan a sweep of a 1.1B model offline.

TinyLlama-1.1B-Chat is not obtainable offline. Its shapes are: llama architecture, 22 blocks, n_embd 2048, n_ff
5632, 32 heads / 4 KV heads, a 32,000-token vocabulary, an untied output layer. The tokenizer is SmolLM2's (the
embedded model's), cut to its first 32,000 tokens (with the merges that stay inside them). Matmuls are Q4_0 and the
embeddings Q8_0 (gguf's writer quantizes those types; the real file is Q4_K_M), so the file is ~0.7 GB, about the
real one's 0.67 GB. Too big for CI: run by hand, then delete the file.

    python bench/tinyllama_shaped.py /tmp/tinyllama-shaped.gguf
    python -m sweep 'layer=range(0,22)' fmt=bf16,int8,int4 model.path=/tmp/tinyllama-shaped.gguf --plan
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import quantize

from sweep.llama.model_file import embedded_model_path

N_VOCAB, N_EMBD, N_FF, N_HEAD, N_HEAD_KV, N_LAYERS, N_CTX_TRAIN = 32000, 2048, 5632, 32, 4, 22, 2048


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


def write(path: Path, seed: int = 0) -> Path:
    writer = GGUFWriter(path, "llama")
    writer.add_name("tinyllama-1.1b-shaped-random")
    writer.add_context_length(N_CTX_TRAIN)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYERS)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    writer.add_rope_dimension_count(N_EMBD // N_HEAD)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    for name, value, vtype, sub in tokenizer_fields(embedded_model_path(), N_VOCAB):
        writer.add_key_value(name, value, vtype, sub_type=sub)
    rng = np.random.default_rng(seed)

    def add(name, shape, qtype, scale=0.02, offset=0.0):
        data = (offset + scale * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
        writer.add_tensor(name, data if qtype == Q.F32 else quantize(data, qtype), raw_dtype=None if qtype == Q.F32
                          else qtype)

    kv = N_EMBD // N_HEAD * N_HEAD_KV
    add("token_embd.weight", (N_VOCAB, N_EMBD), Q.Q8_0)
    add("output_norm.weight", (N_EMBD,), Q.F32, 0.1, 1.0)
    add("output.weight", (N_VOCAB, N_EMBD), Q.Q8_0)
    for i in range(N_LAYERS):
        add(f"blk.{i}.attn_norm.weight", (N_EMBD,), Q.F32, 0.1, 1.0)
        add(f"blk.{i}.attn_q.weight", (N_EMBD, N_EMBD), Q.Q4_0)
        add(f"blk.{i}.attn_k.weight", (kv, N_EMBD), Q.Q4_0)
        add(f"blk.{i}.attn_v.weight", (kv, N_EMBD), Q.Q4_0)
        add(f"blk.{i}.attn_output.weight", (N_EMBD, N_EMBD), Q.Q4_0)
        add(f"blk.{i}.ffn_norm.weight", (N_EMBD,), Q.F32, 0.1, 1.0)
        add(f"blk.{i}.ffn_gate.weight", (N_FF, N_EMBD), Q.Q4_0)
        add(f"blk.{i}.ffn_up.weight", (N_FF, N_EMBD), Q.Q4_0)
        add(f"blk.{i}.ffn_down.weight", (N_EMBD, N_FF), Q.Q4_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path", type=Path, nargs="?", default=Path("/tmp/tinyllama-shaped.gguf"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    write(args.path)
    print(f"wrote {args.path}: {args.path.stat().st_size / 2**20:.0f} MB in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
