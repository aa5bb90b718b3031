"""A model's tokenizer alone: llama.cpp loads the file's vocabulary and metadata without its weights
(`vocab_only`), so the checks before a sweep tokenize the text without holding a model-sized copy."""

from __future__ import annotations

from pathlib import Path

import llama_cpp
import numpy as np

from ..errors import SweepError


def tokenize(vocab, text: str, add_special: bool = True) -> np.ndarray:
    """`text` as llama.cpp's tokenizer `vocab` cuts it (with BOS where the vocabulary asks for it)."""
    data = text.encode("utf-8")
    n_max = len(data) + 16
    buf = (llama_cpp.llama_token * n_max)()
    n = llama_cpp.llama_tokenize(vocab, data, len(data), buf, n_max, add_special, False)
    if n < 0:
        raise SweepError(f"tokenizer needed {-n} slots for {len(data)} bytes of text")
    return np.ctypeslib.as_array(buf)[:n].astype(np.int32)


def tokens_of(path: Path, text: str) -> np.ndarray:
    """The text tokenized by the model file at `path`, its weights never loaded."""
    from .backend import _init_once, _recent_errors

    _init_once()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    _recent_errors.clear()
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        why = _recent_errors[-1] if _recent_errors else "unknown reason"
        raise SweepError(f"llama.cpp cannot load {path}: {why} (unsupported architecture or damaged file?)")
    try:
        return tokenize(llama_cpp.llama_model_get_vocab(model), text)
    finally:
        llama_cpp.llama_model_free(model)
