"""Which format: one spec per format in one registry (`FORMATS`); a format is a fake quantizer (quantize, then
dequantize back to float32).

A format maps a float32 array to a new float32 array of the same shape whose values are representable in the
format; the input is never modified. Make one with `make_format(name, **params)`.

Adding a format is one `FormatSpec` in `_SPECS` below: its name, what it computes (`doc`), the parameters it takes,
whether it applies to weights and/or activations, its bits per element and its quantize function. Everything else
iterates over `FORMATS`: the Hydra group `fmt=` (sweep/pipeline/config.py), labels, store keys, the table in
docs/formats.md (`sweep formats` prints it; a test keeps that page equal to it) and the property tests. The GGUF quant
types (q8_0 ... q1_0) are registry entries generated from ggml's type list (sweep/quant/ggml_types.py): weights only,
parameter `imatrix`, bits per weight from ggml.

Policies
- Rounding is round-half-to-even everywhere (np.rint, and ml_dtypes'/numpy's casts).
- Rows are the last axis. For a weight of numpy shape (n_out, n_in) a row is an output channel; for an activation
  of shape (n_tokens, n_embd) a row is a token. `per_row` and `per_token` are the same computation, named for the
  role. A 1-D array (a norm weight) is one row. `per_tensor` uses one scale for the whole array.
- Groups (int4, mxfp4) are `group_size` consecutive elements along the last axis. The last axis must be divisible
  by group_size, else SweepError: no padding, so a group always means the same thing.
- Integer grids are symmetric, [-qmax, qmax]: int4 uses [-7, 7], so with scale = amax/7 the code -8 is never
  needed, and a symmetric grid keeps f(-x) = -f(x).
- fp8 is scaled by default, as fp8 is deployed (one amax scale per tensor): an unscaled cast puts typical weights
  (|w| ~ 0.01-0.05) into e4m3's subnormal range (below 2**-6 = 0.0156), whose steps are 2**-9 = 0.002 wide.
  `scaled=false` keeps the plain cast for studying exactly that, and its label says so (`fp8_e4m3/unscaled`).
- Overflow: bf16 and fp16 follow IEEE round-to-nearest-even: |x| from halfway past the max finite (65520 for
  fp16, (2 - 2**-8) * 2**127 for bf16) becomes +-inf, +-inf stays +-inf.
  Unscaled fp8 is a saturating cast: values beyond +-max (+-inf included) become +-max before the cast
  (e4m3fn has no inf, and ml_dtypes would give NaN).
- Scaled formats (the integer grids, mxfp4, fp8 with scaled=True) take the scale from the finite values only;
  +-inf saturate to +-(max representable * scale). A row/group whose finite amax is 0 gives zeros (its +-inf
  too: the scale is 0). An amax below float32's smallest normal (1.2e-38) is flushed to 0 as well, so that the
  scale never underflows and f(f(x)) == f(x) holds for every input.
- NaN stays NaN in every format except `zero` (which is all zeros by definition).
- Parameters a format does not use are validated, then reset to their defaults, so equal formats compare equal
  and print the same label. Input of another dtype is converted to float32 first.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar

import ml_dtypes
import numpy as np

from ..errors import SweepError
from . import ggml_types
from .recipe_types import RecipeFile
from .recipe_types import read as read_recipe

WEIGHT, ACTIVATION = "weight", "activation"  # the sweep's `kind`s a format can apply to
_TINY = float(np.finfo(np.float32).tiny)  # flush-to-zero threshold for a block's amax (see module docstring)


class Granularity(str, Enum):
    """The `granularity` parameter's values (an Enum, so that the Hydra config rejects others at composition)."""

    per_tensor = "per_tensor"
    per_row = "per_row"
    per_token = "per_token"


GRANULARITIES = tuple(g.value for g in Granularity)


# --- granularity as small frozen types (torchao's PerTensor / PerRow / PerToken / PerGroup) ----------------------


