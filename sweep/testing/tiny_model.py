"""Tiny random-weight GGUFs, written with gguf's writer, with SmolLM2's tokenizer metadata.

Small enough to decode a 64-token window in milliseconds, real enough for llama.cpp to load and run. Three
architectures, so that no name or shape assumption of one graph hides in the code:

* `llama`: the same architecture and tensor layout as SmolLM2 (tied embeddings, Q4_1 matmuls unless `matmul_type`
  says otherwise, a Q8_0 token embedding, F32 norms);
* `gemma3`: Gemma 3's block (vendored llama.cpp, src/models/gemma3.cpp): per-head Q/K norms, norms after attention
  and after the FFN (`post_attention_norm`, `post_ffw_norm`), a head size (key_length) that is not n_embd / n_head,
  so Q/K/V are not square, a sliding window on some layers (an explicit per-layer pattern) and a final logit
  soft-cap;
* `qwen2`: Qwen 2's block (src/models/qwen2.cpp): F32 biases on Q, K and V, and an untied `output.weight`;
* `qwen3moe`: Qwen 3's Mixture-of-Experts block (src/models/qwen3moe.cpp): per-head Q/K norms, an F32 router
  `ffn_gate_inp` and 3-D expert stacks `ffn_{gate,up,down}_exps` (N_EXPERT experts, N_EXPERT_USED per token);
* `qwen2moe`: Qwen 2's MoE block (src/models/qwen2moe.cpp): the same expert stacks plus a shared expert
  (`ffn_{gate,up,down}_shexp`) gated by a 1-D `ffn_gate_inp_shexp`, and Q/K/V biases.

In both MoE models expert NEVER_ROUTED is never selected, by construction: its router row is zero (logit 0 for
every token), and the other experts come in pairs whose router rows are opposite (logits a and -a), so each pair
has an expert with a positive logit and the top N_EXPERT_USED = number of pairs always beat the zero.

Only the architecture's own keys and tensors differ; the tokenizer is SmolLM2's (llama.cpp does not tie the
tokenizer to the architecture).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import quantize

N_EMBD, N_FF, N_HEAD, N_HEAD_KV, N_LAYERS, N_CTX_TRAIN = 64, 128, 4, 2, 3, 256
ARCHITECTURES = ("llama", "gemma3", "qwen2", "qwen3moe", "qwen2moe")
MOE_ARCHITECTURES = ("qwen3moe", "qwen2moe")
N_EXPERT, N_EXPERT_USED, N_FF_EXP = 5, 2, 64  # 2 pairs of opposite router rows + the never-routed expert
NEVER_ROUTED = 4
GEMMA3_HEAD_DIM = 32  # != N_EMBD // N_HEAD (16): Q is (N_HEAD * 32) x N_EMBD, as in the real Gemma 3 (head 256)
GEMMA3_SLIDING_WINDOW = 16  # tokens; smaller than the tests' 64-token windows, so the mask matters
GEMMA3_SWA_PATTERN = [True, False, True]  # layer 1 attends to the whole window, layers 0 and 2 to 16 tokens
Q = GGMLQuantizationType


def write_tiny_model(path: Path, tokenizer_source: Path, seed: int = 0, add_bos: bool | None = None,
                     matmul_type: Q = Q.Q4_1, embd_type: Q = Q.Q8_0, arch: str = "llama",
                     n_vocab: int | None = None, n_embd: int = N_EMBD, n_ff: int | None = None,
                     n_ctx_train: int = N_CTX_TRAIN, n_layers: int = N_LAYERS, n_head: int = N_HEAD,
                     n_head_kv: int = N_HEAD_KV, head_dim: int | None = None,
                     sliding_window: int = GEMMA3_SLIDING_WINDOW, swa_pattern: list[bool] | None | str = "gemma3"
                     ) -> Path:
    """matmul_type, embd_type: the block matmuls' and the token embedding's types (Q4_0 is what x86 CPUs repack;
    all F32 with rows of 256 suits the 256-blocks of the K-quants); arch: one of ARCHITECTURES; n_vocab: pad the
    tokenizer with unique unused tokens up to this size (a large-vocabulary model for the benchmarks: SmolLM2's
    49,152 tokens + padding = 262,144 like Gemma 3); n_embd, n_ff: widths of the blocks (n_ff: 2 * n_embd);
    n_layers, n_head, n_head_kv, head_dim (default n_embd / n_head; gemma3: GEMMA3_HEAD_DIM), sliding_window
    (gemma3): a real model's shape, for the benchmarks (bench/perf/vocab.py's Gemma-3-270M shape). swa_pattern: gemma3's
    per-layer sliding-window flags; "gemma3" (default): GEMMA3_SWA_PATTERN for 3 blocks, else Gemma 3's own (every 6th
    block global); None: no array in the file, so llama.cpp's built-in pattern applies (five sliding, one global)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; tiny models exist for {', '.join(ARCHITECTURES)}")
    n_ff = n_ff or 2 * n_embd
    reader = GGUFReader(tokenizer_source)
    writer = GGUFWriter(path, arch)
    writer.add_name(f"sweep-tiny-test-{arch}")
    writer.add_context_length(n_ctx_train)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_layer_norm_rms_eps(1e-6 if arch == "gemma3" else 1e-5)
    writer.add_rope_freq_base(10000.0)
    head_dim = head_dim or (GEMMA3_HEAD_DIM if arch == "gemma3" else n_embd // n_head)
    if arch == "gemma3":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_sliding_window(sliding_window)
        # llama.cpp reads a per-layer array of this key before falling back to its built-in "every 6th" pattern
        pattern = swa_pattern if swa_pattern != "gemma3" else \
            GEMMA3_SWA_PATTERN if n_layers == N_LAYERS else [(i + 1) % 6 != 0 for i in range(n_layers)]
        if pattern is not None:
            writer.add_array(f"{arch}.attention.sliding_window_pattern", pattern)
        writer.add_rope_freq_base_swa(10000.0)
        writer.add_final_logit_softcapping(30.0)
    else:
        writer.add_rope_dimension_count(head_dim)
    if arch in MOE_ARCHITECTURES:
        writer.add_expert_count(N_EXPERT)
        writer.add_expert_used_count(N_EXPERT_USED)
        writer.add_expert_feed_forward_length(N_FF_EXP)
        if arch == "qwen2moe":
            writer.add_expert_shared_feed_forward_length(n_ff)
    n_source = len(reader.fields["tokenizer.ggml.tokens"].data)
    n_vocab = n_vocab or n_source
    if n_vocab < n_source:
        raise ValueError(f"n_vocab={n_vocab} is smaller than the tokenizer's {n_source} tokens")
    padding: dict[str, list[str | int | float]] = {
        "tokenizer.ggml.tokens": [f"<sweep_pad_{i}>" for i in range(n_vocab - n_source)],
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

    def norm(name: str, n: int = n_embd):
        add(name, (n,), Q.F32, scale=0.1, offset=1.0)

    add("token_embd.weight", (n_vocab, n_embd), embd_type, scale=0.05)
    norm("output_norm.weight")
    if arch in ("qwen2", "qwen2moe"):
        add("output.weight", (n_vocab, n_embd), embd_type, scale=0.05)  # untied: a global weight besides token_embd
    q_dim, kv_dim = head_dim * n_head, head_dim * n_head_kv  # numpy shapes are (out, in)
    for i in range(n_layers):
        norm(f"blk.{i}.attn_norm.weight")
        add(f"blk.{i}.attn_q.weight", (q_dim, n_embd), matmul_type)
        add(f"blk.{i}.attn_k.weight", (kv_dim, n_embd), matmul_type)
        add(f"blk.{i}.attn_v.weight", (kv_dim, n_embd), matmul_type)
        if arch in ("qwen2", "qwen2moe"):
            add(f"blk.{i}.attn_q.bias", (q_dim,), Q.F32, scale=0.5)
            add(f"blk.{i}.attn_k.bias", (kv_dim,), Q.F32, scale=0.5)
            add(f"blk.{i}.attn_v.bias", (kv_dim,), Q.F32, scale=0.5)
        if arch in ("gemma3", "qwen3moe"):
            norm(f"blk.{i}.attn_q_norm.weight", head_dim)
            norm(f"blk.{i}.attn_k_norm.weight", head_dim)
        add(f"blk.{i}.attn_output.weight", (n_embd, q_dim), matmul_type)
        if arch == "gemma3":
            norm(f"blk.{i}.post_attention_norm.weight")
        norm(f"blk.{i}.ffn_norm.weight")
        if arch in MOE_ARCHITECTURES:
            writer.add_tensor(f"blk.{i}.ffn_gate_inp.weight", router_rows(rng, n_embd))  # F32, as llama.cpp keeps it
            add(f"blk.{i}.ffn_gate_exps.weight", (N_EXPERT, N_FF_EXP, n_embd), matmul_type)
            add(f"blk.{i}.ffn_up_exps.weight", (N_EXPERT, N_FF_EXP, n_embd), matmul_type)
            add(f"blk.{i}.ffn_down_exps.weight", (N_EXPERT, n_embd, N_FF_EXP), matmul_type)
            if arch == "qwen2moe":
                add(f"blk.{i}.ffn_gate_inp_shexp.weight", (n_embd,), Q.F32)
                add(f"blk.{i}.ffn_gate_shexp.weight", (n_ff, n_embd), matmul_type)
                add(f"blk.{i}.ffn_up_shexp.weight", (n_ff, n_embd), matmul_type)
                add(f"blk.{i}.ffn_down_shexp.weight", (n_embd, n_ff), matmul_type)
        else:
            add(f"blk.{i}.ffn_gate.weight", (n_ff, n_embd), matmul_type)
            add(f"blk.{i}.ffn_up.weight", (n_ff, n_embd), matmul_type)
            add(f"blk.{i}.ffn_down.weight", (n_embd, n_ff), matmul_type)
        if arch == "gemma3":
            norm(f"blk.{i}.post_ffw_norm.weight")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def router_rows(rng: np.random.Generator, n_embd: int) -> np.ndarray:
    """The router (N_EXPERT x n_embd): pairs of opposite rows, and a zero row for NEVER_ROUTED (module docstring)."""
    pairs = rng.standard_normal((N_EXPERT // 2, n_embd)).astype(np.float32)
    rows = np.concatenate([pairs, -pairs])  # expert k and k + N_EXPERT // 2 are opposite
    rows = np.insert(rows, NEVER_ROUTED, 0.0, axis=0)
    assert rows.shape == (N_EXPERT, n_embd) and N_EXPERT_USED == N_EXPERT // 2
    return rows
