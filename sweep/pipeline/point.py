"""One point of the grid: apply a format to a target, score, compare with the matching baseline, record."""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..llama.backend import Backend
from ..llama.container import runtime_identity, tensors_to_f32
from ..llama.routing import (
    RoutingTracker,
    baseline_routing,
    changed_tokens,
    never_routed,
    routing_columns,
    tracking,
)
from ..prefix.reuse import PrefixSettings, Reuse, ReusePlan, choose, plan_reuse
from ..quant.apply import Proof, Unperturbed, applied
from ..quant.experts import label as expert_label
from ..quant.formats import Format
from ..quant.recipe_types import read as read_recipe
from ..quant.targets import Target
from ..scoring.additivity import prediction_columns
from ..scoring.generation import compare, complete
from ..scoring.metrics import RANKABLE, StopRule, Tokens, summarize
from ..scoring.perplexity import Score, score
from ..store.columns import window_column
from ..store.record import Record
from ..store.records import Store, baseline_key, completions_key
from .reference import Reference

log = logging.getLogger(__name__)


def matched_targets(container: str, info, target: Target, native_weights: str = "delta") -> tuple[str, ...]:
    """The tensors a point's baseline has dequantized to F32: none (the sweep's one baseline), except with
    model.native_weights=copy for a weight point in the native container whose targets are quantized (it runs on a
    copy with those tensors in F32, against that copy's own baseline: see `point_backend`)."""
    if target.kind == "weight" and container == "native" and native_weights == "copy" and \
            any(info.tensor_types.get(n) != "F32" for n in target.names):
        return target.names
    return ()


@contextmanager
def point_backend(ref: Reference, matched: tuple[str, ...]) -> Iterator[Backend]:
    """The model a point runs on: the loaded reference (quantized weights of the native container are perturbed by
    a delta on their matmuls' outputs: quant/apply.py), or -- with model.native_weights=copy, for a weight point
    whose targets are quantized (`matched_targets`) -- a copy of the file with only those tensors in F32, whose
    unrounded scores are the point's baseline (container-matched; a file-sized write and a second model per
    point)."""
    if not matched:
        yield ref.backend
        return
    with tempfile.TemporaryDirectory(prefix="sweep-native-") as scratch:
        copy = tensors_to_f32(ref.source, matched, Path(scratch) / "matched.gguf")
        with Backend(copy, ref.windows.n_ctx, ref.threads, writable_weights=True,
                     settings=ref.backend.settings) as backend:
            yield backend


def baseline_score(backend: Backend, ref: Reference, progress: bool, store: Store | None = None,
                   matched: tuple[str, ...] = (), keep_logits: bool = True) -> Score:
    """The unperturbed score on the reference windows, with its raw logits (for exact KL) unless told not to:
    computed once per session and, through `store`, once for every process of any sweep (keyed by all that
    determines it)."""
    w = ref.windows
    key = baseline_key(ref.model_sha256, ref.container, matched, ref.text.sha256, w.n_ctx, w.n_windows,
                       runtime_identity(backend.settings))
    return ref.session.baseline(key, backend, w, progress, store, keep_logits)


def baseline_completions(backend: Backend, ref: Reference, matched: tuple[str, ...], prompts: tuple[str, ...],
                         max_new: int) -> list:
    key = completions_key(ref.model_sha256, ref.container, matched, backend.n_ctx, prompts, max_new,
                          runtime_identity(backend.settings))
    return ref.session.completions(key, lambda: complete(backend, prompts, max_new))


@dataclass
class Outcome:
    proof: Proof
    score: Score
    baseline: Score
    container_note: str  # what the baseline is, in words
    status: str  # "ok" | "no-op" | "diverged"
    reason: str | None
    seconds: float
    generation: dict | None = None
    decode_seconds: float = 0.0  # inside llama_decode: scoring, generation, and a baseline if computed here
    baseline_logits: str = "store"  # "store": paired with stored baseline logits; "recompute": decoded alongside
    routing: dict | None = None  # MoE: the routing columns (sweep/llama/routing.py)
    prefix: Reuse | None = None  # prefix reuse: the stage decoded, or why the full model (sweep/prefix/reuse.py)


