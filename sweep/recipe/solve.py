"""The recipe: one GGUF type per tensor, minimizing the sum of measured damages under a byte budget.

An exact solver (scipy.optimize.milp, HiGHS): binary x[g, t] = "group g takes candidate type t", one type per group
(sum_t x[g, t] = 1), sum of bytes <= budget, minimize sum of damages. A group is one tensor, or the tensors that
must share a type (`--group REGEX`: the matching tensors of each block share one type). Tensors the tables do not
cover keep a stated default type (or their source type), and their bytes count against the budget too.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

from ..errors import SweepError
from ..llama.gguf_names import block_of
from ..quant.ggml_types import needs_imatrix
from .sizes import SourceModel, padded
from .table import Table, check_complete


@dataclass
class Choice:
    tensor: str
    type_asked: str | None  # the candidate chosen (None: not covered by the tables, default applied)
    type_stored: str  # what llama.cpp stores (row fallback applied); what recipe.txt names
    bytes: int
    damage: float  # predicted (measured alone); NaN for tensors the tables do not cover
    stderr: float
    group: str | None = None
    windows: np.ndarray | None = None  # the damage's per-window means (a joint point pairs its residual with them)


@dataclass
class Recipe:
    choices: list[Choice]
    budget: int  # bytes (file bytes for --size, tensor bytes for --bpw)
    budget_kind: str  # "file" | "tensors"
    predicted_file_bytes: int
    tensor_bytes: int
    n_elements: int
    damage: float  # sum over covered tensors
    damage_stderr: float  # window-blocked over the per-window sums (tensors measured on the same windows)
    windows: np.ndarray | None = None  # per-window predicted damage (sum over chosen tensors)
    solver: dict = field(default_factory=dict)

    @property
    def bpw(self) -> float:
        return 8 * self.tensor_bytes / self.n_elements

    def types(self) -> dict[str, str]:
        return {c.tensor: c.type_stored for c in self.choices}


def solve_groups(costs: np.ndarray, weights: np.ndarray, capacity: float,
                 time_limit: float = 120.0) -> tuple[np.ndarray, dict]:
    """Multiple-choice knapsack, exactly: costs/weights (G, T) with +inf cost = not allowed; returns the chosen
    column of each row. Raises SweepError when even the lightest allowed choices exceed `capacity`."""
    from scipy.optimize import Bounds, LinearConstraint, milp  # deferred: scipy.optimize loads slowly, only to solve

    g, t = costs.shape
    allowed = np.isfinite(costs)
    if not allowed.any(axis=1).all():
        raise SweepError("a group has no allowed candidate type (every one diverged or is missing)")
    lightest = np.where(allowed, weights, np.inf).min(axis=1).sum()
    if lightest > capacity:
        raise SweepError(f"infeasible budget: even the smallest candidate types need {lightest:.0f} bytes more "
                         f"than the {capacity:.0f} bytes left")
    # scale for the solver: damages to O(1), bytes to O(1); HiGHS's default gaps are relative (1e-4): exact enough
    # is not enough here, so the gap is zero
    c_scale = max(float(np.abs(costs[allowed]).max()), 1e-30)
    w_scale = max(float(weights.max()), 1.0)
    c = np.where(allowed, costs / c_scale, 0.0).ravel()
    one_each = np.zeros((g, g * t))
    for i in range(g):
        one_each[i, i * t:(i + 1) * t] = 1
    budget_row = (weights / w_scale).reshape(1, -1)
    res = milp(c, integrality=np.ones(g * t), bounds=Bounds(0, allowed.ravel().astype(float)),
               constraints=[LinearConstraint(one_each, 1, 1),
                            LinearConstraint(budget_row, -np.inf, capacity / w_scale)],
               options={"time_limit": time_limit, "mip_rel_gap": 0.0})
    if res.x is None:
        raise SweepError(f"the solver found no recipe ({res.message})")
    x = res.x.reshape(g, t)
    pick = x.argmax(axis=1)
    # the constraint holds on the scaled bytes up to HiGHS's feasibility tolerance: check the integer bytes
    used = float(weights[np.arange(g), pick].sum())
    if used > capacity:
        raise SweepError(f"the solver's recipe exceeds the budget by {used - capacity:.0f} bytes (tolerance): "
                         f"lower the budget by that much")
    return pick, {"status": int(res.status), "message": str(res.message), "optimal": res.status == 0,
                  "objective": float(res.fun * c_scale)}


def default_for(name: str, default_type: str | list[str]) -> str:
    """The default type of a tensor the tables do not cover: the first 'REGEX=TYPE' whose regex is found in its
    name, else the plain TYPE entry (e.g. ['token_embd=q8_0', 'q4_K']; q8_0 when none); 'keep' = the source's type."""
    entries = [default_type] if isinstance(default_type, str) else list(default_type)
    plain = "q8_0"
    for e in entries:
        rx, sep, ty = e.rpartition("=")
        if not sep:
            plain = e
        elif re.search(rx, name):
            return ty
    return plain


