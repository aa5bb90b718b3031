"""llama.cpp's tokenizer on a text (a loaded model's, or a file's vocabulary alone: backend.tokens_of)."""

from __future__ import annotations

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