@dataclass(frozen=True)
class PerTensor:
    """One scale for the whole array."""

    rowwise: ClassVar[bool] = False

    def block_len(self, shape: tuple[int, ...]) -> int:
        return math.prod(shape)


@dataclass(frozen=True)
class PerRow:
    """One scale per row (the last axis): a weight's output channel."""

    rowwise: ClassVar[bool] = True

    def block_len(self, shape: tuple[int, ...]) -> int:
        return shape[-1] if shape else 1


@dataclass(frozen=True)
class PerToken(PerRow):
    """One scale per row: an activation's token (the same computation as PerRow, named for the role)."""


@dataclass(frozen=True)
class PerGroup:
    """One scale per `size` consecutive elements along the last axis (which `size` must divide)."""

    size: int
    rowwise: ClassVar[bool] = False  # a group never spans two rows, whatever the rows mean

    def block_len(self, shape: tuple[int, ...]) -> int:
        return self.size


Block = PerTensor | PerRow | PerToken | PerGroup  # the elements that share one scale
_BLOCKS: dict[Granularity, Block] = {Granularity.per_tensor: PerTensor(), Granularity.per_row: PerRow(),
                                     Granularity.per_token: PerToken()}


# --- the parameters a format can take: each validated, labelled and documented once ------------------------------


def _positive_int(v: object) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and bool(v > 0)


@dataclass(frozen=True)
class Param:
    valid: Callable[[Any], bool]
    expected: str  # the error's "valid: ..."
    label: Callable[[Any], str | None]  # its part of the label (None: no part)


def _recipe_label(path: str | None) -> str | None:
    """A recipe is named by its content (8 hex digits of its hash): two recipe.json files never share a label."""
    if not path:
        return None
    try:
        return read_recipe(path).sha256[:8]
    except SweepError:
        return Path(path).name  # unreadable: the point fails with the reason; its label still says which file


PARAMS: dict[str, Param] = {
    "granularity": Param(lambda v: v in GRANULARITIES, ", ".join(GRANULARITIES), str),
    "group_size": Param(_positive_int, "a positive integer that divides the last axis, e.g. 32", lambda v: f"g{v}"),
    "scaled": Param(lambda v: isinstance(v, (bool, np.bool_)), "true or false",
                    lambda v: "scaled" if v else "unscaled"),
    "imatrix": Param(lambda v: v is None or (isinstance(v, str) and bool(v)), "the path of a llama.cpp imatrix file",
                     lambda v: "imatrix" if v else None),
    "recipe": Param(lambda v: v is None or (isinstance(v, str) and bool(v)),
                    "the path of a recipe.json written by `python -m sweep.recipe`", _recipe_label),
}


# --- the spec: one per format -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FormatSpec:
    name: str  # what `fmt=` takes
    doc: str  # what it computes, one line (the table in docs/formats.md, `sweep formats`)
    quantize: Callable[..., np.ndarray]  # (x: a float32 copy, fmt, tensor=, threads=) -> float32, x's shape
    params: tuple[str, ...] = ()  # the parameters it takes (of PARAMS), in label order
    granularity: Granularity = Granularity.per_row  # the default, if it takes `granularity`
    applies_to: tuple[str, ...] = (WEIGHT, ACTIVATION)
    bits: float | None = None  # nominal bits per element, scales not counted (GGUF: ggml's bpw); None: unchanged
    scale_bits: int = 0  # bits of one scale per block: 32 (a float32 amax scale), 8 (E8M0), 0 (no scale)
    element: Any = None  # the dtype the elements are stored in
    qmax: float | None = None  # the largest element magnitude, in units of the scale
    integer: bool = False  # the elements are the integers in [-qmax, qmax]
    overflow_to_inf: bool = False  # IEEE overflow (bf16, fp16); the others saturate
    ggml: ggml_types.GGMLType | None = None  # GGUF quant types: the ggml type
    requires: tuple[str, ...] = ()  # parameters that must be given (no default makes sense)

    def uses(self, fmt: Format) -> tuple[str, ...]:
        """The parameters that change what `fmt` computes: a `scaled=false` format has no blocks to size."""
        unscaled = "scaled" in self.params and not fmt.scaled
        return tuple(p for p in self.params if not (unscaled and p == "granularity"))

    @property
    def max_code(self) -> float:
        """qmax, for the families that have one (integer grids, fp8, mxfp4)."""
        assert self.qmax is not None, f"format {self.name} has no qmax"
        return self.qmax

    def codes(self) -> np.ndarray:
        """Every finite value an element can take, in units of the scale (float64, ascending)."""
        if self.integer:
            return np.arange(-self.max_code, self.max_code + 1, dtype=np.float64)
        storage = np.dtype(f"uint{8 * np.dtype(self.element).itemsize}")  # e2m1's 4 bits take a byte
        v = np.arange(2 ** ml_dtypes.finfo(self.element).bits, dtype=storage).view(self.element).astype(np.float64)
        return np.unique(v[np.isfinite(v)])


