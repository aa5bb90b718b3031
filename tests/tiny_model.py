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
                     matmul_type: Q = Q.Q4_1, embd_type: Q = Q.Q8_0, n_vocab: int | None = None,
                     n_embd: int = N_EMBD, n_ff: int | None = None, n_ctx_train: int = N_CTX_TRAIN) -> Path:
    """matmul_type, embd_type: the block matmuls' and the token embedding's types (Q4_0 is what x86 CPUs repack;
    all F32 with rows of 256 suits the 256-blocks of the K-quants); n_vocab: pad the tokenizer with unique unused
    tokens up to this size (a large-vocabulary model for the benchmarks: SmolLM2's 49,152 tokens + padding =
    262,144 like Gemma 3); n_embd, n_ff: widths of the blocks (n_ff defaults to 2 * n_embd)."""
    n_ff = n_ff or 2 * n_embd
    reader = GGUFReader(tokenizer_source)
    writer = GGUFWriter(path, "llama")
    writer.add_name("sweep-tiny-test")
    writer.add_context_length(n_ctx_train)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(N_LAYERS)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    writer.add_rope_dimension_count(n_embd // N_HEAD)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    n_source = len(reader.fields["tokenizer.ggml.tokens"].data)
    n_vocab = n_vocab or n_source
    if n_vocab < n_source:
        raise ValueError(f"n_vocab={n_vocab} is smaller than the tokenizer's {n_source} tokens")
    padding = {"tokenizer.ggml.tokens": [f"<sweep_pad_{i}>" for i in range(n_vocab - n_source)],
               "tokenizer.ggml.token_type": [4] * (n_vocab - n_source),  # user-defined: never produced by BPE
               "tokenizer.ggml.scores": [0.0] * (n_vocab - n_source)}
    for field in reader.fields.values():
        if not field.name.startswith("tokenizer."):
            continue
        if add_bos is not None and field.name == "tokenizer.ggml.add_bos_token":
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        value = field.contents()
        if field.name in padding and n_vocab > n_source:
            value = list(value) + padding[field.name]
        writer.add_key_value(field.name, value, vtype, sub_type=sub)
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)

    rng = np.random.default_rng(seed)

    def add(name: str, shape: tuple[int, ...], qtype: Q, scale: float = 0.08, offset: float = 0.0):
        data = (offset + scale * rng.standard_normal(shape)).astype(np.float32)
        if qtype == Q.F32:
            writer.add_tensor(name, data)
        else:
            writer.add_tensor(name, quantize(data, qtype), raw_dtype=qtype)

    add("token_embd.weight", (n_vocab, n_embd), embd_type, scale=0.05)
    add("output_norm.weight", (n_embd,), Q.F32, scale=0.1, offset=1.0)
    kv = n_embd // N_HEAD * N_HEAD_KV
    for i in range(N_LAYERS):
        add(f"blk.{i}.attn_norm.weight", (n_embd,), Q.F32, scale=0.1, offset=1.0)
        add(f"blk.{i}.attn_q.weight", (n_embd, n_embd), matmul_type)
        add(f"blk.{i}.attn_k.weight", (kv, n_embd), matmul_type)
        add(f"blk.{i}.attn_v.weight", (kv, n_embd), matmul_type)
        add(f"blk.{i}.attn_output.weight", (n_embd, n_embd), matmul_type)
        add(f"blk.{i}.ffn_norm.weight", (n_embd,), Q.F32, scale=0.1, offset=1.0)
        add(f"blk.{i}.ffn_gate.weight", (n_ff, n_embd), matmul_type)
        add(f"blk.{i}.ffn_up.weight", (n_ff, n_embd), matmul_type)
        add(f"blk.{i}.ffn_down.weight", (n_embd, n_ff), matmul_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
