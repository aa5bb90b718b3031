"""`metrics.generate=top:N`: the generation check for only the N points that rank worst, after the sweep.

Greedy completions decode one token at a time through the whole model and its full-vocabulary output: with a
262k vocabulary that took a quarter of a 4-window point. Run for every point it is the largest cost after scoring;
it matters most for the points that damage the model most. So the jobs score only, and when the multirun ends the
launching process (Hydra's GatherResults callback) loads each of the N worst points' configuration from its job
directory (`.hydra/config.yaml`), applies its perturbation once more, generates, and adds the comparison to the
point's record and to the table. Results are cached in the store by point and prompts.

It never holds a second copy of the model: where the jobs ran in this process (the basic launcher), it runs on the
session they left open (`Sessions.current()`); a cluster launcher runs it as a task of its own
(sweep/cluster/launcher.py), never in the launching process.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from ..quant.apply import applied
from ..scoring.generation import compare, complete
from ..scoring.metrics import worst_first
from ..store.record import RECORD_FILE, read_json, read_record, write_json, write_record
from ..store.records import find_records, point_key
from .point import baseline_completions, matched_targets, point_backend
from .reference import open_reference
from .session import Sessions
from .settings import JobSettings, job_settings, quiet

log = logging.getLogger(__name__)


def worst_keys(df: pd.DataFrame, metric: str, n: int) -> list[str]:
    """Keys of the n measured points that rank worst by `metric` (as the ranking orders; diverged points have no
    completion worth comparing)."""
    ok = df[df["status"] == "ok"]
    if ok.empty or metric not in ok:
        return []
    return list(ok.assign(_damage=worst_first(ok, metric)).sort_values("_damage", ascending=False)["key"].head(n))


def check_worst(df: pd.DataFrame, sweep_dir: Path, metric: str, n: int) -> pd.DataFrame:
    """The table with the generation check added for its n worst points; their job records are updated too."""
    keys = worst_keys(df, metric, n)
    if not keys:
        return df
    job_dirs = {}
    for path in find_records([sweep_dir]):
        rec = read_record(path)
        if rec and rec.get("key") in keys:
            job_dirs[rec["key"]] = path.parent
    df = df.copy()
    # The sweep's own sessions when this process ran its jobs (Hydra's basic launcher): their model is still loaded,
    # and a session of the check's own would load it a second time beside it. Elsewhere (a cluster task, the
    # launching process of jobs run elsewhere) one of its own, closed at the end.
    shared = Sessions.current()
    with nullcontext(shared) if shared is not None else Sessions() as sessions:
        for key in keys:
            df = _check_one(df, key, job_dirs.get(key), sessions)
    return df


def _check_one(df: pd.DataFrame, key: str, job_dir: Path | None, sessions: Sessions) -> pd.DataFrame:
    if job_dir is None or not (job_dir / ".hydra" / "config.yaml").exists():
        log.warning("generation check: no job configuration for point %s, skipped", key)
        return df
    # the job's composed configuration: the entry of this check, read into its settings here
    composed = OmegaConf.load(job_dir / ".hydra" / "config.yaml")
    if not isinstance(composed, DictConfig):  # a list, not a job's configuration
        log.warning("generation check: the job configuration of point %s is not a mapping, skipped", key)
        return df
    settings = quiet(job_settings(composed))
    fields = check_point(settings, key, sessions)
    rec = read_record(job_dir / RECORD_FILE)
    if rec is None:  # unreadable since the job wrote it: the table gets the check, the record stays as it is
        log.warning("generation check: the record of point %s cannot be read, not updated", key)
    else:
        rec.update(fields)
        write_record(job_dir / RECORD_FILE, rec)
    for name, value in fields.items():
        if name not in df:
            df[name] = pd.Series([None] * len(df), dtype=object, index=df.index)
        df.loc[df["key"] == key, name] = value
    return df


def check_point(s: JobSettings, key: str, sessions: Sessions) -> dict:
    """The generation check of one point (its job's settings), cached in the store."""
    prompts, max_new = s.metrics.prompts, s.metrics.max_new_tokens
    gen_key = point_key(point=key, prompts=list(prompts), max_new_tokens=max_new)
    store_file = s.run.store / "generations" / f"{gen_key}.json"
    cached = read_json(store_file)  # the generation columns of the point (checked when added to its record)
    if cached is not None:
        return cached
    ref = open_reference(s, sessions=sessions)
    target = s.point.target(ref.info, ref.backend.nodes)
    matched = matched_targets(ref.container, ref.info, target, ref.native_weights)
    with point_backend(ref, matched) as backend:
        expected = baseline_completions(backend, ref, matched, prompts, max_new)
        with applied(backend, target, s.point.fmt):
            got = complete(backend, prompts, max_new)
    fields = {**compare(got, expected), "generation_checked": "top"}
    write_json(store_file, fields)
    return fields
