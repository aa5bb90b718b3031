"""Prefix reuse: a point at layer L decodes only blocks S..N-1 (a stage, S <= L), fed the unperturbed residual
stream after block S-1 that the full model computed once per window.

Per session (`Prefixes`, held by `session.Session`):
  * the residuals `l_out-(S-1)` of every window, for every stage start, captured while the baseline decodes the
    windows (or, when the baseline was already computed or stored, in one decode of the windows of their own) and
    cached on disk beside the F32 containers (`<cache>/prefix/`), with the SHA-256 of the full model's logits on
    the first window;
  * the stage files (sweep/llama/stage_file.py), cached in `<cache>/stages/`, in the loaded file's own types;
  * the identity verdict of each stage: its logits on the first window, decoded from the residuals, must equal the
    full model's bit for bit before any point uses it; otherwise every point of that stage falls back to the full
    decode and its record says why.
`plan_reuse` decides per point before any decode, `choose` carries it out (verifying the stage); the record's
`prefix_reuse` / `prefix_reason` columns say which, or why not. The stages' first blocks (`run.prefix_starts`) are
chosen before launch from the sweep's layers (solve.py), at most `run.prefix_stages` of them; `sweep prefix-clean`
removes the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SweepError
from ..files import atomic_path, atomic_write_bytes
from ..llama.backend import PROBE_TOKENS
from ..llama.cache import io_speeds_file, residuals_file, residuals_meta_file, stage_file
from ..llama.container import runtime_identity
from ..llama.embd import EmbeddingBackend
from ..llama.gguf_names import block_of
from ..llama.stage_check import probe_stage, stage_refusal
from ..llama.stage_file import write_stage_file
from ..llama.stage_view import StageView, node_in_stage
from ..store.readahead import ReadAhead
from ..store.records import point_key
from .solve import spread_starts

log = logging.getLogger(__name__)

OK, FALLBACK, OFF = "ok", "fallback", "off"


@dataclass(frozen=True)
class PrefixSettings:
    """run.prefix_reuse, run.prefix_stages and run.prefix_starts, and the cache directory (model.cache_dir) of
    stages and residuals."""

    enabled: bool
    n_stages: int
    cache_dir: Path
    starts: tuple[int, ...] | None = None  # None: n_stages spread evenly (a point run without a sweep's plan)

    def starts_for(self, n_layers: int) -> tuple[int, ...]:
        if self.starts is None:
            return spread_starts(n_layers, self.n_stages)
        return tuple(sorted(s for s in set(self.starts) if 0 < s < n_layers))


def static_fallback(n_experts: int, recipe: bool, generation: bool) -> str | None:
    """Why a point cannot reuse a prefix whatever its layers, or None (shared with the plan of the stages)."""
    if n_experts:
        return "MoE model: expert routing is tracked on the full model"
    if recipe:
        return "a recipe perturbs tensors all over the model"
    if generation:
        return "the generation check (metrics.generate=true) decodes the full model"
    return None


def stage_for(layers: tuple[int, ...], starts: tuple[int, ...]) -> int | None:
    """The latest stage starting at or before every perturbed block, or None."""
    below = [s for s in starts if s <= min(layers)]
    return max(below) if below else None


@dataclass(frozen=True)
class Reuse:
    """How a point is decoded: `backend` is the stage (a StageView) or the full model."""

    backend: Any  # the full model's Backend, or the StageView (llama/stage_view.py) that decodes like it
    status: str  # ok | fallback | off
    reason: str | None = None
    stage: int | None = None
    n_layers: int = 0

    def columns(self) -> dict:
        start = (self.stage or 0) if self.status == OK else 0
        return {"prefix_reuse": self.status, "prefix_stage": self.stage if self.status == OK else None,
                "prefix_reason": self.reason, "decoded_blocks": self.n_layers - start}


@dataclass(frozen=True)
class ReusePlan:
    """Prefix reuse as decided before anything is decoded (`plan_reuse`): a stage to verify and decode from, or the
    full model and why. `choose` carries it out."""

    status: str  # OK: decode from `stage` once verified (else a fallback, said then) | FALLBACK | OFF
    reason: str | None = None
    stage: int | None = None
    starts: tuple[int, ...] = ()  # the sweep's stages, whose residuals the baseline's decode reads if it decodes now
    read_ahead: bool = False  # read the next stage's files into the page cache while this point decodes
    cache_dir: Path | None = None


def plan_reuse(settings: PrefixSettings | None, n_layers: int, n_experts: int, layers: tuple[int, ...],
               recipe: bool, generation: bool, matched: tuple[str, ...]) -> ReusePlan:
    """Whether a point (its blocks `layers`) can decode from a stage, from what is known before any decode.
    matched: the tensors of its own F32 copy (model.native_weights=copy), () when it runs on the loaded model."""
    if settings is None or not settings.enabled:
        return ReusePlan(OFF, "run.prefix_reuse=false")
    if (why := static_fallback(n_experts, recipe, generation)) is not None:
        return ReusePlan(FALLBACK, why)
    # the residuals of every stage are read while the loaded model's baseline decodes (a copy has its own)
    starts, cache = settings.starts_for(n_layers), settings.cache_dir
    primed = () if matched else starts
    if not layers:
        return ReusePlan(FALLBACK, "the point touches no block: there is no unperturbed prefix to reuse",
                         starts=primed, cache_dir=cache)
    if matched:  # model.native_weights=copy: the point runs on its own copy of the file
        return ReusePlan(FALLBACK, f"quantized weight in the native container ({', '.join(matched)}): decoded on "
                                   f"its matched F32 copy of the whole model (model.native_weights=copy)")
    start = stage_for(layers, starts)
    if start is None:
        return ReusePlan(FALLBACK, f"no stage starts at or before layer {min(layers)} (stages: "
                                   f"{', '.join(map(str, starts)) or 'none'}; set them with run.prefix_starts=[...])",
                         starts=starts, read_ahead=True, cache_dir=cache)
    return ReusePlan(OK, None, start, starts, True, cache)


def choose(ref, target, backend, plan: ReusePlan, baseline: Callable[[], object] | None = None) -> Reuse:
    """The backend a point's perturbed decodes run on, as `plan` says: a verified stage, or `backend` (the full
    model) with why. baseline: computes (or fetches) the point's baseline; the residuals are captured during its
    decode if any (None: no baseline is decoded before the point's windows)."""
    n = ref.info.n_layers

    def full(status: str, reason: str | None) -> Reuse:
        return Reuse(backend, status, reason, None, n)

    prefixes = ref.session.prefixes
    if plan.starts and baseline is not None:
        prefixes.prime(ref, plan.starts, plan.cache_dir, baseline)
    if plan.status != OK:
        if plan.read_ahead:
            prefixes.read_ahead(ref, None, plan.starts, plan.cache_dir)
        return full(plan.status, plan.reason)
    view = prefixes.view(ref, plan.stage, plan.starts, plan.cache_dir, baseline, writes_weights(backend, target))
    prefixes.read_ahead(ref, plan.stage, plan.starts, plan.cache_dir)
    if isinstance(view, str):
        return full(FALLBACK, view)
    missing = prefixes.missing_in_stage(ref.backend, view, target)
    if missing:
        return full(FALLBACK, missing)
    return Reuse(view, OK, None, plan.stage, n)


def writes_weights(full, target) -> bool:
    """Whether the point writes weights in place (those llama.cpp holds in F32): only then is its stage loaded into
    writable memory. Quantized weights are perturbed through a delta and activations by a node replacement; their
    stages are memory-mapped from the file, which loads in about half the time."""
    if target.kind != "weight":
        return False
    try:
        return any(full.holds_f32(name) for name in target.names)
    except SweepError:  # not a weight of the graph: the point fails on it later, as without reuse
        return True


class Prefixes:
    """A session's stages: their residuals, identity verdicts and the one stage model kept open."""

    def __init__(self):
        # (residuals key, start, loaded writable) -> None (identical) or the reason: a stage is checked as it is
        # loaded (memory-mapped or read into memory), and a failure holds for both
        self.verdicts: dict[tuple, str | None] = {}
        self._open: tuple[tuple, EmbeddingBackend] | None = None
        self._residuals: dict[tuple, np.ndarray] = {}
        self.extra_windows = 0  # full-model windows decoded for prefix reuse alone (not by a baseline or a point)
        self._primed: set[str] = set()  # residual keys whose baseline decode was offered for reading them
        self._ahead = ReadAhead()
        self._ahead_of: tuple | None = None  # (residuals key, start) of the stage being read ahead

    def read_ahead(self, ref, current: int | None, starts: tuple[int, ...], cache_dir: Path) -> None:
        """Read the files of the stage after `current` (the first stage when None) into the page cache while this
        point decodes: points run in layer order, so that stage is most likely the next to load."""
        later = [s for s in sorted(starts) if current is None or s > current]
        if not later:
            return
        key = residuals_key(ref)
        if self._ahead_of == (key, later[0]):
            return
        self._ahead_of = (key, later[0])
        self._ahead.start([stage_path(cache_dir, ref, later[0]), residuals_file(cache_dir, key, later[0])])

    def view(self, ref, start: int, starts: tuple[int, ...], cache_dir: Path,
             baseline: Callable[[], object] | None = None, writable: bool = False) -> StageView | str:
        """The verified stage starting at `start`, or the reason it cannot be used. writable: the point writes
        weights in place (a stage memory-mapped from its file cannot take them)."""
        key = residuals_key(ref)
        failed = [v for (k, s, _), v in self.verdicts.items() if (k, s) == (key, start) and v is not None]
        if failed:
            return failed[0]
        checked = (key, start, writable)
        if (why := stage_refusal(ref.backend.path, start)) is not None:  # before residuals, file or load
            self.verdicts[checked] = why
            return why
        try:
            meta, decoded = capture(ref, starts, cache_dir, key, baseline)
            self.extra_windows += decoded
            if (key, start) not in self._residuals:
                self._residuals[(key, start)] = np.load(residuals_file(cache_dir, key, start), mmap_mode="r")
            stage = self._stage(ref, start, cache_dir, writable)
            if isinstance(stage, str):  # the child process that loaded it first did not survive
                self.verdicts[checked] = stage
                return stage
            checked = (key, start, stage.writable)
            view = StageView(stage, start, self._residuals[(key, start)], ref.windows.tokens)
            if checked not in self.verdicts:
                self.verdicts[checked] = identity(ref, view, meta["window0_logits_sha256"])
        except Exception as e:  # any failure to prepare a stage is a fallback, said in the record
            log.debug("stage %d not prepared", start, exc_info=True)
            self.verdicts[checked] = f"stage {start} could not be prepared: {type(e).__name__}: {e}"
        return self.verdicts[checked] or view

    def prime(self, ref, starts: tuple[int, ...], cache_dir: Path, baseline: Callable[[], object]) -> None:
        """Read the residuals during the baseline's decode if it decodes now (the sweep's first point, whatever its
        layer); nothing when the baseline is already there (a stage point then decodes for them)."""
        key = residuals_key(ref)
        if not starts or key in self._primed:
            return
        self._primed.add(key)  # once per session: after the first point the baseline is there anyway
        try:
            self.extra_windows += capture(ref, starts, cache_dir, key, baseline, True)[1]
        except _NotDecoded:
            pass
        except Exception:  # the stage points will try again, and record why they cannot
            log.debug("residuals not read during the baseline", exc_info=True)

    def _stage(self, ref, start: int, cache_dir: Path, writable: bool) -> EmbeddingBackend | str:
        """The stage model, loaded writable only when asked to (an open writable one serves every point), or why
        llama.cpp could not load it in a child process first (stage_check.py: an abort ends the child only)."""
        full = ref.backend
        ident = (str(full.path), start, full.n_ctx, full.n_threads, full.settings)
        if self._open is not None and self._open[0] == ident and not self._open[1].closed \
                and (self._open[1].writable or not writable):
            return self._open[1]
        self.close_stage()  # one stage model in memory at a time
        path = stage_path(cache_dir, ref, start)
        if not path.exists():
            log.info("writing stage %d of %s -> %s", start, full.path.name, path)
            t0 = time.perf_counter()
            write_stage_file(full.path, path, start)
            note_io_speed(cache_dir, "write", path.stat().st_size, time.perf_counter() - t0)
        if (why := probe_stage(path, full.n_ctx, full.n_threads, full.settings)) is not None:
            return why
        t0 = time.perf_counter()
        stage = EmbeddingBackend(path, full.n_ctx, full.n_threads, settings=full.settings, writable_weights=writable)
        note_io_speed(cache_dir, "load", path.stat().st_size, time.perf_counter() - t0)
        self._open = (ident, stage)
        return stage

    @staticmethod
    def missing_in_stage(full, view: StageView, target) -> str | None:
        """Why the target cannot be reached in the stage as in the full model (None: it can)."""
        if target.kind == "weight":
            for name in target.names:
                try:
                    view.weight_copies(name)
                except Exception as e:
                    return f"weight {name} not reachable in stage {view.start}: {e}"
            return None
        for name, index in target.nodes:
            there = view.stage.nodes.get(node_in_stage(name, view.start), [])
            here = full.nodes[name][index]
            if index >= len(there) or (there[index].op, there[index].shape) != (here.op, here.shape):
                return f"node {name}#{index} has no counterpart in stage {view.start}'s graph"
        return None

    def close_stage(self) -> None:
        if self._open is not None:
            self._open[1].close()
            self._open = None

    def close(self) -> None:
        self._ahead.stop()
        self._ahead_of = None
        self.close_stage()
        self._residuals.clear()
        self.verdicts.clear()
        self._primed.clear()


def residuals_key(ref) -> str:
    w = ref.windows
    return residuals_key_of(ref.model_sha256, ref.container, ref.text.sha256, w.n_ctx, w.n_windows,
                            ref.backend.settings)


def residuals_key_of(model_sha256: str, container: str, data_sha256: str, n_ctx: int, n_windows: int,
                     settings) -> str:
    """The key of the residuals (and of their reference logits) of one model, text and slice (the plan asks too)."""
    return point_key(kind="prefix-residuals", model_sha256=model_sha256, container=container,
                     data_sha256=data_sha256, n_ctx=n_ctx, n_windows=n_windows, runtime=runtime_identity(settings))


# ---- measured I/O speeds of stage files, for the plan (solve.py) -------------------------------------------

DEFAULT_SPEEDS = {"write": 250e6, "load": 1e9}  # before any was measured: a slow disk, conservatively


def io_speeds(cache_dir: Path) -> dict[str, float]:
    """Bytes per second a stage file was last written and loaded at in this cache (defaults where not measured)."""
    try:
        kept = json.loads(io_speeds_file(cache_dir).read_text())
        return {k: float(kept.get(k) or v) for k, v in DEFAULT_SPEEDS.items()}
    except (OSError, ValueError, AttributeError):
        return dict(DEFAULT_SPEEDS)


def note_io_speed(cache_dir: Path, what: str, n_bytes: int, seconds: float) -> None:
    if seconds <= 0 or n_bytes <= 0:
        return
    speeds = io_speeds(cache_dir)
    speeds[what] = n_bytes / seconds
    try:
        atomic_write_bytes(io_speeds_file(cache_dir), json.dumps(speeds).encode())
    except OSError:
        pass  # a read-only cache: the plan keeps its defaults


def stage_path(cache_dir: Path, ref, start: int) -> Path:
    return stage_file(cache_dir, ref.model_sha256, ref.container, start)


def unwritten_stages(cache_dir: Path, model_sha256: str, container: str, starts) -> tuple[int, ...]:
    """The starts whose stage files are not in the cache yet (what a sweep would write)."""
    return tuple(s for s in starts if not stage_file(cache_dir, model_sha256, container, s).exists())


class _NotDecoded(Exception):
    """The baseline decoded nothing (computed before, or stored), and a decode of their own was not wanted."""


def capture(ref, starts: tuple[int, ...], cache_dir: Path, key: str,
            baseline: Callable[[], object] | None = None, only_with_baseline: bool = False) -> tuple[dict, int]:
    """The residuals of every window after block S-1 for every stage S still missing, and the SHA-256 of the full
    model's logits on window 0 (the baseline's, when it keeps them); cached on disk. They are read while
    `baseline()` decodes the windows; when it decodes nothing (computed before, or stored), in a decode of the
    windows of their own -- or, with `only_with_baseline`, not at all. Returns the metadata and the windows decoded
    for this alone."""
    meta_path = residuals_meta_file(cache_dir, key)
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    todo = [s for s in starts if not residuals_file(cache_dir, key, s).exists()]
    if not todo and meta:
        return meta, 0
    full, w = ref.backend, ref.windows
    mask = w.output_mask
    decoded, base = 0, None
    if todo:
        nodes = {f"l_out-{s - 1}": (s, residual_occurrence(full, s)) for s in todo}
        log.info("capturing the residual stream before stage(s) %s over %d windows", todo, w.n_windows)
        n_embd = nodes_width(full, nodes)
        with _memmaps(cache_dir, key, todo, (w.n_windows, w.n_ctx, n_embd)) as arrays:
            seen = dict.fromkeys(nodes, 0)  # each node once per window decoded, windows in order

            def keep(name: str, x: np.ndarray) -> None:
                if seen[name] < w.n_windows:
                    arrays[nodes[name][0]][seen[name]] = x
                seen[name] += 1

            with full.observe_nodes({(name, i) for name, (_, i) in nodes.items()}, keep):
                if baseline is not None:
                    base = baseline()
                if set(seen.values()) != {w.n_windows}:  # the baseline was not decoded here: decode for the rows
                    if only_with_baseline:
                        raise _NotDecoded
                    seen = dict.fromkeys(nodes, 0)
                    for tokens in w.tokens:
                        full.decode_window(tokens, mask)
                    decoded += w.n_windows
    if "window0_logits_sha256" not in meta:
        # the reference: the baseline's own logits, those every point is paired with; without them (metrics.kld=
        # false) the full model's window 0 decoded as points decode it, no node observed
        if base is None and baseline is not None:
            base = baseline()
        if (logits := getattr(base, "logits", None)) is not None:
            meta["window0_logits_sha256"] = logits_sha256(np.asarray(logits[0]))
        else:
            meta["window0_logits_sha256"] = logits_sha256(full.decode_window(w.tokens[0], mask))
            decoded += 1
    atomic_write_bytes(meta_path, json.dumps(meta).encode())
    return meta, decoded


def residual_occurrence(full, start: int) -> int:
    """Which graph node named `l_out-(start-1)` is the block's output: the one computed (not a view) on every row."""
    name = f"l_out-{start - 1}"
    found = [o.index for o in full.nodes.get(name, []) if not o.view and o.shape[:1] == (PROBE_TOKENS,)]
    if len(found) != 1:
        raise ValueError(f"the graph has {len(found)} full-row nodes named {name} (needs exactly one)")
    return found[0]


def nodes_width(full, nodes: dict) -> int:
    widths = {full.nodes[name][i].shape[1:] for name, (_, i) in nodes.items()}
    if len(widths) != 1 or len(next(iter(widths))) != 1:
        raise ValueError(f"block outputs {sorted(nodes)} are not all rows of one width: {widths}")
    return next(iter(widths))[0]


class _memmaps:
    """One .npy file per stage, written through memory maps and renamed into place only when all are complete."""

    def __init__(self, cache_dir: Path, key: str, starts, shape):
        self.targets = {s: residuals_file(cache_dir, key, s) for s in starts}
        self.shape = shape
        self._paths: list = []  # the atomic_path context of each file, left on __exit__

    def __enter__(self) -> dict[int, np.ndarray]:
        arrays: dict[int, np.ndarray] = {}
        for s, path in self.targets.items():
            cm = atomic_path(path, suffix=".part.npy")
            tmp = cm.__enter__()
            self._paths.append(cm)
            arrays[s] = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=self.shape)
        self._arrays = arrays
        return arrays

    def __exit__(self, *exc):
        for a in self._arrays.values():
            a.flush()
        self._arrays.clear()
        for cm in self._paths:
            cm.__exit__(*exc)
        return False