@dataclass(frozen=True)
class PointPlan:
    """What a point will do, decided before anything is decoded (`decide`): `run_point` carries it out."""

    matched: tuple[str, ...]  # its model: () the loaded reference; else a copy of the file with these tensors in
    # F32, measured against that copy's own baseline (model.native_weights=copy: `point_backend`)
    note: str  # what the baseline is, in words (the record's `baseline`)
    recompute: bool  # its baseline: each window decoded unperturbed beside the perturbed one, or stored once
    keep_logits: bool  # the baseline's raw logits, for exact KL (metrics.kld)
    reuse: ReusePlan  # prefix reuse: the stage the perturbed decodes start from, or the full model and why
    routing: bool  # MoE: the routing observed in the unperturbed and the scored decodes
    stop: StopRule | None  # early stopping: after each window, whether the question is settled
    prompts: tuple[str, ...]  # the generation check in this job: greedy completions compared with the baseline's
    max_new_tokens: int

    @property
    def baseline_logits(self) -> str:  # the record's `baseline_logits`
        return "recompute" if self.recompute else "store"


def decide(ref: Reference, target: Target, fmt: Format, kld: bool = True, prompts: tuple[str, ...] = (),
           max_new_tokens: int = 32, stop: StopRule | None = None, baseline_logits: str = "store",
           prefix: PrefixSettings | None = None) -> PointPlan:
    """The point's decisions, from its settings, its target and the model's description."""
    matched = matched_targets(ref.container, ref.info, target, ref.native_weights)
    recompute = kld and baseline_logits == "recompute"
    reuse = plan_reuse(prefix, ref.info.n_layers, ref.info.n_experts, target.layers, bool(fmt.recipe),
                       bool(prompts), matched)
    # (no routing in recompute mode: its unperturbed decodes interleave with the perturbed ones)
    return PointPlan(matched, container_note(ref, target, matched), recompute, kld, reuse,
                     bool(ref.info.n_experts) and not recompute, stop, tuple(prompts), max_new_tokens)


@dataclass
class Measured:
    """What the perturbed run gave: the proof of what was applied, the scores, the routing and completions."""

    proof: Proof
    score: Score
    baseline: Score
    tracker: RoutingTracker | None  # MoE: the routing of the scored decodes
    completions: list | None  # the generation check's completions (None: not generated)
    expected: list | None  # ... and the baseline's
    base_routing: RoutingTracker | None  # MoE: the routing of the unperturbed decodes
    unrouted: str | None  # MoE: why the experts perturbed are never selected (a no-op), or None


def run_point(ref: Reference, target: Target, fmt: Format, progress: bool = True,
              store: Store | None = None, kld: bool = True, prompts: tuple[str, ...] = (),
              max_new_tokens: int = 32, stop: StopRule | None = None, baseline_logits: str = "store",
              prefix: PrefixSettings | None = None) -> Outcome:
    """The life of a point: its decisions (`decide`); its model (`point_backend`); the stage its perturbed decodes
    start from (`choose`); its baseline; the format applied, the windows scored and the completions generated
    (`measure`); what was measured, judged (`verdict`).

    baseline_logits="recompute" (with kld): no stored baseline logits; each window is decoded unperturbed, its
    logits kept in memory, then decoded perturbed (twice the decode, no disk). The numbers equal the stored mode's.
    prefix: reuse the unperturbed prefix (sweep/prefix/reuse.py); None decodes the full model."""
    t0 = time.perf_counter()
    plan = decide(ref, target, fmt, kld, prompts, max_new_tokens, stop, baseline_logits, prefix)
    decoding_before = ref.backend.decode_seconds
    with point_backend(ref, plan.matched) as full:  # its model: the loaded one, or its matched copy
        def baseline(keep_logits: bool = plan.keep_logits) -> Score:
            return baseline_score(full, ref, progress, store, plan.matched, keep_logits=keep_logits)

        # the stage its perturbed decodes start from (the baseline, if decoded now, reads the stages' residuals)
        reuse = choose(ref, target, full, plan.reuse, None if plan.recompute else baseline)
        backend, stage_decoding_before = reuse.backend, reuse.backend.decode_seconds
        kept, uses = delta_uses(backend, target)  # quantized weights perturbed by a delta, and their nodes
        base = None if plan.recompute else baseline()  # its baseline (recompute: beside each window)
        m = measure(ref, target, fmt, plan, full, backend, base, baseline, progress)  # perturbed: scored, generated
        generation = compare(m.completions, m.expected) if m.completions is not None and m.expected is not None \
            else None
        decoding = full.decode_seconds if plan.matched else ref.backend.decode_seconds - decoding_before
        if backend is not full:
            decoding += backend.decode_seconds - stage_decoding_before
    routing = point_routing(ref.info, target, m.tracker if m.score is not m.baseline else None, m.base_routing) \
        if plan.routing else {}
    status, reason = verdict(target, fmt, m, kept, uses)
    base = m.baseline.first(m.score.n_windows) if m.score.stopped_early else m.baseline  # paired: the same windows
    return Outcome(m.proof, m.score, base, plan.note, status, reason, time.perf_counter() - t0, generation, decoding,
                   plan.baseline_logits, routing, reuse)


