"""The map's own job (run.estimate=map): the input statistics in one decode, then every cell's weight error.

The sweeper launches it first, beside the calibration and check points (grid.py splits the grid, estimate/plan.py
chooses). It decodes the sweep's windows once with a matmul observer (llama-imatrix's statistic: per weight, the
mean square of each input column, llama/input_stats.py), kept in the store under the model, container, text and slice
(a later map of the same slice decodes nothing), and writes the weighted and unweighted error of every (tensor,
format) of the map into the sweep directory (estimate/plan.ERRORS_FILE), quantized by ggml as the exact point would
be. The end of the sweep predicts from them (estimate/rows.py).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from ..errors import SweepError
from ..estimate.plan import ERRORS_FILE, MapPlan
from ..estimate.weight_error import weight_errors
from ..files import atomic_write_bytes
from ..llama.container import runtime_identity
from ..llama.input_stats import collect
from ..llama.quantize import dequantized_weight
from ..quant.formats import make_format
from ..quant.imatrix_file import Imatrix, load, write_gguf
from ..store.records import Store, point_key
from .reference import Reference
from .settings import ModelSettings, ScoreSettings

log = logging.getLogger(__name__)


def statistics_path(store: Store, ref: Reference, model: ModelSettings) -> Path:
    """Where the input statistics of this model, container, text and slice are kept."""
    key = point_key(map_statistics=True, model_sha256=ref.model_sha256, container=ref.container,
                    data_sha256=ref.text.sha256, n_ctx=ref.windows.n_ctx, n_windows=ref.windows.n_windows,
                    runtime=runtime_identity(model.compute))
    return store.root / "map" / f"{key}.imatrix.gguf"


def run_map_job(s: ScoreSettings, ref: Reference, store: Store) -> dict:
    """Statistics (stored or decoded now) and the weight errors of every cell of the map in s.run.map_job."""
    if s.run.map_job is None:
        raise SweepError("the map's job needs run.map_job (the sweeper sets it)")
    sweep_dir = Path(s.run.map_job).parent
    plan = MapPlan.read(sweep_dir)
    if plan is None:
        raise SweepError(f"{s.run.map_job} is missing: the map's job runs inside the sweep that planned it")
    started = time.time()
    stats_file = statistics_path(store, ref, s.model)
    decoded_blocks = 0
    if not stats_file.is_file():
        col = collect(ref.backend, ref.windows.tokens, progress=s.run.progress)
        quiet = logging.getLogger("gguf")  # (gguf's writer says INFO lines about its file: not the user's news)
        level, quiet.level = quiet.level, logging.WARNING
        try:
            write_gguf(stats_file, Imatrix(col.sums, col.counts, chunk_count=ref.windows.n_windows,
                                           chunk_size=ref.windows.n_ctx, datasets=[str(ref.text.source)]))
        finally:
            quiet.setLevel(level)
        decoded_blocks = ref.info.n_layers
    stats = load(stats_file)
    by_weight: dict[str, dict] = {}
    for c in plan.cells:
        by_weight.setdefault(c.name, {"cell": c, "fmts": {}})["fmts"][c.fmt] = make_format(**c.params)
    errors, weights = [], {}
    for name, entry in by_weight.items():
        c = entry["cell"]
        if c.tensor not in weights:  # (one stack read once for every expert asked of it)
            weights = {c.tensor: dequantized_weight(ref.backend, c.tensor)}
        w = weights[c.tensor]
        stat = stats.get(c.tensor)
        if stat is not None:
            stat = stat.reshape(-1, w.shape[-1])
            stat = stat[0] if len(stat) == 1 else stat  # per expert of a stack: (n_experts, n_cols)
        if c.experts:
            w = w[list(c.experts)]
            stat = stat[list(c.experts)] if stat is not None and stat.ndim == 2 else stat
        for fmt, e in weight_errors(w, entry["fmts"], c.tensor, stat, ref.threads).items():
            errors.append({"weight": name, "fmt": fmt, "weighted": e.weighted, "unweighted": e.unweighted})
    out = {"statistics": str(stats_file), "decoded_blocks": decoded_blocks, "n_windows": ref.windows.n_windows,
           "seconds": time.time() - started, "errors": errors}
    atomic_write_bytes(sweep_dir / ERRORS_FILE, json.dumps(out, indent=1).encode())
    print(f"map: input statistics {'decoded now' if decoded_blocks else 'from the store'} ({stats_file.name}), "
          f"weight errors of {len(errors)} cells over {len(by_weight)} weights in {out['seconds']:.1f} s", flush=True)
    return out