def group_key(name: str, patterns: list[str]) -> str:
    """The group a tensor belongs to: the first --group pattern it matches, per block; else itself."""
    for p in patterns:
        if re.search(p, name):
            block = block_of(name)
            return f"{p}@{'-' if block is None else block}"
    return name


def measured_key(source: SourceModel, name: str, type_asked: str) -> tuple[str, str]:
    """The table's key for a tensor asked in a type: the type llama.cpp stores it in."""
    return name, source.tensor(name).stored_as(type_asked).name


def unbuildable(table: Table, source: SourceModel, name: str, type_asked: str) -> bool:
    """A candidate llama.cpp cannot build for this tensor and no point measured: a type ggml quantizes only with
    importance data (iq2_xxs, iq2_xs, ...) where there is none: tables measured without an importance matrix, or the
    token embedding and output, which imatrix files never hold (llama-quant exempts them from its own check; ggml's
    quantizer still needs the data). Never a candidate, so never a missing measurement."""
    key = measured_key(source, name, type_asked)
    if key in table.rows or key in table.diverged:
        return False
    outside = name.startswith(("token_embd.", "output."))
    return needs_imatrix(key[1], None if not outside else name) and (not table.imatrix or outside)


def missing_measurements(table: Table, source: SourceModel, types: list[str]) -> list[tuple[str, str]]:
    """(tensor, type asked) pairs of covered tensors that no point measured (in that type or its stored type)."""
    out = []
    for t in sorted(table.tensors):
        seen = set()
        for ty in types:
            key = measured_key(source, t, ty)
            if unbuildable(table, source, t, ty):
                continue
            if key not in table.rows and key not in table.diverged and key not in seen:
                out.append((t, ty))  # one point measures every asked type stored alike (q6_K, q8_0 on 576)
                seen.add(key)
    return out


