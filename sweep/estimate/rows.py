"""The table with the map's predictions: every point of a run.estimate=map sweep gets a row, `estimated` says which.

`gather_table` is the table every reader uses (the end of the sweep, `sweep report`, `sweep recipe`): the records,
plus, for each sweep directory holding a map plan (plan.MAP_FILE) and its weight errors (plan.ERRORS_FILE), one
predicted row per point the map did not measure. A predicted row has the point's axes, the inputs of its
calibration point (model, text, slice, container), the weight's storage in its format and its error, and the
predicted KLD with its 95% prediction interval (`estimate_lo`, `estimate_hi`) and the exact point it was scaled
from (`calibrated_by`); it has no ΔNLL, PPL or per-window means. A point measured exactly -- in this sweep or in
another gathered with it, e.g. by `sweep recipe --refine` -- replaces its prediction.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import SweepError
from ..files import atomic_write_bytes
from ..store.columns import BY_NAME, SORT
from ..store.records import gather
from . import law
from .plan import ERRORS_FILE, FIT_FILE, MapPlan

# one point of a model, text and slice: an exact row replaces the prediction of the same point
IDENTITY = ("model_sha256", "data_sha256", "n_ctx", "n_windows", "container", "kind", "targets", "fmt", "expert")
KEPT_ROLES = ("point", "input")  # a predicted row keeps these columns of its calibration point
SAME = ("imatrix_used", "imatrix_missing", "bytes_orig", "bpw_orig", "n_tokens", "targets")  # and these


def gather_table(paths: Iterable[Path]) -> pd.DataFrame:
    """The records under `paths`, with the predictions of every map among them; `estimated` on every row."""
    paths = [Path(p) for p in paths]
    return with_predictions(gather(paths), paths)


def with_predictions(df: pd.DataFrame, paths: list[Path]) -> pd.DataFrame:
    """`df`, the gathered records of `paths`, with the predictions of every map among them (gather_table)."""
    if df.empty:
        return df
    df = df.assign(estimated=False)
    # a map is calibrated by its own sweep's records: `df` itself when it is the only directory
    predicted = [p for p in (predictions(d, df if paths == [d] else gather([d])) for d in paths
                             if d.is_dir() and MapPlan.read(d)) if not p.empty]
    if not predicted:
        return df
    extra = pd.concat(predicted, ignore_index=True)
    exact = set(map(tuple, df[[c for c in IDENTITY if c in df]].astype(str).itertuples(index=False)))
    keep = [tuple(r) not in exact for r in extra[[c for c in IDENTITY if c in df]].astype(str).itertuples(index=False)]
    out = pd.concat([df, extra[keep]], ignore_index=True)
    for c in ("layer",):
        out[c] = out[c].astype(pd.api.types.pandas_dtype(BY_NAME[c].table_dtype or "object"))
    # (the q-values are the measured points' own, from gather: a prediction is not a test)
    return out.sort_values([c for c in SORT if c in out]).reset_index(drop=True)


def _errors(sweep_dir: Path) -> dict:
    path = sweep_dir / ERRORS_FILE
    if not path.is_file():
        raise SweepError(f"{sweep_dir} holds a map (run.estimate=map) without its weight errors ({ERRORS_FILE}): "
                         f"its statistics job did not finish; run the sweep again (finished points are reused)")
    return json.loads(path.read_text())


def predictions(sweep_dir: Path, table: pd.DataFrame) -> pd.DataFrame:
    """The predicted rows of the map in `sweep_dir`, calibrated by `table`, the exact records of that sweep (its
    model, text and slice, whatever else is gathered beside it); the fit is written to plan.FIT_FILE. SweepError when
    the fit's check fails (law.py)."""
    plan = MapPlan.read(sweep_dir)
    assert plan is not None
    data = _errors(sweep_dir)
    weighted = {(e["weight"], e["fmt"]): e["weighted"] for e in data["errors"]}
    unweighted = {(e["weight"], e["fmt"]): e["unweighted"] for e in data["errors"]}
    measured = table[(table["kind"] == "weight") & table["status"].isin(["ok", "no-op"])]
    rows = {(str(r["targets"]), _expert(r.get("expert")), str(r["fmt"])): r for _, r in measured.iterrows()}
    exact: dict[tuple[str, str], law.Exact] = {}
    found: dict[tuple[str, str], pd.Series] = {}
    for c in plan.cells:
        r = rows.get((c.tensor, _expert(c.expert), c.fmt))
        if r is not None:
            found[c.name, c.fmt] = r
            exact[c.name, c.fmt] = law.Exact(float(r["kld_mean"]), _float(r.get("kld_stderr")),
                                             _float(r.get("rel_mse")))
    calibration = {t: f for t, f in plan.calibration.items() if (t, f) in exact}
    # a calibration point whose format holds the weight exactly (a no-op: the source's own grid) has no damage to
    # scale from: its tensor's other points are not predicted, and the summary says so
    held = {t for t, f in calibration.items() if found[t, f]["status"] == "no-op" or unweighted[t, f] == 0}
    calibration = {t: f for t, f in calibration.items() if t not in held}
    for tensor, fmt in calibration.items():
        law.check_calibration(tensor, fmt, exact[tensor, fmt].rel_mse, unweighted[tensor, fmt])
    classes = {c.name: c.cls for c in plan.cells}
    fit = law.fit(classes, weighted, exact, calibration, plan.tolerance)
    out = []
    for c in plan.cells:
        if (c.name, c.fmt) in exact or c.name not in calibration:
            continue
        cal = calibration[c.name]
        p = law.predict(fit, c.cls, c.name, c.fmt, weighted, cal, exact[c.name, cal])
        out.append(_row(found[c.name, cal], c.fmt, c.stored, p, unweighted[c.name, c.fmt], c.bpw))
    try:  # beside the plan, for the summary and the reader; a sweep directory one may not write is read all the same
        atomic_write_bytes(sweep_dir / FIT_FILE, json.dumps({"alpha": fit.alpha, "sigma": fit.sigma,
                                                             "checks": fit.checks, "calibration": calibration,
                                                             "no_op_calibration": sorted(held),
                                                             "predicted": len(out)}, indent=1).encode())
    except OSError:
        pass
    return pd.DataFrame(out)