def measure(ref: Reference, target: Target, fmt: Format, plan: PointPlan, full: Backend, backend,
            base: Score | None, baseline, progress: bool) -> Measured:
    """The point's perturbed run on `backend` (the full model or a stage): the format applied to the target, the
    windows scored against the baseline (`base`; None: recomputed beside each window), the completions generated.
    A weight point that leaves the weights bit-identical, or perturbs experts no scored token uses, decodes
    nothing: its numbers are the baseline's (a no-op)."""
    # recompute: the originals are read before the perturbation is applied, to switch it off per window
    originals = {n: backend.read_weight(n) for n in target.names if backend.holds_f32(n)} \
        if plan.recompute and target.kind == "weight" else {}
    expected = baseline_completions(full, ref, plan.matched, plan.prompts, plan.max_new_tokens) \
        if plan.prompts else None
    base_routing = baseline_routing(ref.session, full, ref.windows, plan.matched, ref.info.n_experts_used) \
        if plan.routing else None
    unrouted = never_routed(base_routing, target) if base_routing is not None else None
    got = None
    with tracking(backend, ref.info.n_experts_used) if plan.routing else nullcontext() as tracker, \
            applied(backend, target, fmt, ref.info.tensor_types) as proof:
        if target.kind == "weight" and (proof.n_changed == 0 or unrouted):
            result = base = base or baseline(keep_logits=False)
        else:
            stop = plan.stop
            settled = (lambda so_far: stop.settled(per_token(so_far, _paired(so_far, base)))) \
                if stop is not None else None
            result = score(backend, ref.windows, progress, reference=base, settled=settled,
                           desc=f"{target.kind} {target.tensor} L{target.layer_label} {fmt.label}",
                           unperturbed=Unperturbed(backend, target, originals) if plan.recompute else None,
                           math=ref.session.math)
            base = result.baseline or base
        proof = replace(proof)  # the record's counts are about the scored windows, not the generation
        if tracker is not None:
            tracker.counting = False
        if plan.prompts and not result.diverged:
            got = expected if result is base else complete(backend, plan.prompts, plan.max_new_tokens)
    assert base is not None  # scored above (recompute: the run's own baseline)
    return Measured(proof, result, base, tracker, got, expected, base_routing, unrouted)


def verdict(target: Target, fmt: Format, m: Measured, kept: list[str], uses: int) -> tuple[str, str | None]:
    """The point's status and why: ok; a no-op (nothing measured: experts never routed, nothing rounded, or the
    output untouched); diverged; or failed, when the proofs do not add up to the point it names (the format applied
    once per node and window, each quantized weight's delta added once per node that uses it)."""
    proof, result = m.proof, m.score
    reason = m.unrouted or expert_no_op(target, proof) or proof.no_op_reason(target, fmt) or \
        absorbed(result, m.baseline)
    status = "no-op" if reason else "ok"
    expected_calls = result.n_windows * len(target.names) if target.kind == "activation" else len(target.names)
    if result.diverged:
        return "diverged", result.diverged
    if proof.hook_calls != expected_calls:  # a node rounded twice, or never: the point is not what it names
        return "failed", (f"the format was applied {proof.hook_calls} times, expected {expected_calls} "
                          f"({len(target.names)} node(s) x {result.n_windows} window(s))"
                          if target.kind == "activation" else
                          f"{proof.hook_calls} weight tensors written, expected {expected_calls}")
    if (why := missed_deltas(kept, uses, proof, result, status)) is not None:
        return "failed", why
    return status, reason