@dataclass(frozen=True)
class Format:
    name: str  # registry key, e.g. "int8"
    granularity: str | None = None  # None: the format's default (FormatSpec.granularity)
    group_size: int = 32  # int4 / mxfp4
    scaled: bool = True  # fp8: scaled (amax -> format max, the default) or a plain saturating cast
    imatrix: str | None = None  # GGUF quant types: llama.cpp importance-matrix file
    recipe: str | None = None  # fmt=recipe: a recipe.json, whose type for each tensor is applied to it

    def __post_init__(self):
        if not isinstance(self.name, str) or self.name not in FORMATS:
            ours = [n for n, s in FORMATS.items() if s.ggml is None]
            raise SweepError(f"unknown format {self.name!r}; valid formats: {', '.join(ours)}, "
                             f"and the GGUF quant types {', '.join(ggml_types.TYPES)}")
        g = self.granularity
        if g is None:
            g = self.spec.granularity
        object.__setattr__(self, "granularity", g.value if isinstance(g, Granularity) else g)  # a plain str
        for p, param in PARAMS.items():
            if not param.valid(getattr(self, p)):
                raise SweepError(f"bad {p} {getattr(self, p)!r} for format {self.name}; valid: {param.expected}")
        for p in self.spec.requires:
            if getattr(self, p) is None:
                raise SweepError(f"fmt={self.name} needs fmt.{p}=...: {PARAMS[p].expected}")

    def __call__(self, x: np.ndarray, tensor: str | None = None, threads: int | None = None) -> np.ndarray:
        """`tensor` (the GGUF name) and `threads` matter only to the GGUF quant types (importance matrix, speed)."""
        x = np.array(x, dtype=np.float32)  # always a copy: the caller's array is never modified
        if x.size == 0:
            return x
        return self.spec.quantize(x, self, tensor=tensor, threads=threads)

    @property
    def spec(self) -> FormatSpec:
        return FORMATS[self.name]

    @property
    def label(self) -> str:
        parts = (PARAMS[p].label(getattr(self, p)) for p in self.spec.uses(self))
        return "/".join([self.name, *(p for p in parts if p is not None)])

    @property
    def block(self) -> Block | None:
        """The elements that share one scale; None: no scale (casts, GGUF types: ggml's blocks are its own)."""
        uses = self.spec.uses(self)
        if "group_size" in uses:
            return PerGroup(self.group_size)
        return _BLOCKS[Granularity(self.granularity)] if "granularity" in uses else None

    @property
    def row_local(self) -> bool:
        """No scale spans two rows (the last axis): the format applied to a block of rows gives the same values as
        applied to the whole array. False for one scale per tensor, and for a recipe (its tensors' own formats say)."""
        return self.recipe is None and not isinstance(self.block, PerTensor)

    @property
    def rowwise(self) -> bool:
        """Rounds per row (token): needs a node with one row per token."""
        return self.block is not None and self.block.rowwise

    @property
    def applies_to(self) -> tuple[str, ...]:
        return self.spec.applies_to

    @property
    def bits(self) -> float | None:
        return self.spec.bits

    def scale_bits(self, shape: tuple[int, ...]) -> float:
        """Bits per element its scales take, for an array of `shape` (0.0 without scales)."""
        if self.block is None or not self.spec.scale_bits:
            return 0.0
        return self.spec.scale_bits / self.block.block_len(tuple(shape))

    def for_tensor(self, tensor: str) -> Format:
        """The format that rounds `tensor`: this one, except for a recipe, which names one per tensor."""
        if self.recipe is None:
            return self
        name = self.recipe_file().format_name(tensor)
        return make_format(name, **({"imatrix": self.imatrix} if "imatrix" in FORMATS[name].params else {}))

    def recipe_file(self) -> RecipeFile:
        """fmt=recipe: the recipe.json as a per-tensor map (read once per file version)."""
        if self.recipe is None:
            raise SweepError(f"{self.label} names no recipe (fmt.recipe=PATH)")
        return read_recipe(self.recipe)

    def key_fields(self) -> dict:
        """The format's part of a point's store key: every field, `imatrix` and `recipe` only when set (keys of
        the other formats stay as they were before they existed)."""
        return {k: v for k, v in asdict(self).items() if k not in ("imatrix", "recipe") or v is not None}


