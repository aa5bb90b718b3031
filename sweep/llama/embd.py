"""A Backend that can also decode a window from input embeddings (float rows instead of tokens).

llama.cpp takes a batch of `embd` floats per position (`llama_batch_init(n, n_embd, 1)`) as the first block's
input; for llama, qwen2 and gemma3 the token path's own operations (the embedding lookup, gemma3's sqrt(n_embd)
scale) are skipped for such a batch, so a stage file (sweep/llama/stage_file.py) fed the full model's residual
stream continues the full model's computation. Same context, K/V cache, flash attention and threads as a token
decode: only the batch differs.
"""

from __future__ import annotations

from pathlib import Path

import llama_cpp
import numpy as np

from .backend import Backend, ComputeSettings


class EmbeddingBackend(Backend):
    def __init__(self, path: Path, n_ctx: int, n_threads: int, *, settings: ComputeSettings,
                 writable_weights: bool = False):
        super().__init__(path, n_ctx, n_threads, settings=settings, writable_weights=writable_weights)
        self.n_embd = llama_cpp.llama_model_n_embd(self.model)
        self._embd_batch = b = llama_cpp.llama_batch_init(n_ctx, self.n_embd, 1)
        self._e_rows = np.ctypeslib.as_array(b.embd, shape=(n_ctx, self.n_embd))
        self._e_logits = np.ctypeslib.as_array(b.logits, shape=(n_ctx,))
        np.ctypeslib.as_array(b.pos, shape=(n_ctx,))[:] = np.arange(n_ctx, dtype=np.int32)
        np.ctypeslib.as_array(b.n_seq_id, shape=(n_ctx,))[:] = 1
        for k in range(n_ctx):
            b.seq_id[k][0] = 0

    def decode_rows(self, rows: np.ndarray, output_mask: np.ndarray) -> np.ndarray:
        """Decode the float rows (n, n_embd) as one fresh sequence at positions 0..n-1; return the logits of the
        positions where `output_mask` is set (as `decode_window` does for tokens)."""
        self._check_open()
        n = len(rows)
        if n > self.n_ctx or rows.shape[1:] != (self.n_embd,):
            raise ValueError(f"rows of shape {rows.shape} do not fit a context of {self.n_ctx} x {self.n_embd}")
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
        self._e_rows[:n] = rows
        self._e_logits[:n] = output_mask[:n]
        self._embd_batch.n_tokens = n
        tokens, self._batch = self._batch, self._embd_batch  # _decode decodes self._batch
        self.output_mask = output_mask[:n]
        try:
            self._decode()
        finally:
            self._batch, self.output_mask = tokens, None
        n_out = int(np.count_nonzero(output_mask[:n]))
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits(self.ctx), shape=(n_out, self.n_vocab))

    def close(self) -> None:
        if getattr(self, "ctx", None) and getattr(self, "_embd_batch", None) is not None:
            llama_cpp.llama_batch_free(self._embd_batch)
            self._embd_batch = None
        super().close()
