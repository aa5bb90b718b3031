"""A tiny random-weight llama GGUF, written with gguf's writer, with SmolLM2's tokenizer metadata.

Small enough to decode a 64-token window in milliseconds, real enough for llama.cpp to load and run: the same
architecture and tensor layout as SmolLM2 (tied embeddings, Q4_1 matmuls, a Q8_0 token embedding, F32 norms).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import quantize

N_EMBD, N_FF, N_HEAD, N_HEAD_KV, N_LAYERS, N_CTX_TRAIN = 64, 128, 4, 2, 3, 256
Q = GGMLQuantizationType


def write_tiny_model(path: Path, tokenizer_source: Path, seed: int = 0, add_bos: bool | None = None,
                     n_embd: int = N_EMBD, n_ff: int = N_FF, matmul_type: Q = Q.Q4_1, embd_type: Q = Q.Q8_0) -> Path:
    """`n_embd`, `n_ff` and the types let tests make variants, e.g. an all-F32 model whose rows suit 256-blocks."""
    N_EMBD, N_FF = n_embd, n_ff  # noqa: N806  (the module's defaults, overridable)
    reader = GGUFReader(tokenizer_source)
    writer = GGUFWriter(path, "llama")
    writer.add_name("sweep-tiny-test")
    writer.add_context_length(N_CTX_TRAIN)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYERS)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    writer.add_rope_dimension_count(N_EMBD // N_HEAD)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    n_vocab = 0
    for field in reader.fields.values():
        if not field.name.startswith("tokenizer."):
            continue
        if add_bos is not None and field.name == "tokenizer.ggml.add_bos_token":
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
        if field.name == "tokenizer.ggml.tokens":
            n_vocab = len(field.data)
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)

    rng = np.random.default_rng(seed)

    def add(name: str, shape: tuple[int, ...], qtype: Q, scale: float = 0.08, offset: float = 0.0):
        data = (offset + scale * rng.standard_normal(shape)).astype(np.float32)
        if qtype == Q.F32:
            writer.add_tensor(name, data)
        else:
            writer.add_tensor(name, quantize(data, qtype), raw_dtype=qtype)

    add("token_embd.weight", (n_vocab, N_EMBD), embd_type, scale=0.05)
    add("output_norm.weight", (N_EMBD,), Q.F32, scale=0.1, offset=1.0)
    kv = N_EMBD // N_HEAD * N_HEAD_KV
    for i in range(N_LAYERS):
        add(f"blk.{i}.attn_norm.weight", (N_EMBD,), Q.F32, scale=0.1, offset=1.0)
        add(f"blk.{i}.attn_q.weight", (N_EMBD, N_EMBD), matmul_type)
        add(f"blk.{i}.attn_k.weight", (kv, N_EMBD), matmul_type)
        add(f"blk.{i}.attn_v.weight", (kv, N_EMBD), matmul_type)
        add(f"blk.{i}.attn_output.weight", (N_EMBD, N_EMBD), matmul_type)
        add(f"blk.{i}.ffn_norm.weight", (N_EMBD,), Q.F32, scale=0.1, offset=1.0)
        add(f"blk.{i}.ffn_gate.weight", (N_FF, N_EMBD), matmul_type)
        add(f"blk.{i}.ffn_up.weight", (N_FF, N_EMBD), matmul_type)
        add(f"blk.{i}.ffn_down.weight", (N_EMBD, N_FF), matmul_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