# --- shared helpers ----------------------------------------------------------------------------------------------


def _block_len(x: np.ndarray, fmt: Format) -> int:
    """Length of the blocks that share one scale; x.reshape(-1, block_len) puts one block per row."""
    block = fmt.block
    assert block is not None, f"{fmt.label} has no scale, so no blocks"
    n = block.block_len(x.shape)
    if isinstance(block, PerGroup) and (x.shape[-1] if x.ndim else 1) % n:
        raise SweepError(
            f"{fmt.label}: last axis of length {x.shape[-1] if x.ndim else 1} (shape {x.shape}) is not divisible by "
            f"group_size {fmt.group_size}; choose a group_size that divides it"
        )
    return n


def _blocks_amax(x: np.ndarray, fmt: Format) -> tuple[np.ndarray, np.ndarray]:
    """(blocks, amax): x as float64 blocks of one scale each, and each block's amax over finite values."""
    # float64 so that scale = amax/qmax cannot underflow and x/scale is correctly rounded before the final cast
    b = x.reshape(-1, _block_len(x, fmt)).astype(np.float64)
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


# --- one quantize function per family: the constants come from the spec -------------------------------------------


def _identity(x: np.ndarray, fmt: Format, **_: object) -> np.ndarray:
    return x


def _zeros(x: np.ndarray, fmt: Format, **_: object) -> np.ndarray:
    return np.zeros_like(x)


def _cast(x: np.ndarray, fmt: Format, **_: object) -> np.ndarray:
    with np.errstate(over="ignore"):  # IEEE overflow to +-inf is the documented behaviour, not an accident
        return x.astype(fmt.spec.element).astype(np.float32)


def _integer_grid(x: np.ndarray, fmt: Format, **_: object) -> np.ndarray:
    s = fmt.spec
    b, amax = _blocks_amax(x, fmt)
    return _dequantize(x, b, amax / s.max_code, s.max_code, lambda v: np.rint(v).astype(s.element))


def _fp8(x: np.ndarray, fmt: Format, **_: object) -> np.ndarray:
    s = fmt.spec
    if fmt.block is None:  # scaled=false: a saturating cast; NaN passes clip
        return np.clip(x, -s.max_code, s.max_code).astype(s.element).astype(np.float32)
    b, amax = _blocks_amax(x, fmt)
    return _dequantize(x, b, amax / s.max_code, s.max_code, lambda v: v.astype(s.element))


