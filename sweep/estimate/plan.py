"""Which points of a grid the map measures exactly and which it predicts (run.estimate=map).

Every weight point of a GGUF type on one tensor is a cell of the map. Per tensor one cell is measured exactly, its
*calibration* (run.map_calibrate, default the tensor's middle format by bits per weight); per class (`ffn_down`,
`attn_v`, ...) run.map_checks tensors, spread over the layers, are also measured at their lowest format (the law's
longest step): the *check* points, from which the law's exponent and its miss are fitted (law.py). Every other cell
is predicted. Points the map cannot predict (activations, float formats, several tensors at once, a recipe) are
measured exactly, and the plan says how many.

The plan is data (`MapPlan.to_json`): the sweeper writes it into the sweep directory before launch, the map's job
(job.py) computes the statistics and weight errors of its cells, and the end of the sweep predicts from it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import SweepError
from ..files import atomic_write_bytes
from ..llama.gguf_names import in_block
from ..quant.experts import label as expert_label
from ..quant.ggml_types import is_ggml, type_for_rows

MAP_FILE = "map.json"  # in the sweep directory: the plan
ERRORS_FILE = "map_errors.json"  # in the sweep directory: the map job's statistics and weight errors
FIT_FILE = "map_fit.json"  # in the sweep directory: the law fitted at the end of the sweep


@dataclass(frozen=True)
class Cell:
    """One weight point the map covers: the grid's job index, its tensor and format."""

    job: int
    tensor: str  # the GGUF tensor name (blk.3.ffn_down.weight)
    cls: str  # its class: the name without its block (ffn_down.weight, ffn_down_exps.weight)
    layer: int | None
    fmt: str  # the format's label (q4_K)
    stored: str  # the GGUF type llama.cpp stores it in (q4_K's rows of 576 are q5_0)
    bpw: float
    params: dict = field(default_factory=dict)  # the format's config (make_format(**params))
    experts: tuple[int, ...] = ()  # MoE: the experts of the stack it targets; () the whole tensor
    expert: str | None = None  # the records' `expert` label of those (None: a dense model's point)

    @property
    def name(self) -> str:
        """The weight the map predicts: the tensor, or the experts of a stack it targets."""
        return self.tensor if not self.experts else f"{self.tensor}[{','.join(map(str, self.experts))}]"


@dataclass
class MapPlan:
    cells: list[Cell]
    calibration: dict[str, str]  # weight (Cell.name) -> its calibration format
    checks: dict[str, str]  # weight -> its check format
    exact_jobs: list[int]  # every job measured exactly: calibration, check, and the points the map cannot predict
    unmapped: int = 0  # points measured exactly because the map cannot predict them
    tolerance: float = 3.0
    jobs: list[list[str]] = field(default_factory=list)  # every job's overrides (the predicted ones' too)

    @property
    def predicted(self) -> list[Cell]:
        exact = set(self.exact_jobs)
        return [c for c in self.cells if c.job not in exact]

    def summary(self) -> str:
        n_pred = len(self.predicted)
        return (f"run.estimate=map: {len(self.exact_jobs)} of {len(self.jobs)} points measured exactly "
                f"({len(self.calibration)} calibration, {len(self.checks)} check"
                + (f", {self.unmapped} the map cannot predict: activations, float formats, several tensors"
                   if self.unmapped else "") + f"), {n_pred} predicted, plus one decode for the input statistics")

    def to_json(self) -> dict:
        return {"cells": [asdict(c) for c in self.cells], "calibration": self.calibration, "checks": self.checks,
                "exact_jobs": self.exact_jobs, "unmapped": self.unmapped, "tolerance": self.tolerance,
                "jobs": self.jobs}

    @classmethod
    def from_json(cls, data: dict) -> MapPlan:
        cells = [Cell(**{**c, "experts": tuple(c.get("experts", ()))}) for c in data["cells"]]
        return cls(cells, data["calibration"], data["checks"], data["exact_jobs"], data["unmapped"],
                   data["tolerance"], data["jobs"])

    def write(self, sweep_dir: Path) -> Path:
        path = sweep_dir / MAP_FILE
        atomic_write_bytes(path, json.dumps(self.to_json(), indent=1).encode())
        return path

    @classmethod
    def read(cls, sweep_dir: Path) -> MapPlan | None:
        path = sweep_dir / MAP_FILE
        return cls.from_json(json.loads(path.read_text())) if path.is_file() else None