def container_note(ref: Reference, target: Target, matched: tuple[str, ...]) -> str:
    """What the point's baseline is, in words (the record's `baseline`)."""
    if matched:
        return f"native container, {', '.join(matched)} dequantized to F32"
    quantized = [n for n in target.names if target.kind == "weight" and ref.info.tensor_types.get(n, "F32") != "F32"]
    if ref.container == "native" and quantized:
        return (f"native container (the file as it is); {', '.join(quantized)} kept in "
                f"{'/'.join(sorted({ref.info.tensor_types[n] for n in quantized}))} with (fmt(W) - W)·x added in F32 "
                f"to its matmul outputs")
    return f"{ref.container} container"


def delta_uses(backend: Backend, target: Target) -> tuple[list[str], int]:
    """The weights of a point kept quantized (perturbed by a delta: llama/weight_delta.py) and how many nodes of one
    decode use them (the probe decode counted them)."""
    kept = [n for n in target.names if target.kind == "weight" and not backend.holds_f32(n)]
    return kept, sum(backend.consumers.get(n, 0) for n in kept)


def missed_deltas(kept: list[str], uses: int, proof: Proof, result: Score, status: str) -> str | None:
    """Why a weight point kept quantized is not what it names (each scored decode must correct every node that
    uses its weights once), or None when it is."""
    if not kept or status != "ok" or proof.delta_calls == result.n_windows * uses:
        return None
    return (f"(fmt(W) - W)·x was added {proof.delta_calls} times, expected {result.n_windows * uses} ({uses} "
            f"node(s) using {', '.join(kept)} x {result.n_windows} window(s))")


def point_routing(info, target: Target, run, base) -> dict:
    """The routing columns of a MoE point: the targeted layers' routing in the scored decodes (`run`; None when the
    point reused the baseline's numbers, whose routing is `base`'s) and the tokens whose experts changed."""
    layers = target.layers or tuple(range(info.n_layers))
    experts = target.experts or tuple(range(info.n_experts))
    used = run if run is not None else base
    changed = changed_tokens(run, base) if run is not None else ({}, 0)
    n_scored = sum(len(part) for part in used.selected.get(layers[-1], []))
    return routing_columns(used.summary(layers, experts), changed, n_scored)


def expert_no_op(target: Target, proof: Proof) -> str | None:
    """An activation point on experts that no token of the scored windows selected: no row was rounded."""
    if not target.experts or target.kind != "activation" or proof.n_elements:
        return None
    return (f"expert {','.join(map(str, target.experts))} of layer {target.layer_label} is never selected by any "
            f"token of the scored windows: no row of {target.tensor} was rounded")


def absorbed(run: Score, base: Score) -> str | None:
    """Why a perturbation that changed values left the output untouched, or None when the output moved.

    E.g. rounding V to fp16 when the V cache is F16 anyway: the hook ran and changed half the elements, yet every
    logit is what it was. Such a point measured nothing and must not rank as "insensitive"."""
    if run is base or run.diverged or run.argmax is None:
        return None
    cut = base.first(run.n_windows)
    # (log-sum-exps are summed in float32 when paired, in float64 alone: they are not comparable bit for bit)
    same = (np.array_equal(run.nll, cut.nll) and cut.argmax is not None and np.array_equal(run.argmax, cut.argmax)
            and (run.kld is None or not run.kld.any()))
    return ("absorbed downstream: the values changed but the scored output did not (NLL, KL and top token of "
            "every scored token are exactly the baseline's)") if same else None


def _paired(so_far: Score, base: Score | None) -> Score:
    """The baseline of a run's first windows: recomputed alongside it, else the stored one's first windows."""
    if so_far.baseline is not None:
        return so_far.baseline
    assert base is not None  # not recompute: the stored baseline was scored before the run
    return base.first(so_far.n_windows)


def per_token(run: Score, base: Score) -> Tokens:
    """The paired per-token quantities (metrics.PER_TOKEN) that every metric of `metrics.METRICS` aggregates."""
    if run is base:  # a weight no-op: the model is bit-identical to its baseline
        zeros = np.zeros_like(base.nll)
        return {"dnll": zeros, "kld": zeros, "top1": np.ones_like(zeros), "nll": base.nll, "base_nll": base.nll}
    assert run.argmax is not None and base.argmax is not None  # every scored window keeps its top tokens
    tokens = {"dnll": run.nll - base.nll, "top1": (run.argmax == base.argmax).astype(np.float64), "nll": run.nll,
              "base_nll": base.nll}
    if run.kld is not None:
        tokens["kld"] = run.kld
    return tokens


