"""Which format: fake quantizers built on ml_dtypes (quantize, then dequantize back to float32).

A format maps a float32 array to a new float32 array of the same shape whose values are representable in the
format; the input is never modified. Make one with `make_format(name, **params)`.

  name      values                                                        params
  --------  ------------------------------------------------------------  ---------------------------------
  none      identity (a copy)                                             -
  zero      all zeros (debug: proves a hook is live)                      -
  bf16      cast to ml_dtypes.bfloat16 and back                           -
  fp16      cast to numpy float16 and back                                -
  int8      symmetric: scale = amax/127, q = rint(x/scale) in [-127, 127] granularity (default per_row)
  fp8_e4m3  ml_dtypes.float8_e4m3fn (max 448): scale = amax/448, then      scaled (default true), granularity
            cast; scaled=false: a plain saturating cast                   (default per_tensor; if scaled)
  fp8_e5m2  ml_dtypes.float8_e5m2 (max 57344): scale = amax/57344, then   scaled (default true), granularity
            cast; scaled=false: a plain saturating cast                   (default per_tensor; if scaled)
  int4      symmetric per group: scale = amax/7, q in [-7, 7]             group_size
  mxfp4     OCP MX: e2m1 elements (max 6), per group one power-of-two     group_size (the MX spec uses 32)
            scale X = 2**(floor(log2(amax)) - 2)

Policies
- Rounding is round-half-to-even everywhere (np.rint, and ml_dtypes'/numpy's casts).
- Rows are the last axis. For a weight of numpy shape (n_out, n_in) a row is an output channel; for an activation
  of shape (n_tokens, n_embd) a row is a token. `per_row` and `per_token` are the same computation, named for the
  role. A 1-D array (a norm weight) is one row. `per_tensor` uses one scale for the whole array.
- Groups (int4, mxfp4) are `group_size` consecutive elements along the last axis. The last axis must be divisible
  by group_size, else SweepError: no padding, so a group always means the same thing.
- int4 uses [-7, 7]: with scale = amax/7 the code -8 is never needed, and a symmetric grid keeps f(-x) = -f(x).
- fp8 is scaled by default, as fp8 is deployed (one amax scale per tensor): an unscaled cast puts typical weights
  (|w| ~ 0.01-0.05) into e4m3's subnormal range (below 2**-6 = 0.0156), whose steps are 2**-9 = 0.002 wide.
  `scaled=false` keeps the plain cast for studying exactly that, and its label says so (`fp8_e4m3/unscaled`).
- Overflow: bf16 and fp16 follow IEEE round-to-nearest-even: |x| from halfway past the max finite (65520 for
  fp16, (2 - 2**-8) * 2**127 for bf16) becomes +-inf, +-inf stays +-inf.
  Unscaled fp8 is a saturating cast: values beyond +-max (+-inf included) become +-max before the cast
  (e4m3fn has no inf, and ml_dtypes would give NaN).
- Scaled formats (int8, int4, mxfp4, fp8 with scaled=True) take the scale from the finite values only;
  +-inf saturate to +-(max representable * scale). A row/group whose finite amax is 0 gives zeros (its +-inf
  too: the scale is 0). An amax below float32's smallest normal (1.2e-38) is flushed to 0 as well, so that the
  scale never underflows and f(f(x)) == f(x) holds for every input.
- NaN stays NaN in every format except `zero` (which is all zeros by definition).
- Parameters a format does not use are validated, then reset to their defaults, so equal formats compare equal
  and print the same label. Input of another dtype is converted to float32 first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import ml_dtypes
import numpy as np

from .errors import SweepError

GRANULARITIES = ("per_tensor", "per_row", "per_token")
# int8 is deployed per output channel; fp8 with one scale per tensor (the common fp8 recipe for weights and
# activations alike). Every other format ignores granularity.
_DEFAULT_GRANULARITY = {"fp8_e4m3": "per_tensor", "fp8_e5m2": "per_tensor"}
_TINY = float(np.finfo(np.float32).tiny)  # flush-to-zero threshold for a block's amax (see module docstring)


@dataclass(frozen=True)
class Format:
    name: str  # registry key, e.g. "int8"
    granularity: str | None = None  # int8 and scaled fp8; None: the format's default (_DEFAULT_GRANULARITY)
    group_size: int = 32  # int4 / mxfp4
    scaled: bool = True  # fp8: scaled (amax -> format max, the default) or a plain saturating cast

    def __post_init__(self):
        if self.granularity is None:
            object.__setattr__(self, "granularity", _DEFAULT_GRANULARITY.get(self.name, "per_row"))
        if not isinstance(self.name, str) or self.name not in FORMATS:
            raise SweepError(f"unknown format {self.name!r}; valid formats: {', '.join(FORMATS)}")
        if self.granularity not in GRANULARITIES:
            raise SweepError(
                f"unknown granularity {self.granularity!r} for format {self.name}; "
                f"valid granularities: {', '.join(GRANULARITIES)}"
            )
        g = self.group_size
        if not isinstance(g, (int, np.integer)) or isinstance(g, bool) or g <= 0:
            raise SweepError(
                f"bad group_size {self.group_size!r} for format {self.name}; valid: a positive integer that divides "
                f"the last axis, e.g. 32"
            )
        if not isinstance(self.scaled, (bool, np.bool_)):
            raise SweepError(f"bad scaled {self.scaled!r} for format {self.name}; valid: true or false")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.array(x, dtype=np.float32)  # always a copy: the caller's array is never modified
        if x.size == 0:
            return x
        return FORMATS[self.name](x, self)

    @property
    def label(self) -> str:
        if self.name == "int8":
            return f"int8/{self.granularity}"
        if self.name.startswith("fp8"):
            return f"{self.name}/scaled/{self.granularity}" if self.scaled else f"{self.name}/unscaled"
        if self.name in ("int4", "mxfp4"):
            return f"{self.name}/g{self.group_size}"
        return self.name


# --- shared helpers ----------------------------------------------------------------------------------------------


def _block_len(x: np.ndarray, fmt: Format, grouped: bool) -> int:
    """Length of the blocks that share one scale; x.reshape(-1, block_len) puts one block per row."""
    last = x.shape[-1] if x.ndim else 1
    if grouped:
        if last % fmt.group_size:
            raise SweepError(
                f"{fmt.label}: last axis of length {last} (shape {x.shape}) is not divisible by group_size "
                f"{fmt.group_size}; choose a group_size that divides it"
            )
        return fmt.group_size  # groups are consecutive along the last axis, so a flat reshape finds them
    return x.size if fmt.granularity == "per_tensor" else last


def _blocks_amax(x: np.ndarray, block_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(blocks, amax): x as float64 blocks of one scale each, and each block's amax over finite values."""
    # float64 so that scale = amax/qmax cannot underflow and x/scale is correctly rounded before the final cast
    b = x.reshape(-1, block_len).astype(np.float64)
    amax = np.where(np.isfinite(b), np.abs(b), 0.0).max(axis=1, keepdims=True)
    return b, np.where(amax < _TINY, 0.0, amax)  # flush (see module docstring)