def make_recipe(table: Table, source: SourceModel, types: list[str], budget: int, budget_kind: str,
                default_type: str | list[str] = "q8_0", groups: list[str] | None = None) -> Recipe:
    groups = groups or []
    check_complete(table, missing_measurements(table, source, types))
    for p in groups:
        try:
            re.compile(p)
        except re.error as e:
            raise SweepError(f"--group {p!r} is not a regular expression: {e}") from None
    covered = sorted(table.tensors)
    for name in covered:
        t = source.tensor(name)
        if not t.quantizable:
            raise SweepError(f"{name} is measured but llama.cpp's quantizer never quantizes it: drop it from the runs")

    def cost_bytes(n: int) -> int:
        return padded(n, source.alignment) if budget_kind == "file" else n

    # tensors outside the tables: the default type (quantizable ones) or their source type
    fixed: list[Choice] = []
    for t in source.tensors:
        if t.name in table.tensors:
            continue
        default = default_for(t.name, default_type)
        if t.quantizable and default != "keep":
            fixed.append(Choice(t.name, None, t.stored_as(default).name, t.bytes_as(default), math.nan, math.nan))
        else:
            fixed.append(Choice(t.name, None, t.type_name, t.nbytes, math.nan, math.nan))
        if t.quantizable and any(re.search(p, t.name) for p in groups):
            raise SweepError(f"--group/--tie matches {t.name}, which the tables do not cover: it would keep the "
                             f"default type, not the group's; measure it or narrow the pattern")
    members: dict[str, list[str]] = {}
    for name in covered:
        members.setdefault(group_key(name, groups), []).append(name)
    keys = sorted(members)
    n_t = len(types)
    costs = np.full((len(keys), n_t), np.inf)
    weights = np.zeros((len(keys), n_t))
    for i, k in enumerate(keys):
        for j, ty in enumerate(types):
            if any(measured_key(source, n, ty) in table.diverged or unbuildable(table, source, n, ty)
                   for n in members[k]):
                continue
            costs[i, j] = sum(table.rows[measured_key(source, n, ty)].damage for n in members[k])
            weights[i, j] = sum(cost_bytes(source.tensor(n).bytes_as(ty)) for n in members[k])
    fixed_cost = sum(cost_bytes(c.bytes) for c in fixed)
    overhead = source.header_bytes if budget_kind == "file" else 0
    capacity = budget - fixed_cost - overhead
    lightest = np.where(np.isfinite(costs), weights, np.inf).min(axis=1).sum() if len(keys) else 0.0
    if lightest > capacity:
        smallest = int(lightest + fixed_cost + overhead)
        what = (f"{smallest} bytes ({smallest / 1e6:.2f} MB) of file" if budget_kind == "file" else
                f"{8 * smallest / source.n_elements:.4f} bits per weight")
        defaults = " ".join([default_type] if isinstance(default_type, str) else default_type)
        raise SweepError(f"infeasible budget: the smallest recipe with these candidate types and default type(s) "
                         f"{defaults} takes {what}; raise the budget, add smaller --types or a smaller --default-type")
    pick, info = solve_groups(costs, weights, capacity) if len(keys) else (np.zeros(0, int), {"optimal": True})
    chosen: list[Choice] = []
    per_window: list[np.ndarray | None] = []
    for i, k in enumerate(keys):
        ty = types[pick[i]]
        for n in members[k]:
            m, t = table.rows[measured_key(source, n, ty)], source.tensor(n)
            chosen.append(Choice(n, ty, t.stored_as(ty).name, t.bytes_as(ty), m.damage, m.stderr,
                                 k if len(members[k]) > 1 or k != n else None, m.windows))
            per_window.append(m.windows)
    every = chosen + fixed
    order = {t.name: i for i, t in enumerate(source.tensors)}
    every.sort(key=lambda c: order[c.tensor])
    tensor_bytes = {c.tensor: c.bytes for c in every}
    damage = float(sum(c.damage for c in chosen))
    measured = [w for w in per_window if w is not None]
    same = bool(measured) and len(measured) == len(per_window) and all(len(w) == len(measured[0]) for w in measured)
    window_sum = np.sum(measured, axis=0) if same else None  # all measured on the same windows
    if window_sum is not None and len(window_sum) > 1:
        stderr = float(np.std(window_sum, ddof=1) / math.sqrt(len(window_sum)))
    else:  # no per-window values: as if independent (tensors measured on the same windows are correlated)
        stderr = float(math.sqrt(sum(c.stderr ** 2 for c in chosen)))
    return Recipe(every, budget, budget_kind, source.file_bytes(tensor_bytes), sum(tensor_bytes.values()),
                  source.n_elements, damage, stderr, window_sum, info)


def budget_bytes(size: int | None, bpw: float | None, source: SourceModel) -> tuple[int, str]:
    if size is not None and bpw is None:
        return int(size), "file"
    if bpw is not None and size is None:
        return int(math.floor(bpw * source.n_elements / 8)), "tensors"
    raise SweepError("give one budget: --size (e.g. 90MB, a GGUF file, or a preset such as Q4_K_M) or --bpw")
