"""The response law of the map: a tensor's damage at one format, predicted from its damage measured at another.

    KLD(T, t) = KLD(T, c) * (e(T, t) / e(T, c)) ** alpha[class of T]

e is the weight error of weight_error.py (weighted by the input statistics), c the tensor's calibration format,
measured exactly. The exponent is fitted per class on the *check* tensors, a few per class measured at a second
format (least squares in log space, through the calibration point). Small perturbations act through the loss's
curvature, so the damage is linear in the error energy (alpha = 1); the fit says how far a class departs from that
over the grid's range (docs/estimate.md has the figures that chose this law).

The interval of a prediction is the law's own miss on the check points, measured leave-one-tensor-out, beside the
calibration point's standard error. The fit's check refuses the map when a check point misses by more than the
tolerance, or when a calibration record's measured error is not the one computed for its (tensor, format): a point
measured on another weight or format, or a planted one, never calibrates silently.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import SweepError

Z95 = 1.959963984540054  # the two-sided 95% normal quantile
FLOOR = 1e-12  # damages below it (a no-op, a format that holds the weight exactly) are not logged


@dataclass(frozen=True)
class Exact:
    """One exactly measured point: its damage, the damage's standard error, the record's relative squared error."""

    kld: float
    stderr: float
    rel_mse: float = math.nan


@dataclass(frozen=True)
class Prediction:
    tensor: str
    fmt: str
    kld: float
    lo: float  # 95% prediction interval
    hi: float
    calibrated_by: str  # the exact format it was scaled from


@dataclass
class Fit:
    alpha: dict[str, float]  # class -> exponent
    sigma: dict[str, float]  # class -> the law's leave-one-out miss (log space, root mean square)
    checks: list[dict[str, Any]] = field(default_factory=list)  # per check point: its miss (log_ratio), ...


def _alpha(pairs: Sequence[tuple[float, float]]) -> float:
    """Least squares through the origin of dlog(KLD) on dlog(e); 1 without pairs."""
    x = np.array([p[0] for p in pairs], float)
    y = np.array([p[1] for p in pairs], float)
    if not len(x) or not np.any(x):
        return 1.0
    return float(np.dot(x, y) / np.dot(x, x))


def _log(v: float) -> float:
    return math.log(max(v, FLOOR))


def fit(classes: Mapping[str, str], errors: Mapping[tuple[str, str], float], exact: Mapping[tuple[str, str], Exact],
        calibration: Mapping[str, str], tolerance: float) -> Fit:
    """The law's exponents and misses from the check points (every exact point of a tensor besides its
    calibration), then the check. classes: tensor -> class; errors: (tensor, fmt) -> weighted error; calibration:
    tensor -> its calibration format."""
    pairs: dict[str, list[tuple[str, str, float, float]]] = {}  # class -> (tensor, fmt, dlog e, dlog kld)
    for (tensor, fmt), point in exact.items():
        c = calibration.get(tensor)
        if c is None or fmt == c or (tensor, c) not in exact:
            continue
        if min(errors[tensor, fmt], errors[tensor, c], point.kld, exact[tensor, c].kld) <= 0:
            continue  # a format that holds the weight exactly (a no-op) tells nothing about the law's slope
        dx = math.log(errors[tensor, fmt] / errors[tensor, c])
        dy = _log(point.kld) - _log(exact[tensor, c].kld)
        pairs.setdefault(classes[tensor], []).append((tensor, fmt, dx, dy))
    alpha: dict[str, float] = {}
    sigma: dict[str, float] = {}
    checks: list[dict[str, Any]] = []
    for cls in sorted(set(classes.values())):
        mine = pairs.get(cls, [])
        alpha[cls] = _alpha([(dx, dy) for _, _, dx, dy in mine])
        misses = []
        for tensor, fmt, dx, dy in mine:  # leave the tensor out of its own exponent
            a = _alpha([(x, y) for t, _, x, y in mine if t != tensor])
            misses.append(dy - a * dx)
            checks.append({"tensor": tensor, "fmt": fmt, "class": cls, "alpha_without": a, "log_step": dx,
                           "log_ratio": dy - a * dx})
        sigma[cls] = float(np.sqrt(np.mean(np.square(misses)))) if misses else math.nan
    pooled = [c["log_ratio"] for c in checks]
    default_sigma = float(np.sqrt(np.mean(np.square(pooled)))) if pooled else math.log(2)
    sigma = {cls: s if math.isfinite(s) and len(pairs.get(cls, [])) >= 3 else max(s if math.isfinite(s) else 0,
                                                                                      default_sigma)
             for cls, s in sigma.items()}
    result = Fit(alpha, sigma, checks)
    check(result, exact, calibration, tolerance)
    return result


def check(result: Fit, exact: Mapping[tuple[str, str], Exact], calibration: Mapping[str, str],
          tolerance: float) -> None:
    """SweepError when a check point misses by more than a factor `tolerance`."""
    worst = max(result.checks, key=lambda c: abs(c["log_ratio"]), default=None)
    if worst is not None and abs(worst["log_ratio"]) > math.log(tolerance):
        c = calibration[worst["tensor"]]
        raise SweepError(
            f"the map's check failed: {worst['tensor']} {worst['fmt']} measured KLD "
            f"{exact[worst['tensor'], worst['fmt']].kld:.3g}, the law predicts "
            f"{exact[worst['tensor'], worst['fmt']].kld / math.exp(worst['log_ratio']):.3g} from its {c} point "
            f"({math.exp(abs(worst['log_ratio'])):.1f}x off, run.map_tolerance={tolerance:g}): a calibration point "
            f"is wrong or the law does not hold for this model; run the grid exactly (run.estimate=off)")


def check_calibration(tensor: str, fmt: str, measured_rel_mse: float, computed: float, rtol: float = 0.05) -> None:
    """A calibration record must have measured the error the map computes for its (tensor, format)."""
    if not (math.isfinite(measured_rel_mse) and measured_rel_mse > 0):
        raise SweepError(f"the map's calibration point {tensor} {fmt} has no measured error (rel_mse): it was not "
                         f"measured as a weight point of that format")
    if abs(math.log(measured_rel_mse / computed)) > math.log1p(rtol):
        raise SweepError(f"the map's calibration point {tensor} {fmt} measured a relative error of "
                         f"{measured_rel_mse:.4g}, but {fmt} of that weight has {computed:.4g}: the point was "
                         f"measured on another weight or format; remove its record (run.store) and run again")


def predict(result: Fit, cls: str, tensor: str, fmt: str, errors: Mapping[tuple[str, str], float],
            calibration_fmt: str, calibration: Exact) -> Prediction:
    a = result.alpha.get(cls, 1.0)
    if errors[tensor, fmt] == 0:  # the format holds the weight exactly: no damage, no doubt
        return Prediction(tensor, fmt, 0.0, 0.0, 0.0, calibration_fmt)
    ratio = errors[tensor, fmt] / errors[tensor, calibration_fmt]
    kld = calibration.kld * ratio ** a
    rel = calibration.stderr / calibration.kld if calibration.kld > FLOOR and math.isfinite(calibration.stderr) \
        else 0.0
    sigma = result.sigma.get(cls, math.log(2))
    # the law's miss grows with how far it extrapolates: sigma was measured at the check points' typical step
    width = Z95 * math.hypot(sigma * abs(math.log(ratio)) / _typical_step(result, cls), rel)
    return Prediction(tensor, fmt, kld, kld * math.exp(-width), kld * math.exp(width), calibration_fmt)


def _typical_step(result: Fit, cls: str) -> float:
    """The median |log e(t) - log e(c)| of the class's check points (of every class where it has none)."""
    steps = [abs(c["log_step"]) for c in result.checks if c["class"] == cls] or \
        [abs(c["log_step"]) for c in result.checks]
    return max(1e-9, float(np.median(steps))) if steps else 1.0
