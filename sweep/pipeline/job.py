"""One job of a sweep: reuse the stored record of this point, or compute it; either way record it in the job dir.

A job never takes the sweep down: anything that goes wrong inside a point is recorded as `failed` with the reason,
and the next point runs. Bad configuration is caught before any job starts (see `grid.py`).
"""

from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ..cores import available_cores
from ..llama.cache import cache_root
from ..llama.capacity import settled
from ..llama.container import compute_settings, runtime_identity
from ..llama.model_file import model_info, resolve_model_path, sha256
from ..llama.rpc import on_server_lost
from ..prefix.reuse import PrefixSettings
from ..quant.experts import label as expert_label
from ..quant.experts import parse_experts
from ..quant.formats import make_format
from ..quant.targets import parse_layers, resolve
from ..scoring.generation import generation_mode
from ..scoring.metrics import EarlyStop, StopRule
from ..store.record import RECORD_FILE, Record, write_record
from ..store.records import Store, point_key
from .map_job import run_map_job
from .point import describe, record, run_point
from .reference import load_inputs, open_reference
from .session import Sessions

log = logging.getLogger(__name__)


def cores_for_this_job(launcher_cfg) -> int:
    """Cores this job may use: the cores it can run on, shared among the jobs that run beside it."""
    cores = available_cores()
    if launcher_cfg is None:
        return cores
    if launcher_cfg.get("cpus_per_task"):  # submitit: what the scheduler gave each task
        return int(launcher_cfg.cpus_per_task)
    n_jobs = launcher_cfg.get("n_jobs")  # joblib: -1 means one job per core
    if n_jobs:
        return max(1, cores // (cores if n_jobs < 0 else min(int(n_jobs), cores)))
    return cores


def run_job(cfg: DictConfig, sessions: Sessions, job_dir: Path | None = None, launcher_cfg=None) -> Record | None:
    """One point: `sessions` holds the loaded model, shared with the jobs before and after this one. The map's own
    job (run.map_job set: map_job.py) records no point."""
    store = Store(Path(cfg.run.store))
    cfg = settled(OmegaConf.merge(cfg, {"run": {"threads": cfg.run.threads or cores_for_this_job(launcher_cfg)}}),
                  launcher_cfg)  # (a sweep's jobs come with it settled: grid.py)
    if cfg.run.map_job:
        try:
            run_map_job(cfg, open_reference(cfg, load_inputs(cfg), sessions), store)
        except Exception as e:  # said; the end of the sweep says the map has no errors to predict from
            log.debug("the map's job failed", exc_info=True)
            print(f"map: the statistics job failed: {type(e).__name__}: {e}", flush=True)
        return None
    fmt = make_format(**cfg.fmt)
    inputs = load_inputs(cfg)
    layers = parse_layers(cfg.layer, inputs.info.n_layers)
    stop = stop_rule(cfg.metrics)
    key = job_key(cfg, inputs.model_sha256, inputs.text.sha256, layers)
    generate_here = generation_mode(cfg.metrics.generate) is None  # top:N: after the sweep (gencheck.py)
    rec = store.point(key)
    reused = rec is not None
    if reused:
        log.info("already done (record %s), not recomputed", key)
    else:
        started = time.time()

        def lost(reason: str) -> None:  # llama.cpp is aborting (an RPC server gone): the point fails, rerun retries
            failed = failed_record(cfg, fmt.label, layers, inputs, RuntimeError(reason))
            failed.update(key=key, started_at=started, finished_at=time.time())
            store.put_point(key, failed)
            if job_dir is not None:
                write_record(job_dir / RECORD_FILE, failed)

        try:
            with on_server_lost(lost):
                ref = open_reference(cfg, inputs, sessions)
                target = resolve(cfg.kind, cfg.tensor, cfg.layer, ref.info, ref.backend.nodes, cfg.expert)
                prompts = tuple(cfg.metrics.prompts) if generate_here else ()
                out = run_point(ref, target, fmt, cfg.run.progress, store, kld=cfg.metrics.kld, prompts=prompts,
                                max_new_tokens=cfg.metrics.max_new_tokens, stop=stop,
                                baseline_logits=cfg.metrics.baseline_logits, prefix=prefix_settings(cfg))
                rec = record(ref, target, fmt, out, alpha=cfg.metrics.alpha)
        except Exception as e:  # recorded, and the sweep goes on
            log.debug("point failed", exc_info=True)
            rec = failed_record(cfg, fmt.label, layers, inputs, e)
        rec.update(key=key, started_at=started, finished_at=time.time())
        store.put_point(key, rec)
    assert rec is not None  # stored, computed or failed above
    if job_dir is not None:
        write_record(job_dir / RECORD_FILE, rec)
    print(describe(rec) + (" [stored]" if reused else ""), flush=True)
    return rec


def job_key(cfg: DictConfig, model_sha256: str, data_sha256: str, layers: tuple[int, ...]) -> str:
    """The store key of this job's point: everything that determines its result (the planner asks it too, to
    count the points a sweep will not recompute).

    Not in the key: metrics.baseline_logits (store and recompute give the same numbers, tests/test_vocab.py), like
    run.threads; the record says which was used."""
    stop = stop_rule(cfg.metrics)
    fmt = make_format(**cfg.fmt)
    # metrics.generate: true checks every point in its job; top:N only the worst, after the sweep (gencheck.py)
    generate_here = generation_mode(cfg.metrics.generate) is None
    expert = parse_experts(cfg.expert, model_info(resolve_model_path(cfg.model.path)))
    return point_key(model_sha256=model_sha256, container=cfg.model.container, data_sha256=data_sha256,
                     n_ctx=cfg.data.n_ctx, n_windows=cfg.data.n_windows, kind=cfg.kind, tensor=cfg.tensor,
                     layers=layers, fmt=fmt.key_fields(), kld=cfg.metrics.kld, alpha=cfg.metrics.alpha,
                     prompts=list(cfg.metrics.prompts) if generate_here else [],
                     max_new_tokens=cfg.metrics.max_new_tokens, **({"early_stop": stop.key()} if stop else {}),
                     **({"imatrix_sha256": sha256(Path(fmt.imatrix))} if fmt.imatrix else {}),
                     **({"recipe_sha256": sha256(Path(fmt.recipe))} if fmt.recipe else {}),
                     runtime=runtime_identity(compute_settings(cfg.model.container, cfg.model.n_gpu_layers,
                                                               cfg.model.rpc)),
                     # absent for the whole stack, and for the F32 container: keys as before
                     **({"experts": list(expert)} if expert else {}),
                     **({"native_weights": str(cfg.model.native_weights)} if cfg.model.container == "native"
                        else {}))


def prefix_settings(cfg: DictConfig) -> PrefixSettings:
    """run.prefix_reuse / run.prefix_stages / run.prefix_starts; stages and residuals are cached where the F32
    containers are."""
    cache = cache_root(cfg.model.cache_dir)
    starts = cfg.run.prefix_starts
    return PrefixSettings(bool(cfg.run.prefix_reuse), int(cfg.run.prefix_stages), cache,
                          None if starts is None else tuple(int(s) for s in starts))


def stop_rule(metrics_cfg) -> StopRule | None:
    """The early-stopping rule of this sweep, if it has one (conf/metrics/default.yaml explains the parameters)."""
    if not metrics_cfg.early_stop.enabled:
        return None
    return StopRule(str(metrics_cfg.rank_by), EarlyStop(**metrics_cfg.early_stop), float(metrics_cfg.alpha))


TRACEBACK_CHARS = 4000  # the end of a failed point's traceback kept in its record: where it failed, not the whole stack


def failed_record(cfg, fmt_label: str, layers, inputs, error: Exception) -> Record:
    return Record(
        layer=layers[0] if len(layers) == 1 else None, layers=",".join(map(str, layers)) or "-",
        tensor=cfg.tensor, kind=cfg.kind, fmt=fmt_label, status="failed",
        **({"expert": _expert_label(cfg, inputs)} if inputs.info.n_experts else {}),
        reason=f"{type(error).__name__}: {error}".splitlines()[0],
        traceback="".join(traceback.format_exception(error))[-TRACEBACK_CHARS:],
        container=cfg.model.container, model=inputs.source.name, model_sha256=inputs.model_sha256,
        data_source=inputs.text.source, n_windows=cfg.data.n_windows, n_ctx=cfg.data.n_ctx,
    )


def _expert_label(cfg, inputs) -> str:
    try:
        return expert_label(parse_experts(cfg.expert, inputs.info))
    except Exception:  # the point failed; its label must not fail too
        return str(cfg.expert)