def _spread(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n), the middle of each of k equal parts."""
    k = min(k, n)
    return sorted({int((i + 0.5) * n / k) for i in range(k)})


def choose(cells: Sequence[Cell], n_jobs: int, calibrate: str | None, n_checks: int,
           tolerance: float = 3.0) -> MapPlan:
    """The calibration and check points of the cells; every job that is not a cell is measured exactly."""
    by_tensor: dict[str, list[Cell]] = {}
    for c in cells:
        by_tensor.setdefault(c.name, []).append(c)
    calibration: dict[str, str] = {}
    exact: set[int] = set(range(n_jobs)) - {c.job for c in cells}
    unmapped = len(exact)
    for tensor, mine in by_tensor.items():
        mine.sort(key=lambda c: c.bpw)
        chosen = next((c for c in mine if c.fmt == calibrate), None) or mine[(len(mine) - 1) // 2]
        calibration[tensor] = chosen.fmt
        exact.add(chosen.job)
    checks: dict[str, str] = {}
    by_class: dict[str, list[str]] = {}
    for tensor, mine in by_tensor.items():
        by_class.setdefault(mine[0].cls, []).append(tensor)
    for tensors in by_class.values():
        candidates = []
        for tensor in sorted(tensors, key=lambda t: (by_tensor[t][0].layer or 0, t)):
            cal = next(c for c in by_tensor[tensor] if c.fmt == calibration[tensor])
            other = [c for c in by_tensor[tensor] if c.stored != cal.stored]
            if other:
                candidates.append(min(other, key=lambda c: c.bpw))
        for i in _spread(len(candidates), n_checks):
            checks[candidates[i].name] = candidates[i].fmt
            exact.add(candidates[i].job)
    return MapPlan(list(cells), calibration, checks, sorted(exact), unmapped, tolerance)


def cell_of(job: int, s, target, info) -> Cell | None:
    """The map's cell of a checked point (`s` its settings, pipeline/settings.JobSettings; target resolved), or None
    when the map cannot predict it: an activation, a float format, a recipe, several tensors at once, a tensor outside
    the blocks' weights."""
    fmt_name, params = s.point.fmt.name, s.point.fmt_params
    if s.point.kind != "weight" or not is_ggml(fmt_name) or params.get("recipe") or len(target.names) != 1 \
            or len(target.layers) > 1:
        return None
    tensor = target.names[0]
    stored, _ = type_for_rows(fmt_name, info.tensor_shapes[tensor][0])
    experts = tuple(int(e) for e in target.experts)
    label = expert_label(experts) if info.n_experts else None
    return Cell(job, tensor, in_block(tensor),  # (a stack's experts share their class's law)
                target.layers[0] if target.layers else None, fmt_name, stored.name, stored.bpw, params, experts, label)


def split(jobs: list[list[str]], points: list, info_of) -> tuple[MapPlan | None, list[int]]:
    """run.estimate=map: the map's plan of the grid and the jobs to launch (the exact ones); without it, every job.
    `points`: (settings, target) of every job (pipeline/settings.JobSettings); info_of(settings): its model's
    ModelInfo."""
    modes = {s.run.estimate for s, _ in points}
    if modes == {"off"}:
        return None, list(range(len(jobs)))
    if len(modes) > 1:
        raise SweepError("run.estimate differs between the grid's points: set it once for the sweep")
    run = points[0][0].run
    cells = [c for c in (cell_of(i, s, t, info_of(s)) for i, (s, t) in enumerate(points)) if c]
    if not cells:
        raise SweepError("run.estimate=map predicts weight points of GGUF types (kind=weight fmt=q4_K,...) and this "
                         "grid has none (activation points stay exact, as do float formats): drop run.estimate=map")
    if len({(str(s.model.path), str(s.data.path), s.data.n_windows) for s, _ in points}) > 1:
        raise SweepError("run.estimate=map needs one model and one slice of text per sweep: run one sweep each")
    calibrate = run.map_calibrate
    if calibrate is not None and calibrate not in {c.fmt for c in cells}:
        raise SweepError(f"run.map_calibrate={calibrate} is not a format of the grid's weight points "
                         f"({', '.join(sorted({c.fmt for c in cells}))})")
    if run.map_checks < 1 or run.map_tolerance <= 1:
        raise SweepError("run.estimate=map needs run.map_checks >= 1 and run.map_tolerance > 1 (a factor)")
    plan = choose(cells, len(jobs), calibrate, run.map_checks, run.map_tolerance)
    plan.jobs = [list(j) for j in jobs]
    return plan, plan.exact_jobs
