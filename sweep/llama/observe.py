"""The eval callback of a Backend: what is done with each graph node of a decode, and who asked for it.

llama.cpp calls the context's eval callback twice per graph node: with `ask` before it is scheduled (True: stop after
it and call back), then once it is computed, before anything downstream reads it. Callers register with context
managers that stack: any number are active at once, each is called for the nodes it asked for only, and leaving one
restores the state from before it was entered (blocks may even end out of order).
  * `observe_matmuls(observer)`: `observer.wants(MatMul without data)` is asked for each MUL_MAT / MUL_MAT_ID node,
    and `observer(MatMul)` (ggml_tensor.py) called with each wanted one once computed (sweep/imatrix/);
  * `observe_nodes(nodes, fn)`: `fn(name, data)` with a copy of each chosen node once computed, read-only; `nodes` is
    a collection of (name, occurrence) pairs (backend.NodeOccurrence), or a predicate on the name that takes every
    occurrence of the names it accepts (routing.py) -- a node that is not a contiguous F32 or I32 tensor is an error
    when named, skipped when a predicate chose it;
  * `replace_nodes(nodes, fn)`: `fn(name, data)` with the chosen (name, occurrence) nodes (contiguous F32 only),
    returning what the node holds from then on (None: unchanged) -- activation points (sweep/quant/apply.py);
  * `replacements_paused()`: the block decodes with no replacement (observers keep observing);
  * `reading_back()`: within the block, every replaced node is read back after the write (tests).
The order on one computed node is fixed:
  1. a quantized weight's delta is added (`weight_deltas`, weight_delta.py): part of what the node computes;
  2. matmul observers, then node observers, each kind in the order entered: they see the node as computed;
  3. replacements, in the order entered, each handed the previous one's result; the last one is written back once.
So an observer of a replaced node sees it as computed, and every node downstream sees the replacement.
With nothing registered, a node costs the callback its name, its occurrence count and two tests (it runs for every
node of every decode); what a node needs is decided once, when llama.cpp asks, and used when it is computed.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from llama_cpp._ggml import libggml

from ..errors import SweepError
from .ggml_tensor import GGML_TYPE_F32, GGML_TYPE_I32, MATMUL_OPS, GGMLTensor, TensorPtr, matmul_view
from .weight_delta import WeightDelta, add_delta, consumed_weight

NodeFn = Callable[[str, np.ndarray], "np.ndarray | None"]
Nodes = Collection[tuple[str, int]] | Callable[[str], bool]


def shape_of(t: GGMLTensor) -> tuple[int, ...]:
    ne = [int(n) for n in t.ne]
    while len(ne) > 1 and ne[-1] == 1:
        ne.pop()
    return tuple(reversed(ne))  # ggml ne (fastest first) -> numpy row-major shape


def read_f32(t_ptr, t: GGMLTensor, name: str) -> np.ndarray:
    if t.type != GGML_TYPE_F32 or not libggml.ggml_is_contiguous(t_ptr):
        raise SweepError(f"tensor {name!r} is not a contiguous F32 tensor (ggml type {t.type}); "
                         f"only F32 tensors can be fake-quantized in place")
    x = np.empty(shape_of(t), dtype=np.float32)
    libggml.ggml_backend_tensor_get(t_ptr, x.ctypes.data, 0, x.nbytes)
    return x


def write_f32(t_ptr, t: GGMLTensor, name: str, y: np.ndarray) -> None:
    y = np.ascontiguousarray(y, dtype=np.float32)
    if y.shape != shape_of(t):
        raise ValueError(f"shape {y.shape} written to {name!r} of shape {shape_of(t)}")
    libggml.ggml_backend_tensor_set(t_ptr, y.ctypes.data, 0, y.nbytes)


def _read_node(t_ptr, t: GGMLTensor) -> np.ndarray | None:
    """A contiguous F32 or I32 node's data (I32: MoE expert ids), or None for any other node."""
    if t.type not in (GGML_TYPE_F32, GGML_TYPE_I32) or not libggml.ggml_is_contiguous(t_ptr):
        return None
    x = np.empty(shape_of(t), dtype=np.int32 if t.type == GGML_TYPE_I32 else np.float32)
    libggml.ggml_backend_tensor_get(t_ptr, x.ctypes.data, 0, x.nbytes)
    return x


@dataclass(eq=False)  # compared by identity: leaving a block removes its own entry, whatever else is registered
class _Entry:
    kind: str  # "matmul" | "observe" | "replace"
    fn: Callable
    pairs: frozenset = frozenset()  # the (name, occurrence) nodes chosen
    wants: Callable[[str], bool] | None = None  # or a predicate on names (observe_nodes only)


