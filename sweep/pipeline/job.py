"""One job of a sweep: reuse the stored record of this point, or compute it; either way record it in the job dir.

A job never takes the sweep down: anything that goes wrong inside a point is recorded as `failed` with the reason,
and the next point runs. Bad configuration is caught before any job starts (see `grid.py`).
"""

from __future__ import annotations

import logging
import time
import traceback
from pathlib import Path

from omegaconf import DictConfig

from ..cores import available_cores
from ..llama.container import runtime_identity
from ..llama.model_file import sha256
from ..llama.rpc import on_server_lost
from ..quant.experts import label as expert_label
from ..quant.experts import parse_experts
from ..quant.targets import parse_layers
from ..store.record import RECORD_FILE, Record, write_record
from ..store.records import Store, point_key
from .map_job import run_map_job
from .point import describe, record, run_point
from .reference import Inputs, load_inputs, open_reference
from .session import Sessions
from .settings import JobSettings, job_settings, settled, with_threads

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
    """One point: `sessions` holds the loaded model, shared with the jobs before and after this one. The entry of a
    job: its settings are read from `cfg` here, once. The map's own job (run.map_job set: map_job.py) records no
    point."""
    s = job_settings(cfg)
    s = settled(with_threads(s, s.run.threads or cores_for_this_job(launcher_cfg)),
                launcher_cfg)  # (a sweep's jobs come with it settled: grid.py)
    if s.run.map_job:
        try:
            run_map_job(s, open_reference(s, load_inputs(s), sessions), Store(s.run.store))
        except Exception as e:  # said; the end of the sweep says the map has no errors to predict from
            log.debug("the map's job failed", exc_info=True)
            print(f"map: the statistics job failed: {type(e).__name__}: {e}", flush=True)
        return None
    return run_settled_job(s, sessions, job_dir)


def run_settled_job(s: JobSettings, sessions: Sessions, job_dir: Path | None = None) -> Record:
    store = Store(s.run.store)
    fmt = s.point.fmt
    inputs = load_inputs(s)
    layers = parse_layers(s.point.layer, inputs.info.n_layers)
    key = job_key(s, inputs.model_sha256, inputs.text.sha256, layers, parse_experts(s.point.expert, inputs.info))
    rec = store.point(key)
    reused = rec is not None
    if reused:
        log.info("already done (record %s), not recomputed", key)
    else:
        started = time.time()

        def lost(reason: str) -> None:  # llama.cpp is aborting (an RPC server gone): the point fails, rerun retries
            failed = failed_record(s, layers, inputs, RuntimeError(reason))
            failed.update(key=key, started_at=started, finished_at=time.time())
            store.put_point(key, failed)
            if job_dir is not None:
                write_record(job_dir / RECORD_FILE, failed)

        try:
            with on_server_lost(lost):
                ref = open_reference(s, inputs, sessions)
                target = s.point.target(ref.info, ref.backend.nodes)
                m = s.metrics
                out = run_point(ref, target, fmt, s.run.progress, store, kld=m.kld, prompts=m.prompts_here,
                                max_new_tokens=m.max_new_tokens, stop=m.stop, baseline_logits=m.baseline_logits,
                                prefix=s.run.prefix)
                rec = record(ref, target, fmt, out, alpha=m.alpha)
        except Exception as e:  # recorded, and the sweep goes on
            log.debug("point failed", exc_info=True)
            rec = failed_record(s, layers, inputs, e)
        rec.update(key=key, started_at=started, finished_at=time.time())
        store.put_point(key, rec)
    assert rec is not None  # stored, computed or failed above
    if job_dir is not None:
        write_record(job_dir / RECORD_FILE, rec)
    print(describe(rec) + (" [stored]" if reused else ""), flush=True)
    return rec


def job_key(s: JobSettings, model_sha256: str, data_sha256: str, layers: tuple[int, ...],
            experts: tuple[int, ...]) -> str:
    """The store key of this job's point: everything that determines its result (the planner asks it too, to
    count the points a sweep will not recompute).

    Not in the key: metrics.baseline_logits (store and recompute give the same numbers, tests/test_vocab.py), like
    run.threads; the record says which was used."""
    m, fmt, model = s.metrics, s.point.fmt, s.model
    return point_key(model_sha256=model_sha256, container=model.container, data_sha256=data_sha256,
                     n_ctx=s.data.n_ctx, n_windows=s.data.n_windows, kind=s.point.kind, tensor=s.point.tensor,
                     layers=layers, fmt=fmt.key_fields(), kld=m.kld, alpha=m.alpha,
                     # metrics.generate: true checks every point in its job; top:N only the worst, after the sweep
                     # (gencheck.py)
                     prompts=list(m.prompts_here), max_new_tokens=m.max_new_tokens,
                     **({"early_stop": m.stop.key()} if m.stop else {}),
                     **({"imatrix_sha256": sha256(Path(fmt.imatrix))} if fmt.imatrix else {}),
                     **({"recipe_sha256": sha256(Path(fmt.recipe))} if fmt.recipe else {}),
                     runtime=runtime_identity(model.compute),
                     # absent for the whole stack, and for the F32 container: keys as before
                     **({"experts": list(experts)} if experts else {}),
                     **({"native_weights": model.native_weights} if model.container == "native" else {}))


TRACEBACK_CHARS = 4000  # the end of a failed point's traceback kept in its record: where it failed, not the whole stack


def failed_record(s: JobSettings, layers, inputs: Inputs, error: Exception) -> Record:
    return Record(
        layer=layers[0] if len(layers) == 1 else None, layers=",".join(map(str, layers)) or "-",
        tensor=s.point.tensor, kind=s.point.kind, fmt=s.point.fmt.label, status="failed",
        **({"expert": _expert_label(s.point.expert, inputs)} if inputs.info.n_experts else {}),
        reason=f"{type(error).__name__}: {error}".splitlines()[0],
        traceback="".join(traceback.format_exception(error))[-TRACEBACK_CHARS:],
        container=s.model.container, model=inputs.source.name, model_sha256=inputs.model_sha256,
        data_source=inputs.text.source, n_windows=s.data.n_windows, n_ctx=s.data.n_ctx,
    )


def _expert_label(expert, inputs: Inputs) -> str:
    try:
        return expert_label(parse_experts(expert, inputs.info))
    except Exception:  # the point failed; its label must not fail too
        return str(expert)
