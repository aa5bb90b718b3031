"""How far a format moves a weight, computed without decoding: the error the map's response law is read against.

For weight W (rows = outputs, columns = inputs) and its quantized copy Q, the output error of a matmul on inputs x is
(Q - W)·x; its expected energy over the text is sum_ij (Q - W)_ij^2 E[x_j^2] when the input channels are
uncorrelated -- the statistic llama.cpp's importance matrix holds (per input column, the mean of x_j^2). The
*weighted* relative error divides it by the same sum over W itself: a scale-free number per (tensor, format) that
the law compares across types. The *unweighted* one (every column weighted 1) is 10^(-SQNR/10), the point records'
`rel_mse` on a tensor whose every value changes: the check that a calibration point measured what the map thinks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..quant.ggml_types import fake_quant


@dataclass(frozen=True)
class WeightError:
    weighted: float  # sum (Q-W)^2 E[x^2] / sum W^2 E[x^2]
    unweighted: float  # sum (Q-W)^2 / sum W^2


def relative_errors(w: np.ndarray, q: np.ndarray, stat: np.ndarray | None) -> WeightError:
    """w, q: float32 of one shape, rows = last axis; stat: E[x^2] per column (n_cols,) or per matrix of a stack
    (n_mat, n_cols), or None (weighted = unweighted)."""
    d2 = np.square(q.astype(np.float64) - w)
    w2 = np.square(w.astype(np.float64))
    unweighted = float(d2.sum() / w2.sum())
    if stat is None:
        return WeightError(unweighted, unweighted)
    s = np.asarray(stat, np.float64)
    if w.ndim == 3 and s.ndim == 2:  # an expert stack: matrix m's inputs have their own statistic
        s = s[:, None, :]
    return WeightError(float((d2 * s).sum() / (w2 * s).sum()), unweighted)


def weight_errors(w: np.ndarray, fmts: dict, tensor: str, stat: np.ndarray | None,
                  threads: int | None = None) -> dict[str, WeightError]:
    """The error of `tensor` (float32 `w`) in each of `fmts` (label -> Format of a GGUF type), by ggml's own
    quantizer (with the format's importance matrix, as the exact point quantizes it)."""
    return {label: relative_errors(w, fake_quant(w, fmt, tensor, threads), stat) for label, fmt in fmts.items()}