def _dequantize(x: np.ndarray, b: np.ndarray, scale: np.ndarray, qmax: float, grid: Callable) -> np.ndarray:
    """scale * grid(clip(b / scale)), NaN kept, +-inf saturated, scale 0 giving zeros; back in x's shape."""
    nan = np.isnan(b)
    v = b / np.where(scale > 0, scale, 1.0)  # a zero scale means the block is zero: divide by 1, multiply by 0
    v = np.clip(np.where(nan, 0.0, v), -qmax, qmax)  # clipping saturates +-inf; NaN must not reach int casts
    out = grid(v).astype(np.float64) * scale
    out[nan] = np.nan
    return out.astype(np.float32).reshape(x.shape)


# --- one function per format family ------------------------------------------------------------------------------


def _none(x, fmt):
    return x


def _zero(x, fmt):
    return np.zeros_like(x)


def _cast(dtype) -> Callable:
    def cast(x, fmt):
        with np.errstate(over="ignore"):  # IEEE overflow to +-inf is the documented behaviour, not an accident
            return x.astype(dtype).astype(np.float32)

    return cast


def _int(qmax: int, dtype, grouped: bool) -> Callable:
    def quantize(x, fmt):
        b, amax = _blocks_amax(x, _block_len(x, fmt, grouped))
        return _dequantize(x, b, amax / qmax, qmax, lambda v: np.rint(v).astype(dtype))

    return quantize


def _fp8(dtype) -> Callable:
    fmax = float(ml_dtypes.finfo(dtype).max)

    def quantize(x, fmt):
        if not fmt.scaled:
            return np.clip(x, -fmax, fmax).astype(dtype).astype(np.float32)  # saturating cast; NaN passes clip
        b, amax = _blocks_amax(x, _block_len(x, fmt, grouped=False))
        return _dequantize(x, b, amax / fmax, fmax, lambda v: v.astype(dtype))

    return quantize


def _mxfp4(x, fmt):
    b, amax = _blocks_amax(x, _block_len(x, fmt, grouped=True))
    # floor(log2(amax)) exactly: frexp gives amax = m * 2**e with m in [0.5, 1). 2 = emax of e2m1 (max 6 = 1.5 * 2**2).
    # The lower clamp keeps X inside E8M0's range (2**-127); only amax in [2**-126, 2**-125) needs it.
    scale = np.where(amax > 0, np.maximum(np.ldexp(1.0, np.frexp(amax)[1] - 1 - 2), 2.0**-127), 0.0)
    return _dequantize(x, b, scale, 6.0, lambda v: v.astype(ml_dtypes.float4_e2m1fn))


FORMATS: dict[str, Callable[[np.ndarray, Format], np.ndarray]] = {
    "none": _none,
    "zero": _zero,
    "bf16": _cast(ml_dtypes.bfloat16),
    "fp16": _cast(np.float16),
    "int8": _int(127, np.int8, grouped=False),
    "fp8_e4m3": _fp8(ml_dtypes.float8_e4m3fn),
    "fp8_e5m2": _fp8(ml_dtypes.float8_e5m2),
    "int4": _int(7, ml_dtypes.int4, grouped=True),
    "mxfp4": _mxfp4,
}
_PARAMS = tuple(f.name for f in fields(Format) if f.name != "name")


def _uses(fmt: Format) -> set[str]:
    """The parameters that change what `fmt` computes."""
    if fmt.name == "int8":
        return {"granularity"}
    if fmt.name.startswith("fp8"):
        return {"scaled", "granularity"} if fmt.scaled else {"scaled"}
    if fmt.name in ("int4", "mxfp4"):
        return {"group_size"}
    return set()


def make_format(name: str, **params) -> Format:
    """A validated Format; raises SweepError (one line naming the valid choices) on a bad name or parameter."""
    unknown = sorted(set(params) - set(_PARAMS))
    if unknown:
        raise SweepError(
            f"unknown parameter(s) {', '.join(unknown)} for format {name!r}; valid parameters: {', '.join(_PARAMS)}"
        )
    fmt = Format(name, **params)  # validates the values
    defaults = Format(name)
    return replace(fmt, **{p: getattr(defaults, p) for p in _PARAMS if p not in _uses(fmt)})
