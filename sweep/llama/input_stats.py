"""Input statistics of every matrix multiplication, as llama-imatrix collects them: per weight, the sum over tokens
of the squared input activations per column, and the number of tokens (sweep/imatrix/compute.py gives the rules and
writes the file; the map, sweep/estimate/, weighs weight errors with them)."""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from ..errors import SweepError
from .backend import Backend
from .ggml_tensor import GGML_OP_MUL_MAT_ID, MatMul
from .gguf_names import block_of


class Collector:
    """llama-imatrix's IMatrixCollector::collect_imatrix, as a backend matmul observer."""

    def __init__(self, process_output: bool = False):
        self.process_output = process_output
        self.sums: dict[str, np.ndarray] = {}  # float32 (n_mat, n_cols)
        self.counts: dict[str, np.ndarray] = {}  # int64 (n_mat,)

    def wants(self, m: MatMul) -> bool:
        if m.op == GGML_OP_MUL_MAT_ID:
            return True
        if not m.x_is_f32 or m.x_ne[1] < 16:  # llama-imatrix ignores small batches and non-F32 inputs
            return False
        return block_of(m.weight) is not None or (self.process_output and m.weight == "output.weight")

    def __call__(self, m: MatMul) -> None:
        if m.x is None:
            raise SweepError(f"{m.weight}: input activations are not F32")
        ne0 = m.x_ne[0]
        if m.op == GGML_OP_MUL_MAT_ID:
            if m.ids is None:
                raise SweepError(f"{m.weight}: the expert ids were not read")
            n_as = m.weight_ne[2]
            sums, counts = self._entry(m.weight, n_as, ne0, per_expert=True)
            n_tokens, n_ids = m.ids.shape
            for idx in range(n_ids):  # llama-imatrix's order: expert slot, then token
                for row in range(n_tokens):
                    ex = int(m.ids[row, idx])
                    x = m.x[0, row, idx % m.x_ne[1]]
                    sums[ex] += x * x
                    counts[ex] += 1
        else:
            n_mat = m.weight_ne[2] * m.weight_ne[3]
            sums, counts = self._entry(m.weight, n_mat, ne0, per_expert=False)
            for i3 in range(m.x_ne[3]):
                for i2 in range(m.x_ne[2]):
                    mat = (i3 % m.weight_ne[3]) * m.weight_ne[2] + (i2 % m.weight_ne[2])
                    x = m.x[i3, i2]
                    # add.accumulate is strictly sequential: acc, acc + x0², (acc + x0²) + x1², ... in float32
                    sums[mat] = np.add.accumulate(np.vstack([sums[mat][None], x * x]), axis=0)[-1]
            counts += m.x.size // ne0 // n_mat
        if not np.isfinite(sums).all():
            raise SweepError(f"non-finite activations in {m.weight}")

    def _entry(self, name: str, n_mat: int, ne0: int, per_expert: bool) -> tuple[np.ndarray, np.ndarray]:
        if name not in self.sums:
            self.sums[name] = np.zeros((n_mat, ne0), dtype=np.float32)
            self.counts[name] = np.zeros(n_mat if per_expert else 1, dtype=np.int64)
        if self.sums[name].shape != (n_mat, ne0):
            raise SweepError(f"inconsistent sizes for {name}: {self.sums[name].shape} vs {(n_mat, ne0)}")
        return self.sums[name], self.counts[name]


def collect(backend: Backend, windows: np.ndarray, process_output: bool = False, progress: bool = True) -> Collector:
    """Decode every window with all logits requested, collecting llama-imatrix's statistic."""
    col = Collector(process_output)
    with backend.observe_matmuls(col):
        everything = np.ones(windows.shape[1], dtype=np.int8)
        for w in tqdm(windows, desc="imatrix", unit="window", disable=not progress):
            backend.decode_window(w, everything)
    return col