def _mx(x: np.ndarray, fmt: Format, **_: object) -> np.ndarray:
    s = fmt.spec
    b, amax = _blocks_amax(x, fmt)
    # floor(log2(amax)) exactly: frexp gives amax = m * 2**e with m in [0.5, 1). 2 = emax of e2m1 (max 6 = 1.5 * 2**2).
    # The lower clamp keeps X inside E8M0's range (2**-127); only amax in [2**-126, 2**-125) needs it.
    scale = np.where(amax > 0, np.maximum(np.ldexp(1.0, np.frexp(amax)[1] - 1 - 2), 2.0**-127), 0.0)
    return _dequantize(x, b, scale, s.max_code, lambda v: v.astype(s.element))


def _recipe(x: np.ndarray, fmt: Format, tensor: str | None = None, threads: int | None = None) -> np.ndarray:
    if tensor is None:
        raise SweepError(f"{fmt.label} gives each tensor its own type: name the tensor")
    return fmt.for_tensor(tensor)(x, tensor=tensor, threads=threads)


def _fp8_spec(name: str, dtype, doc: str) -> FormatSpec:
    return FormatSpec(name, doc, _fp8, ("scaled", "granularity"), Granularity.per_tensor, bits=8, scale_bits=32,
                      element=dtype, qmax=float(ml_dtypes.finfo(dtype).max))


_SPECS = [
    FormatSpec("none", "identity: a baseline point that perturbs nothing (always a no-op)", _identity),
    FormatSpec("zero", "all zeros (debug: proves a hook is live)", _zeros, bits=0),
    FormatSpec("bf16", "bfloat16 cast and back: 8 significant bits, float32's exponent range; IEEE overflow to "
               "±inf", _cast, bits=16, element=ml_dtypes.bfloat16, overflow_to_inf=True),
    FormatSpec("fp16", "IEEE half cast and back: 11 significant bits, max 65504, subnormal below 2⁻¹⁴; ±inf from "
               "65520", _cast, bits=16, element=np.float16, overflow_to_inf=True),
    FormatSpec("int8", "symmetric integers in [−127, 127], scale amax/127 per block (per_row: a weight's output "
               "channel; per_token: an activation's token)", _integer_grid, ("granularity",), bits=8, scale_bits=32,
               element=np.int8, qmax=127, integer=True),
    FormatSpec("int6", "symmetric integers in [−31, 31], scale amax/31 per block (granularities as int8)",
               _integer_grid, ("granularity",), bits=6, scale_bits=32, element=np.int8, qmax=31, integer=True),
    _fp8_spec("fp8_e4m3", ml_dtypes.float8_e4m3fn, "float8 e4m3fn (4 significant bits, max 448), scaled as "
              "deployed: amax/448 per block, then cast, clipped to ±448; scaled=false: a plain saturating cast"),
    _fp8_spec("fp8_e5m2", ml_dtypes.float8_e5m2, "float8 e5m2 (3 significant bits, max 57344), scaled as "
              "deployed: amax/57344 per block, then cast, clipped to ±57344; scaled=false: a plain saturating cast"),
    FormatSpec("int4", "symmetric integers in [−7, 7], float scale amax/7 per group of consecutive elements of a "
               "row", _integer_grid, ("group_size",), bits=4, scale_bits=32, element=ml_dtypes.int4, qmax=7,
               integer=True),
    FormatSpec("mxfp4", "OCP MX: e2m1 elements (±0, 0.5, 1, 1.5, 2, 3, 4, 6), per group one power-of-two scale "
               "2^(⌊log₂ amax⌋ − 2) (E8M0; the MX spec's group is 32), clipped to ±6", _mx, ("group_size",),
               bits=4, scale_bits=8, element=ml_dtypes.float4_e2m1fn, qmax=6.0),
]


# A whole recipe at once (a joint point): every targeted weight in the type the recipe gives it, each rounded by
# that type's own format below. With tensor=all, layer=null it is the built file's weights, without building it.
_RECIPE = FormatSpec("recipe", "each weight in the type a recipe.json (`python -m sweep.recipe`) gives it, as that "
                     "type's own format rounds it: the recipe's joint damage, without building a file (use "
                     "`tensor=all layer=null`: every tensor)", _recipe, ("recipe", "imatrix"), applies_to=(WEIGHT,),
                     requires=("recipe",))