def _expert(v) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)


def _float(v) -> float:
    return float(v) if v is not None and pd.notna(v) else math.nan


def _row(calibration: pd.Series, fmt: str, stored: str, p: law.Prediction, rel: float, bpw: float) -> dict:
    row = {k: v for k, v in calibration.items() if k in BY_NAME and (BY_NAME[k].role in KEPT_ROLES or k in SAME)}
    n = calibration.get("n_elements")
    exact = rel == 0  # the format holds the weight exactly: nothing would change, and the row says so
    row.update(fmt=fmt, status="no-op" if exact else "ok",
               reason=f"{fmt} holds the weight exactly (its weight error is 0): predicted, not measured" if exact
               else None, kld_mean=p.kld, estimate_lo=p.lo, estimate_hi=p.hi,
               estimated=True, calibrated_by=f"{p.calibrated_by} (key {calibration['key']})",
               ggml_type=stored, fallback_from=fmt if stored != fmt else None, bpw=bpw, rel_mse=rel,
               sqnr_db=-10 * math.log10(rel) if rel > 0 else math.inf, n_elements=n,
               bytes=float(n) * bpw / 8 if n is not None and pd.notna(n) else np.nan,
               key=f"estimated-{calibration['key']}-{fmt}", finished_at=calibration.get("finished_at"))
    return row


def spent_line(df: pd.DataFrame, sweep_dir: Path) -> str:
    """What the table's points cost in decode: layer-tokens (blocks x tokens) of its measured points, and of the
    map's statistics; with a map, what it predicted and from what."""
    exact = df[~df["estimated"].astype(bool)] if "estimated" in df else df
    per_point = exact["decoded_blocks"].fillna(0) * exact["n_windows"].fillna(0) * exact["n_ctx"].fillna(0) \
        if "decoded_blocks" in exact else pd.Series(dtype=float)
    spent = float(per_point.sum())
    line = f"decoded {spent:,.0f} layer-tokens for the {len(exact)} measured points"
    plan = MapPlan.read(sweep_dir)
    if plan is None:
        return line
    errors = json.loads((sweep_dir / ERRORS_FILE).read_text()) if (sweep_dir / ERRORS_FILE).is_file() else {}
    stats = float(errors.get("decoded_blocks", 0)) * float(exact["n_windows"].max()) * float(exact["n_ctx"].max())
    n_pred = int(df["estimated"].astype(bool).sum()) if "estimated" in df else 0
    fit = json.loads((sweep_dir / FIT_FILE).read_text()) if (sweep_dir / FIT_FILE).is_file() else {}
    worst = max((abs(c["log_ratio"]) for c in fit.get("checks", [])), default=math.nan)
    held = fit.get("no_op_calibration", [])
    unpredicted = (f"; not predicted: {len(held)} tensors whose calibration point is a no-op (its format holds the "
                   f"weight exactly), e.g. {held[0]}: set run.map_calibrate to another format" if held else "")
    return (f"{line} + {stats:,.0f} for the map's input statistics; map: {n_pred} points predicted from "
            f"{len(fit.get('calibration', {}))} calibration and {len(fit.get('checks', []))} check points "
            f"(exponents {', '.join(f'{c} {a:.2f}' for c, a in fit.get('alpha', {}).items())}; the check points' "
            f"worst miss {math.exp(worst):.2f}x, tolerance {plan.tolerance:g}x){unpredicted}")
