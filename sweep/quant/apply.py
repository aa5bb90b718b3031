"""How to apply a format to a target inside the loaded model, and the proof that it was applied.

Weights are rewritten in place and restored on exit (the model stays loaded for the next point); activations are
rounded during every decode by a node replacement (`Backend.replace_nodes`, sweep/llama/observe.py). Either way a
`Proof` counts what changed, so a perturbation that changed nothing is reported as a no-op instead of as
"insensitive".
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..llama.quantize import dequantized_weight, rows_reader
from ..llama.routing import tracking
from ..llama.weight_delta import WeightDelta
from .experts import layer_of, round_expert_rows, round_experts
from .formats import Format
from .ggml_types import Storage, storage
from .targets import Target

if TYPE_CHECKING:
    from ..llama.stage_view import Decoder

CHUNK = 1 << 18  # elements per pass over a weight (2 MB in float64): the temporaries stay small


@dataclass
class Proof:
    n_elements: int = 0  # elements the format was applied to (activations: summed over every hook call)
    n_changed: int = 0  # elements whose value changed
    sum_sq_err: float = 0.0
    sum_sq_ref: float = 0.0
    max_abs_err: float = 0.0
    n_overflow: int = 0  # finite inputs the format turned into inf/NaN
    hook_calls: int = 0  # weights: tensors written; activations: times the hook rounded a node
    # weights kept quantized (the native container): node outputs corrected by (fmt(W) - W)·x (llama/weight_delta.py)
    delta_calls: int = 0
    # weights: per tensor, what it occupies in the format (type actually used, fallback, bytes; ggml_formats.storage)
    storage: list[Storage] = field(default_factory=list)

    def add(self, before: np.ndarray, after: np.ndarray, call: bool = True) -> None:
        """Count one application (`call`; False: a part of one, counted by the caller)."""
        # in chunks: float64 copies of a whole 7B-model matrix (45M elements) would add ~2 GB to a point's peak;
        # each mask and array once per chunk (every pass over a weight is per point)
        b_all, a_all = before.ravel(), after.ravel()
        for start in range(0, b_all.size, CHUNK):
            b = b_all[start:start + CHUNK].astype(np.float64)
            a = a_all[start:start + CHUNK].astype(np.float64)
            finite_b, finite_a = np.isfinite(b), np.isfinite(a)
            same = (b == a) | (np.isnan(b) & np.isnan(a))
            both = finite_b & finite_a
            err = np.where(both, a - b, 0.0)
            ref = np.where(both, b, 0.0)
            self.n_elements += b.size
            self.n_changed += int(b.size - np.count_nonzero(same))
            self.sum_sq_err += float(err @ err)
            self.sum_sq_ref += float(ref @ ref)
            self.max_abs_err = max(self.max_abs_err, float(np.abs(err).max(initial=0.0)))
            self.n_overflow += int(np.count_nonzero(finite_b & ~finite_a))
        self.hook_calls += call

    @property
    def frac_changed(self) -> float:
        return self.n_changed / self.n_elements if self.n_elements else 0.0

    @property
    def rel_mse(self) -> float:
        return self.sum_sq_err / self.sum_sq_ref if self.sum_sq_ref else math.nan

    @property
    def sqnr_db(self) -> float:
        if self.sum_sq_err == 0:
            return math.inf
        return 10 * math.log10(self.sum_sq_ref / self.sum_sq_err) if self.sum_sq_ref else -math.inf

    def no_op_reason(self, target: Target, fmt: Format) -> str | None:
        """Why this perturbation changed nothing, or None when it did change something."""
        if self.hook_calls == 0:
            return f"the hook never ran on {', '.join(target.names)}"
        if self.n_changed == 0:
            return (f"all {self.n_elements} elements of {target.kind} {target.tensor} "
                    f"(layer {target.layer_label}) are already exactly representable in {fmt.label}")
        return None

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(frac_changed=self.frac_changed, rel_mse=self.rel_mse, sqnr_db=self.sqnr_db)
        return d


@contextmanager
def applied(backend: Decoder, target: Target, fmt: Format, orig_types: dict[str, str] | None = None) -> Iterator[Proof]:
    """Within the block, `backend` computes with `fmt` applied to `target`; afterwards it is as before.
    `orig_types`: the weights' types in the user's file (GGUF names), for the storage figures of the proof."""
    if target.kind == "weight":
        with _weights_applied(backend, target, fmt, orig_types or {}) as proof:
            yield proof
    else:
        with _activations_applied(backend, target, fmt) as proof:
            yield proof


@contextmanager
def _weights_applied(backend: Decoder, target: Target, fmt: Format, orig_types: dict[str, str]) -> Iterator[Proof]:
    """F32 weights are rewritten in place; quantized ones (the native container) stay as the file stores them and
    the backend adds (fmt(W) - W)·x to every node that uses them (sweep/llama/weight_delta.py)."""
    proof = Proof()
    originals: dict[str, np.ndarray] = {}  # the F32 weights rewritten in place, as they were

    def counted() -> None:
        proof.delta_calls += 1

    try:
        for name in target.names:
            in_place = backend.holds_f32(name)
            own = fmt.for_tensor(name)  # a recipe gives each tensor its own format
            type_id, shape = backend.weight_layout(name)
            if not target.experts and len(shape) <= 2 and own.row_local:
                # row chunk by row chunk: a 7B model's matrix never has its format's temporaries whole
                original = backend.read_weight(name) if in_place else None
                read = (lambda a, b, w=original, n=shape[-1]: w.reshape(-1, n)[a:b]) if in_place else \
                    rows_reader(backend, name)
                rounded = rounded_by_rows(read, shape, own, name, backend.n_threads, proof, delta=not in_place)
                proof.storage.append(storage(own, name, shape, orig_types.get(name)))
            else:  # a whole stack (MoE) or a format with one scale for the tensor
                original = backend.read_weight(name) if in_place else dequantized_weight(backend, name)
                picked = list(target.experts) if target.experts else slice(None)
                rounded = round_experts(original, target.experts, own, name, backend.n_threads) \
                    if target.experts else own(original, tensor=name, threads=backend.n_threads)
                proof.add(original[picked], rounded[picked])  # MoE: the proof counts the targeted slices only
                proof.storage.append(storage(own, name, original[picked].shape, orig_types.get(name)))
                if not in_place:
                    rounded -= original  # the delta, in place: one more tensor-sized buffer at most
            if in_place:
                assert original is not None  # read above, whenever in_place
                originals[name] = original
                backend.write_weight(name, rounded)
            else:
                backend.weight_deltas[name] = \
                    WeightDelta(experts={k: rounded[k].copy() for k in target.experts}, on_call=counted) \
                    if target.experts else WeightDelta(rounded, on_call=counted)
            del original, rounded
        yield proof
    finally:  # restore exactly, so the loaded model serves the next point unchanged
        for name in target.names:
            backend.weight_deltas.pop(name, None)
        for name, original in originals.items():
            backend.write_weight(name, original)


def rounded_by_rows(read, shape: tuple[int, ...], own: Format, name: str, threads: int, proof: Proof,
                    delta: bool) -> np.ndarray:
    """fmt(W) (or fmt(W) - W when `delta`) of a 2-D weight, computed a chunk of rows at a time (`read(a, b)`: rows
    a..b-1 as float32); the same values as on the whole tensor for a format whose scales never span two rows."""
    n = shape[-1] if shape else 1
    n_rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    out = np.empty((n_rows, n), dtype=np.float32)
    step = max(1, CHUNK // n)
    for a in range(0, n_rows, step):
        b = min(n_rows, a + step)
        before = read(a, b)
        after = own(before, tensor=name, threads=threads)
        proof.add(before, after, call=False)
        out[a:b] = after - before if delta else after
    proof.hook_calls += 1
    return out.reshape(shape)


@contextmanager
def _activations_applied(backend, target: Target, fmt: Format) -> Iterator[Proof]:
    proof = Proof()
    with ExitStack() as stack:
        # experts: the rows routed to them, from each decode's routing, read by a tracker of the point's own (beside
        # any other: trackers stack, sweep/llama/routing.py) that keeps only the decode in progress
        router = stack.enter_context(tracking(backend, 0, counting=False)) if target.experts else None

        def rounded(name: str, x: np.ndarray) -> np.ndarray:
            if router is not None:
                ids = router.current[layer_of(name)][:, :x.shape[1]]  # the selected experts
                y, touched = round_expert_rows(x, ids, target.experts, fmt)
                proof.add(x[touched], y[touched])
                return y
            # Rows are tokens on every node: a 3-D node (tokens x heads x head size) is rounded as tokens x
            # features, so per_token means the same on Qcur as on l_out (never per token and head).
            rows = x.reshape(x.shape[0], -1) if x.ndim > 2 and target.token_rows else x
            y = fmt(rows).reshape(x.shape)
            proof.add(x, y)
            return y

        stack.enter_context(backend.replace_nodes(target.nodes, rounded))
        yield proof


# ---- metrics.baseline_logits=recompute: the baseline window is decoded alongside each perturbed one -------------

class Unperturbed:
    """Inside `applied(...)`, `with switch():` runs its block with the perturbation off, and on again after it.

    Weights: F32 originals (read before `applied`) are written for the block and the rounded values (read once,
    at the first switch) after it, both exact copies; quantized weights' deltas are detached for the block.
    Activations: the backend's node replacements are paused for the block (its observers go on), so the point
    neither rounds nor counts there (the proof counts the perturbed decodes only, as in the stored mode).
    """

    def __init__(self, backend: Decoder, target: Target, originals: dict[str, np.ndarray]):
        self.backend, self.target, self.originals = backend, target, originals
        self._perturbed: dict[str, np.ndarray] | None = None

    @contextmanager
    def __call__(self) -> Iterator[None]:
        b = self.backend
        if self.target.kind != "weight":
            with b.replacements_paused():
                yield
            return
        # quantized weights: their deltas are detached for the block; F32 ones are written back and forth
        deltas = {n: b.weight_deltas.pop(n) for n in self.target.names if n in b.weight_deltas}
        if self._perturbed is None:
            self._perturbed = {name: b.read_weight(name) for name in self.originals}
        for name, original in self.originals.items():
            b.write_weight(name, original)
        try:
            yield
        finally:
            for name, rounded in self._perturbed.items():
                b.write_weight(name, rounded)
            b.weight_deltas.update(deltas)