def _ggml_spec(t: ggml_types.GGMLType) -> FormatSpec:
    needs = "; needs an importance matrix (fmt.imatrix=PATH)" if t.needs_imatrix else ""
    return FormatSpec(t.name, f"GGUF {t.name} (ggml type {t.type_id}): blocks of {t.block_size}, {t.bpw:g} bits per "
                      f"weight, ggml's own quantizer and dequantizer{needs}", ggml_types.fake_quant, ("imatrix",),
                      applies_to=(WEIGHT,), bits=t.bpw, ggml=t)


FORMATS: dict[str, FormatSpec] = {s.name: s for s in [*_SPECS, _RECIPE, *map(_ggml_spec, ggml_types.TYPES.values())]}
_PARAMS = tuple(f.name for f in fields(Format) if f.name != "name")  # == PARAMS' keys (tests/test_formats.py)


def make_format(name: str, **params) -> Format:
    """A validated Format; raises SweepError (one line naming the valid choices) on a bad name or parameter."""
    unknown = sorted(set(params) - set(_PARAMS))
    if unknown:
        raise SweepError(
            f"unknown parameter(s) {', '.join(unknown)} for format {name!r}; valid parameters: {', '.join(_PARAMS)}"
        )
    fmt = Format(name, **params)  # validates the values
    defaults = Format(name, **{p: getattr(fmt, p) for p in fmt.spec.requires})
    uses = fmt.spec.uses(fmt)
    return replace(fmt, **{p: getattr(defaults, p) for p in _PARAMS if p not in uses})


# --- the documentation table, from the registry ------------------------------------------------------------------


def _defaults(spec: FormatSpec) -> str:
    required: dict[str, Any] = {p: "required" for p in spec.requires}  # the required parameters are paths (str)
    d = Format(spec.name, **required)

    def one(p: str) -> str:
        v = getattr(d, p)
        if p in spec.requires:
            return f"`{p}` (required)"
        return f"`{p}`" if v is None else f"`{p}={str(v).lower() if isinstance(v, bool) else v}`"

    return ", ".join(map(one, spec.params)) or "–"


def markdown_table() -> str:
    """The table of the formats in docs/formats.md (`sweep formats` prints it)."""
    rows = ["| `fmt` | what it computes | parameters (defaults) | label | applies to | bits |",
            "|---|---|---|---|---|---|"]
    for s in FORMATS.values():
        if s.ggml is None:
            bits = "unchanged" if s.bits is None else f"{s.bits:g}" + (" + scales" if s.scale_bits else "")
            if "recipe" in s.requires:
                bits = "each tensor's type's"
            label = f"{s.name}/<8 hex digits of its hash>" if "recipe" in s.requires else Format(s.name).label
            rows.append(f"| `{s.name}` | {s.doc} | {_defaults(s)} | `{label}` | "
                        f"{', '.join(s.applies_to)} | {bits} |")
    return "\n".join(rows)


def markdown_ggml_table() -> str:
    """The table of the GGUF quant types in docs/formats.md, two to a row (¹: needs an importance matrix; ²: ggml
    names it otherwise)."""
    def mark(s: FormatSpec, t: ggml_types.GGMLType) -> str:
        return (" ¹" if t.needs_imatrix else "") + (" ²" if ggml_types.GGML_NAME[s.name] != s.name else "")

    cells = [f"| `{s.name}`{mark(s, s.ggml)} | {s.bits:g} | {s.ggml.block_size} |" for s in FORMATS.values()
             if s.ggml is not None]
    half = (len(cells) + 1) // 2
    right = cells[half:] + ["| | | |"] * (2 * half - len(cells))
    head = ["| `fmt` | bits/weight | block | | `fmt` | bits/weight | block |", "|---|---|---|---|---|---|---|"]
    return "\n".join(head + [f"{a} {b}" for a, b in zip(cells[:half], right)])