class NodeHooks:
    """The eval callback and its registrations; Backend's base. The probe's collection of the graph is Backend's
    (`_collect`, `_collect_node`)."""

    _collect = False

    def _init_hooks(self) -> None:
        self._entries: list[_Entry] = []  # in the order entered
        self._replacing = True  # False inside replacements_paused()
        self._read_back: list | None = None  # reading_back()'s list
        self._seen: dict[str, int] = {}  # occurrences of each name so far in the current decode
        self._due = None  # what the node llama.cpp last asked about needs once computed
        self.hook_error: BaseException | None = None
        # Weight points on quantized tensors: (fmt(W) - W)·x added to every consumer's output (weight_delta.py)
        self.weight_deltas: dict[str, WeightDelta] = {}
        self._compile()

    # ---- registration ---------------------------------------------------------------------------------------

    def observe_matmuls(self, observer):
        """Within the block, `observer(MatMul)` for every matmul node `observer.wants(MatMul without data)`."""
        return self._entered(_Entry("matmul", observer))

    def observe_nodes(self, nodes: Nodes, fn: Callable[[str, np.ndarray], None]):
        """Within the block, `fn(name, data)` with each chosen node once computed; `fn` must not modify `data`."""
        return self._entered(_Entry("observe", fn, wants=nodes) if callable(nodes) else
                             _Entry("observe", fn, pairs=frozenset(nodes)))

    def replace_nodes(self, nodes: Collection[tuple[str, int]], fn: NodeFn):
        """Within the block, each chosen node holds `fn(name, data)` (None: unchanged) before anything reads it."""
        return self._entered(_Entry("replace", fn, pairs=frozenset(nodes)))

    @contextmanager
    def replacements_paused(self) -> Iterator[None]:
        before, self._replacing = self._replacing, False
        self._compile()
        try:
            yield
        finally:
            self._replacing = before
            self._compile()

    @contextmanager
    def reading_back(self) -> Iterator[list]:
        """Within the block, the list yielded gets (name, computed, written, read back) of every replaced node."""
        before, self._read_back = self._read_back, []
        try:
            yield self._read_back
        finally:
            self._read_back = before

    @contextmanager
    def _entered(self, entry: _Entry) -> Iterator[None]:
        self._entries.append(entry)
        self._compile()
        try:
            yield
        finally:
            self._entries.remove(entry)
            self._compile()

    def _compile(self) -> None:
        """The registrations as the callback reads them, rebuilt on each change (never during a decode)."""
        self._matmuls: tuple[Any, ...] = tuple(e.fn for e in self._entries if e.kind == "matmul")  # .wants(m), (m)
        self._observers = tuple(e for e in self._entries if e.kind == "observe")
        self._replacers = tuple(e for e in self._entries if e.kind == "replace") if self._replacing else ()
        self._pairs = frozenset().union(*(e.pairs for e in self._observers + self._replacers))
        self._by_name = tuple((e, e.wants) for e in self._observers if e.wants is not None)  # (entry, predicate)
        self._watching = bool(self._matmuls or self._pairs or self._by_name)

    # ---- the callback ---------------------------------------------------------------------------------------

    def _new_decode(self) -> None:
        self.hook_error, self._seen, self._due = None, {}, None

    def _raise_hook_error(self) -> None:
        """What a callback raised during the decode that just ended (it stopped the decode there)."""
        if self.hook_error is not None:
            raise self.hook_error

    def _on_eval(self, t_ptr, ask, user_data):
        t = ctypes.cast(t_ptr, TensorPtr).contents
        name = t.name.decode("utf-8", "replace")
        if ask:
            index = self._seen.get(name, 0)
            self._seen[name] = index + 1
            if self._collect:
                self._collect_node(t_ptr, t, name, index)
            try:
                self._due = self._due_on(t, name, index) if self._watching and (
                    self._by_name or (name, index) in self._pairs or (self._matmuls and t.op in MATMUL_OPS)) else None
            except BaseException as e:  # a `wants` failed: stop at this node (its computed call ends the decode)
                self.hook_error, self._due = e, None
                return True
            return self._due is not None or (bool(self.weight_deltas) and consumed_weight(t) in self.weight_deltas)
        if self.hook_error is not None:
            return False
        try:
            if self.weight_deltas and (used := consumed_weight(t)) in self.weight_deltas:
                add_delta(t_ptr, t, self.weight_deltas[used])
            if self._due is not None:
                self._run(t_ptr, t, name, *self._due)
        except BaseException as e:  # an exception cannot cross the C boundary: stop the decode, re-raise later
            self.hook_error = e
            return False
        return True

    def _collect_node(self, t_ptr, t: GGMLTensor, name: str, index: int) -> None:
        raise NotImplementedError

    def _due_on(self, t: GGMLTensor, name: str, index: int):
        """(matmul observers, node observers, replacements) of this node, or None when it needs none."""
        matmuls: tuple = ()
        observers: tuple = ()
        replacers: tuple = ()
        if self._matmuls and t.op in MATMUL_OPS:
            m = matmul_view(t, with_data=False)
            matmuls = tuple(o for o in self._matmuls if o.wants(m))
        node = (name, index)
        if node in self._pairs:  # named by some: every observer and replacement asked, in the order entered
            observers = tuple(e for e in self._observers if node in e.pairs or (e.wants is not None and e.wants(name)))
            replacers = tuple(e.fn for e in self._replacers if node in e.pairs)
        else:  # only the predicates can want it
            for e, wants in self._by_name:
                if wants(name):
                    observers += (e,)
        return (matmuls, observers, replacers) if matmuls or observers or replacers else None

    def _run(self, t_ptr, t: GGMLTensor, name: str, matmuls, observers, replacers) -> None:
        if matmuls:
            m = matmul_view(t)
            for observer in matmuls:
                observer(m)
        if not observers and not replacers:
            return
        x = _read_node(t_ptr, t)  # read once: every observer and the first replacement get this copy
        for e in observers:
            if x is not None:
                e.fn(name, x)
            elif e.wants is None:  # named, not picked by a predicate
                raise SweepError(f"node {name!r} is not a contiguous F32 or I32 tensor (ggml type {t.type}): it "
                                 f"cannot be observed")
        if not replacers:
            return
        if x is None or x.dtype != np.float32:
            read_f32(t_ptr, t, name)  # raises: not a contiguous F32 tensor
        y, written = x, False
        for fn in replacers:
            out = fn(name, y)
            if out is not None:
                y, written = out, True
        if written and y is not None:  # y is None only when nothing was written
            write_f32(t_ptr, t, name, y)
            if self._read_back is not None:
                self._read_back.append((name, x, y, read_f32(t_ptr, t, name)))