def record(ref: Reference, target: Target, fmt: Format, out: Outcome, alpha: float = 0.05) -> Record:
    """One flat row of the results table (its columns: sweep/store/columns.py)."""
    diverged = out.status == "diverged"
    tokens = {} if diverged else per_token(out.score, out.baseline)
    metrics = summarize(tokens, alpha, out.score.stopped_early) if tokens else {}
    # Per-window means (window i of every point is the same text): enough to replay any early-stopping rule.
    windows = {window_column(name): values.mean(axis=1).tolist()
               for name, values in tokens.items() if name != "nll"}
    if diverged:
        metrics = {"delta_ppl": math.inf, "delta_nll": math.inf, "delta_nll_stderr": math.nan,
                   "delta_ppl_stderr": math.nan}
    return Record(
        # `layer` is the block number of a single-layer point (None otherwise); `layers` names every block touched.
        layer=target.layers[0] if len(target.layers) == 1 else None, layers=target.layer_label,
        tensor=target.tensor, kind=target.kind, fmt=fmt.label,
        **({"expert": expert_label(target.experts)} if ref.info.n_experts else {}),
        status=out.status, reason=out.reason,
        ppl=out.score.ppl, ppl_stderr=out.score.ppl_stderr,
        baseline_ppl=out.baseline.ppl, baseline_ppl_stderr=out.baseline.ppl_stderr,
        **metrics, **(out.generation or {}), alpha=alpha,
        n_elements=out.proof.n_elements, n_changed=out.proof.n_changed,
        frac_changed=out.proof.frac_changed, rel_mse=out.proof.rel_mse, sqnr_db=out.proof.sqnr_db,
        max_abs_err=out.proof.max_abs_err, n_overflow=out.proof.n_overflow, hook_calls=out.proof.hook_calls,
        delta_calls=out.proof.delta_calls,
        **storage_columns(out.proof.storage, metrics.get("kld_mean")), **(out.routing or {}),
        targets=",".join(target.names), baseline=out.container_note,
        container=ref.container, **({"native_weights": ref.native_weights} if ref.container == "native" else {}),
        **runtime_identity(ref.backend.settings), **ref.backend.placement(),
        model=ref.source.name, model_path=str(ref.source), model_sha256=ref.model_sha256,
        data_source=ref.text.source, data_sha256=ref.text.sha256,
        n_windows=out.score.n_windows, stopped_early=out.score.stopped_early, n_ctx=out.score.n_ctx,
        n_tokens=out.score.n_tokens,
        seconds=out.seconds, score_seconds=out.score.seconds, decode_seconds=out.decode_seconds,
        baseline_logits=out.baseline_logits, **(out.prefix.columns() if out.prefix else {}), **windows,
        **(joint_columns(ref, target, fmt, out, tokens) if fmt.recipe and tokens else {}),
    )


def joint_columns(ref: Reference, target: Target, fmt: Format, out: Outcome, tokens) -> dict:
    """A recipe's joint point: what the tables predicted for its tensors (the sum of their single damages) and the
    additivity residual, paired over windows when the point ran on the tables' windows (sweep/quant/recipe_types.py)."""
    assert fmt.recipe is not None  # a joint point's format names its recipe
    recipe = read_recipe(fmt.recipe)
    context = {"model_sha256": ref.model_sha256, "container": ref.container, "n_ctx": out.score.n_ctx,
               "data_sha256": ref.text.sha256, "stopped_early": out.score.stopped_early}
    return prediction_columns(recipe, target.names, RANKABLE[recipe.metric].window_damage(tokens), context)