def logits_sha256(logits: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(logits, dtype=np.float32).tobytes()).hexdigest()


def identity(ref, view: StageView, expected_sha256: str) -> str | None:
    """None when the stage's logits on window 0 are the full model's bit for bit, else why not."""
    w = ref.windows
    got = np.array(view.decode_window(w.tokens[0], w.output_mask))
    if logits_sha256(got) == expected_sha256:
        log.info("stage %d: logits on window 0 identical to the full model's", view.start)
        return None
    want = ref.backend.decode_window(w.tokens[0], w.output_mask)
    diff = np.abs(got.astype(np.float64) - want)
    return (f"stage {view.start} is not the full model: its logits on window 0 differ (max |dlogit| "
            f"{float(np.nanmax(diff)):.3g}, {float(np.mean(diff > 0)):.1%} of them)")


def disk_bytes(tensors: dict[str, tuple[int, int]], n_layers: int, n_embd: int, n_windows: int, n_ctx: int,
               starts: tuple[int, ...], f32: bool, header_bytes: int = 0) -> tuple[int, int]:
    """(stage files, residuals) in bytes: each stage holds the metadata (`header_bytes`: the tokenizer, mostly),
    the global tensors and blocks S..N-1 of the loaded file (every tensor F32 in the F32 container; `tensors`:
    {name: (bytes stored, elements)} of the user's file), and each stage start keeps one float32 row of n_embd per
    token of every window."""
    def size(name: str) -> int:
        stored, n = tensors[name]
        return 4 * n if f32 else stored

    layer = {name: n_layers if (block := block_of(name)) is None else block for name in tensors}
    stages = sum(header_bytes + sum(size(name) for name in tensors if layer[name] >= s)  # globals: n_layers
                 for s in starts)
    return stages, len(starts) * n_windows * n_ctx * n_embd * 4