def storage_columns(storage: Sequence[Mapping], kld_mean: float | None) -> dict:
    """Size of the target in the format and in the user's file, and the damage per bit saved (KLD divided by the
    bits per weight saved against the file; NaN where the format does not save bits)."""
    if not storage:
        return {}
    n = sum(s["n_elements"] for s in storage)
    used = sorted({s["ggml_type"] for s in storage if s["ggml_type"]})
    fallback = sorted({s["fallback_from"] for s in storage if s["fallback_from"]})
    out = {"ggml_type": ",".join(used) or None, "fallback_from": ",".join(fallback) or None,
           "bytes": sum(s["bytes"] for s in storage)}
    out["bpw"] = 8 * out["bytes"] / n
    quantized = [s for s in storage if "imatrix_used" in s]  # GGUF types given an imatrix
    if quantized:
        out["imatrix_used"] = all(s["imatrix_used"] for s in quantized)
        if not out["imatrix_used"]:  # which: a joint point's token_embd, never in an imatrix, is not the rest
            out["imatrix_missing"] = ",".join(s["tensor"] for s in quantized if not s["imatrix_used"])
    if all("bytes_orig" in s for s in storage):
        out["bytes_orig"] = sum(s["bytes_orig"] for s in storage)
        out["bpw_orig"] = 8 * out["bytes_orig"] / n
        saved = out["bpw_orig"] - out["bpw"]
        out["kld_per_bit_saved"] = kld_mean / saved if kld_mean is not None and saved > 0 else math.nan
    return out


def describe(rec: Record) -> str:
    """The one-line summary printed when a point finishes."""
    head = f"[{rec['status']}] {rec['kind']} {rec['tensor']} L{rec['layers']}"
    head += f" E{rec['expert']} {rec['fmt']}" if rec.get("expert") not in (None, "all") else f" {rec['fmt']}"
    if rec.get("routed_tokens") is not None and rec.get("expert") not in (None, "all"):
        head += f" (routed_tokens {rec['routed_tokens']}, router share {rec['router_share']:.3f})"
    if rec.get("fallback_from"):  # llama.cpp's fallback for rows its block does not divide: never silent
        head += f" (stored as {rec['ggml_type']}: {rec['fallback_from']}'s block does not divide the rows)"
    if rec.get("imatrix_used") is False:
        which = rec["imatrix_missing"] if "," in rec.get("targets", "") else "it"
        head += f" (the imatrix has no entry for {which}: quantized without)"
    if rec.get("bpw") is not None and not math.isnan(rec["bpw"]):
        head += f" [{rec['bpw']:.3g} bpw" + (f" vs {rec['bpw_orig']:.3g}]" if rec.get("bpw_orig") else "]")
    if rec["status"] in ("no-op", "failed", "diverged"):
        return f"{head}: {rec['status'].upper()}, {rec['reason']}"
    return (f"{head}: PPL {rec['ppl']:.4f} vs {rec['baseline_ppl']:.4f} "
            f"(ΔPPL {rec['delta_ppl']:+.4f} ± {rec['delta_ppl_stderr']:.4f}{_p_value(rec)}), "
            f"KLD {rec.get('kld_mean', math.nan):.2e}, top-1 {100 * rec.get('top1_agree', math.nan):.2f}%, "
            f"changed {100 * rec['frac_changed']:.2f}% of {rec['n_elements']} elements, "
            f"SQNR {rec['sqnr_db']:.1f} dB, hook calls {rec['hook_calls']}{_joint(rec)}")


def _joint(rec: Record) -> str:
    """A recipe's joint point: predicted (sum of singles) vs measured, and the residual."""
    if rec.get("predicted") is None or rec["predicted"] != rec["predicted"]:
        return ""
    metric = rec["additivity_metric"]
    text = (f"; {metric} predicted {rec['predicted']:.4g} (sum of {rec['predicted_tensors']} single-tensor "
            f"damages{', not counting ' + rec['not_predicted'] if rec.get('not_predicted') else ''})")
    if rec.get("additivity_residual") is not None and rec["additivity_residual"] == rec["additivity_residual"]:
        return text + (f", additivity residual (measured - predicted, paired over windows) "
                       f"{rec['additivity_residual']:+.3g} [{rec['additivity_residual_lo']:+.3g}, "
                       f"{rec['additivity_residual_hi']:+.3g}]")
    return text + f" ({rec.get('additivity_note')})"


def _p_value(rec: Record) -> str:
    """The point's own ΔNLL test, printed as a p-value (per comparison: a sweep's table adds q-values)."""
    if rec.get("stopped_early"):
        return f", stopped early after {rec['n_windows']} windows, untested"
    p = rec.get("delta_nll_p")
    return f", p {p:.2g}" if p is not None and math.isfinite(p) else ""
