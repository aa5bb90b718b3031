"""Property tests of sweep.quant.formats: every fake quantizer against its documented contract."""

from __future__ import annotations

import math
from dataclasses import asdict
from itertools import product
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sweep.errors import SweepError
from sweep.quant import ggml_types
from sweep.quant.formats import FORMATS, GRANULARITIES, PARAMS, Format, PerGroup, PerTensor, make_format

# Any warning (division by zero, invalid cast, overflow) is a bug in the policy handling.
pytestmark = pytest.mark.filterwarnings("error")
FEW = settings(max_examples=60, deadline=None)  # parametrized over ~20 formats: keep each one short
MORE = settings(max_examples=200, deadline=None)
ROOT = Path(__file__).resolve().parents[1]

# Every format of the registry is tested with every combination of these values of the parameters it takes
# (make_format normalizes, duplicates dropped). GGUF types are ggml's code: tests/test_ggml_types.py checks them.
TRIES = {"granularity": GRANULARITIES, "group_size": (32, 8), "scaled": (True, False)}


def variants(name: str) -> list[Format]:
    tried = [p for p in FORMATS[name].params if p in TRIES]
    formats = [make_format(name, **dict(zip(tried, values))) for values in product(*(TRIES[p] for p in tried))]
    return list(dict.fromkeys(formats))


# The element formats (a recipe is each tensor in its own format: tests/test_recipe.py)
ALL_FORMATS = [f for name, spec in FORMATS.items() if spec.ggml is None and not spec.requires for f in variants(name)]
SCALED_FORMATS = [f for f in ALL_FORMATS if f.block is not None]  # one scale per block (tensor, row or group)
CAST_FORMATS = [f for f in ALL_FORMATS if f.block is None and f.spec.element is not None]  # a plain cast
INTEGER_FORMATS = [f for f in SCALED_FORMATS if f.spec.integer]
NOT_ZERO = [f for f in ALL_FORMATS if f.name != "zero"]


def fid(fmt: Format) -> str:
    return fmt.label


SHAPES = st.one_of(
    st.tuples(st.integers(1, 8), st.sampled_from([32, 64, 96, 128])),  # (rows, multiple of 32)
    st.sampled_from([(32,), (64,)]),  # 1-D: a norm weight vector is one row
    st.tuples(st.integers(1, 3), st.integers(1, 3), st.just(32)),
)
ANY_F32 = st.floats(width=32)  # NaN, +-inf, subnormals and extremes included
MODEST = st.floats(-1e4, 1e4, width=32, allow_subnormal=False)
ANY_ARRAYS = hnp.arrays(np.float32, SHAPES, elements=st.one_of(MODEST, ANY_F32))
FINITE_ARRAYS = hnp.arrays(np.float32, SHAPES, elements=MODEST)


def block_len(fmt: Format, shape: tuple) -> int:
    """Elements sharing one scale, consecutive in row-major order (the docstring's rows / groups)."""
    if isinstance(fmt.block, PerGroup):
        return fmt.group_size
    return int(np.prod(shape)) if isinstance(fmt.block, PerTensor) else shape[-1]


def finite_amax(x: np.ndarray, n: int) -> np.ndarray:
    b = x.reshape(-1, n).astype(np.float64)
    return np.where(np.isfinite(b), np.abs(b), 0.0).max(axis=1, keepdims=True)


def saturation(fmt: Format, amax: np.ndarray) -> np.ndarray:
    """+-inf maps to +-(max representable * scale), per block, as the module docstring says."""
    qmax = fmt.spec.qmax
    if fmt.spec.scale_bits == 8:  # an E8M0 scale (MX): the power of two 2**(floor(log2 amax) - emax)
        # the scale is clamped to E8M0's smallest value, 2**-127 (only amax in [2**-126, 2**-125) reaches it)
        emax = np.floor(np.log2(qmax))
        scale = np.maximum(2.0 ** (np.floor(np.log2(np.where(amax > 0, amax, 1.0))) - emax), 2.0 ** -127)
        return np.where(amax > 0, qmax * scale, 0.0)
    return amax  # amax/qmax scales: qmax * amax/qmax (int8: 127 * amax/127; scaled fp8: fmax * amax/fmax)


# --- general contract --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=fid)
@FEW
@given(x=ANY_ARRAYS)
def test_idempotent(fmt, x):
    y = fmt(x)
    np.testing.assert_array_equal(fmt(y), y)  # NaN-aware, exact


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=fid)
@FEW
@given(x=ANY_ARRAYS)
def test_shape_dtype_preserved_input_untouched(fmt, x):
    before = x.copy()
    y = fmt(x)
    assert y.shape == x.shape and y.dtype == np.float32
    assert not np.shares_memory(x, y)
    np.testing.assert_array_equal(x, before)
    assert np.array_equal(np.signbit(x), np.signbit(before))


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=fid)
def test_all_zero_gives_zeros(fmt):
    for shape in [(4, 64), (64,), (2, 3, 32)]:
        y = fmt(np.zeros(shape, np.float32))
        assert y.shape == shape and not np.any(y)


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=fid)
def test_empty_and_other_dtypes(fmt):
    assert fmt(np.zeros((0, 32), np.float32)).shape == (0, 32)
    y = fmt(np.ones((2, 32), np.float64))
    assert y.dtype == np.float32 and y.shape == (2, 32)


# --- exact on representable inputs, equal to the ml_dtypes cast ---------------------------------------------------


@pytest.mark.parametrize("fmt", CAST_FORMATS, ids=fid)
@FEW
@given(x=ANY_ARRAYS)
def test_equals_ml_dtypes_cast(fmt, x):
    dtype = fmt.spec.element
    if not fmt.spec.overflow_to_inf:  # the plain cast only within range; beyond it the format saturates
        fmax = float(ml_dtypes.finfo(dtype).max)
        x = np.where(np.abs(x) <= fmax, x, np.float32(np.nan))
    with np.errstate(over="ignore"):
        expected = x.astype(dtype).astype(np.float32)
    np.testing.assert_array_equal(fmt(x), expected)


@pytest.mark.parametrize("fmt", CAST_FORMATS, ids=fid)
@FEW
@given(x=ANY_ARRAYS)
def test_exact_on_cast_values(fmt, x):
    dtype = fmt.spec.element
    fmax = float(ml_dtypes.finfo(dtype).max)
    with np.errstate(over="ignore"):
        x = np.clip(x, -fmax, fmax).astype(dtype).astype(np.float32)  # already in the format
    np.testing.assert_array_equal(fmt(x), x)


def grid_values(fmt: Format) -> tuple[np.ndarray, float]:
    """(the format's finite code values, its max) in units of the scale."""
    values = fmt.spec.codes()
    assert values.max() == fmt.spec.qmax and np.array_equal(values, -values[::-1])  # symmetric, up to qmax
    return values, float(values.max())


@st.composite
def on_grid(draw, fmt: Format):
    """Codes * a power-of-two scale per block, with one +-max code in each block: exactly representable."""
    values, vmax = grid_values(fmt)
    shape = draw(SHAPES)
    n = block_len(fmt, shape)
    q = draw(hnp.arrays(np.float64, shape, elements=st.sampled_from(list(values)))).reshape(-1, n)
    signs = draw(hnp.arrays(np.float64, (q.shape[0],), elements=st.sampled_from([-1.0, 1.0])))
    q[:, draw(st.integers(0, n - 1))] = signs * vmax
    k = draw(hnp.arrays(np.int32, (q.shape[0], 1), elements=st.integers(-20, 20)))
    return (q * np.ldexp(1.0, k)).reshape(shape).astype(np.float32)


@pytest.mark.parametrize("fmt", SCALED_FORMATS, ids=fid)
@FEW
@given(data=st.data())
def test_exact_on_grid_values(fmt, data):
    x = data.draw(on_grid(fmt))
    np.testing.assert_array_equal(fmt(x), x)


# --- error bounds and grids ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", INTEGER_FORMATS, ids=fid)
@FEW
@given(x=FINITE_ARRAYS)
def test_error_within_half_step(fmt, x):
    n = block_len(fmt, x.shape)
    amax = finite_amax(x, n)
    step = amax / fmt.spec.qmax
    err = np.abs(fmt(x).reshape(-1, n).astype(np.float64) - x.reshape(-1, n))
    assert np.all(err <= step / 2 + amax * 2.0**-22)  # + float32 rounding of the result


@pytest.mark.parametrize("fmt", SCALED_FORMATS, ids=fid)
@FEW
@given(x=ANY_ARRAYS)
def test_few_distinct_values_per_block(fmt, x):
    values, _ = grid_values(fmt)
    n = block_len(fmt, x.shape)
    for block in fmt(x).reshape(-1, n):
        assert len(np.unique(block[~np.isnan(block)])) <= len(np.unique(values))


@pytest.mark.parametrize("fmt", SCALED_FORMATS, ids=fid)
@pytest.mark.parametrize("seed", range(4))
def test_at_most_the_code_count_per_block_on_blocks_larger_than_it(fmt, seed):
    """Blocks of 1,024 (rows) or 4,096 (tensor) distinct inputs, far more than any format's codes (int8 255, e4m3
    253, e5m2 247): a quantizer that kept values off its grid would leave more distinct values than codes."""
    values, _ = grid_values(fmt)
    rng = np.random.default_rng(seed)
    x = (rng.standard_t(3, (4, 1024)) * 10.0 ** rng.uniform(-6, 6)).astype(np.float32)
    n = block_len(fmt, x.shape)
    codes = len(np.unique(values))
    assert all(len(np.unique(b)) > min(codes, n // 2) for b in x.reshape(-1, n))  # the inputs are diverse
    for block in fmt(x).reshape(-1, n):
        assert len(np.unique(block)) <= codes


# --- NaN / inf / saturation / zero policy -------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", NOT_ZERO, ids=fid)
@FEW
@given(x=ANY_ARRAYS)
def test_nan_stays_nan_and_does_not_affect_the_rest(fmt, x):
    nan = np.isnan(x)
    y = fmt(x)
    assert np.all(np.isnan(y[nan]))
    np.testing.assert_array_equal(y[~nan], fmt(np.where(nan, np.float32(0), x))[~nan])
    assert not np.any(np.isnan(y[~nan])) or fmt.spec.overflow_to_inf  # no new NaN


@pytest.mark.parametrize("fmt", SCALED_FORMATS, ids=fid)
@FEW
@given(x=FINITE_ARRAYS, data=st.data())
def test_inf_saturates_to_max_times_scale(fmt, x, data):
    mask = data.draw(hnp.arrays(np.int8, x.shape, elements=st.sampled_from([0, 0, 0, 1, -1])))
    xi = np.where(mask == 0, x, np.copysign(np.float32(np.inf), mask)).astype(np.float32)
    n = block_len(fmt, x.shape)
    amax = finite_amax(xi, n)
    amax = np.where(amax < np.finfo(np.float32).tiny, 0.0, amax)
    sat = np.broadcast_to(saturation(fmt, amax), (amax.shape[0], n)).reshape(x.shape).astype(np.float32)
    y = fmt(xi)
    np.testing.assert_array_equal(y[mask == 1], sat[mask == 1])
    np.testing.assert_array_equal(y[mask == -1], -sat[mask == -1])
    # the scale comes from the finite values only: the rest is as if the infs were zeros
    np.testing.assert_array_equal(y[mask == 0], fmt(np.where(mask == 0, xi, np.float32(0)))[mask == 0])


@pytest.mark.parametrize("fmt", SCALED_FORMATS, ids=fid)
def test_zero_block_with_inf_and_nan(fmt):
    x = np.zeros((2, 64), np.float32)
    x[0, :3] = [np.inf, -np.inf, np.nan]
    x[1, :2] = 1e-40  # subnormal amax: flushed, the block is zero
    x[1, 40] = 1.0
    y = fmt(x)
    if isinstance(fmt.block, PerTensor):
        assert y[0, 0] == fmt(np.float32([[1.0]]))[0, 0] and y[0, 1] == -y[0, 0]  # the tensor's scale
    else:
        np.testing.assert_array_equal(y[0, :2], [0.0, 0.0])
        np.testing.assert_array_equal(y[1, :2], [0.0, 0.0])
    assert np.isnan(y[0, 2])
    assert y[1, 40] == 1.0


def test_zero_format_is_all_zeros():
    x = np.array([[1.0, np.nan, np.inf, -3.0]], np.float32)
    np.testing.assert_array_equal(make_format("zero")(x), np.zeros_like(x))


def test_none_is_an_identity_copy():
    x = np.array([[1.0, np.nan, -np.inf, 1e-45]], np.float32)
    y = make_format("none")(x)
    np.testing.assert_array_equal(y, x)
    y[0, 0] = 5
    assert x[0, 0] == 1.0


def test_bf16_fp16_overflow_follows_ieee():
    fp16, bf16 = make_format("fp16"), make_format("bf16")
    np.testing.assert_array_equal(
        fp16(np.float32([65504, 65519, 65520, 1e6, -1e6, np.inf, -np.inf])),
        [65504, 65504, np.inf, np.inf, -np.inf, np.inf, -np.inf],
    )
    big = np.finfo(np.float32).max
    np.testing.assert_array_equal(bf16(np.float32([big, -big, np.inf])), [np.inf, -np.inf, np.inf])


# Hand-computed roundings, each with its bit pattern (bf16: the top 16 bits of the float32; fp16: IEEE binary16 as
# Python's struct packs it), so that the casts are checked against arithmetic, not against the library they call.
# bf16 keeps 7 fraction bits (ulp at 1 is 2**-7) and float32's exponent range (normal from 2**-126, subnormal step
# 2**-133); fp16 keeps 10 (ulp at 1 is 2**-10), normal from 2**-14, subnormal step 2**-24, max 65504.
BF16_CASES = [  # (input, expected value, expected bf16 bits)
    (1.0 + 2**-8, 1.0, 0x3F80),  # tie between 1 (even) and 1 + 2**-7 (odd): to even
    (1.0 + 2**-8 + 2**-16, 1.0 + 2**-7, 0x3F81),  # just above the tie: up
    (1.0 + 3 * 2**-8, 1.0 + 2**-6, 0x3F82),  # tie between 1 + 2**-7 (odd) and 1 + 2**-6 (even): up, to even
    (-(1.0 + 3 * 2**-8), -(1.0 + 2**-6), 0xBF82),
    (1.0 + 2**-7 - 2**-20, 1.0 + 2**-7, 0x3F81),
    (2**-133, 2**-133, 0x0001),  # the smallest subnormal is kept
    (2**-134, 0.0, 0x0000),  # half of it: tie with 0, to even
    (3 * 2**-134, 2**-132, 0x0002),  # 1.5 steps: tie between 1 (odd) and 2 (even) steps
    (2**-126 - 2**-134, 2**-126, 0x0080),  # half a step below the smallest normal: up to it (even)
    ((2 - 2**-7) * 2.0**127, (2 - 2**-7) * 2.0**127, 0x7F7F),  # the largest finite
    ((2 - 2**-8 - 2**-16) * 2.0**127, (2 - 2**-7) * 2.0**127, 0x7F7F),  # below the overflow tie
    ((2 - 2**-8) * 2.0**127, np.inf, 0x7F80),  # the tie between the max (odd) and 2**128: to even = overflow
]
FP16_CASES = [
    (1.0 + 2**-11, 1.0, 0x3C00),
    (1.0 + 3 * 2**-11, 1.0 + 2**-9, 0x3C02),
    (-(1.0 + 3 * 2**-11), -(1.0 + 2**-9), 0xBC02),
    (2**-24, 2**-24, 0x0001),  # the smallest subnormal
    (2**-25, 0.0, 0x0000),  # tie with 0: to even
    (2**-25 + 2**-40, 2**-24, 0x0001),
    (3 * 2**-25, 2**-23, 0x0002),
    (1023 * 2**-24, 1023 * 2**-24, 0x03FF),  # the largest subnormal
    (1023.5 * 2**-24, 2**-14, 0x0400),  # tie with the smallest normal (even)
    (65504.0, 65504.0, 0x7BFF),  # the largest finite
    (65519.0, 65504.0, 0x7BFF),
    (65520.0, np.inf, 0x7C00),  # the overflow tie: to even = inf
    (-65520.0, -np.inf, 0xFC00),
]


@pytest.mark.parametrize("x, expected, bits", BF16_CASES, ids=[f"{c[0]!r}" for c in BF16_CASES])
def test_bf16_rounds_to_nearest_even_by_hand(x, expected, bits):
    assert np.float32(x) == x  # every input is exact in float32
    y = make_format("bf16")(np.float32([x]))[0]
    assert y == expected
    assert int(np.float32(y).view(np.uint32)) == bits << 16  # bf16 is float32's upper half


@pytest.mark.parametrize("x, expected, bits", FP16_CASES, ids=[f"{c[0]!r}" for c in FP16_CASES])
def test_fp16_rounds_to_nearest_even_by_hand(x, expected, bits):
    import struct

    assert np.float32(x) == x
    y = make_format("fp16")(np.float32([x]))[0]
    assert y == expected
    assert struct.unpack("<H", struct.pack("<e", float(y)))[0] == bits


def test_fp8_is_scaled_per_tensor_by_default():
    """Typical weights: e4m3 unscaled puts 0.0123 in its subnormal range (steps of 2**-9); scaled by amax/448 it
    lands at 110.2 -> 112 (steps of 8 in [64, 128)), and -0.02 at -179.2 -> -176 (steps of 16 in [128, 256))."""
    x = np.float32([[0.05, 0.0123], [-0.02, 0.0]])
    scale = float(np.float32(0.05)) / 448  # one scale for the tensor, from its amax
    expected = np.float32([[448 * scale, 112 * scale], [-176 * scale, 0.0]])
    np.testing.assert_array_equal(make_format("fp8_e4m3")(x), expected)
    assert expected[0, 1] == np.float32(0.0125)
    # unscaled: 0.05 -> 12.8 steps of 2**-8 in [2**-5, 2**-4) -> 13; 0.0123 -> 6.3 subnormal steps of 2**-9 -> 6
    np.testing.assert_array_equal(make_format("fp8_e4m3", scaled=False)(x),
                                  np.float32([[13 * 2**-8, 6 * 2**-9], [-5 * 2**-8, 0.0]]))


@pytest.mark.parametrize("name, fmax", [("fp8_e4m3", 448.0), ("fp8_e5m2", 57344.0)])
def test_unscaled_fp8_saturates(name, fmax):
    x = np.float32([fmax, 2 * fmax, 1e30, -1e30, np.inf, -np.inf, np.nan, 1.0])
    y = make_format(name, scaled=False)(x)
    np.testing.assert_array_equal(y, [fmax, fmax, fmax, -fmax, fmax, -fmax, np.nan, 1.0])


def test_mxfp4_known_values():
    # amax 3.5 -> X = 2**(1 - 2) = 0.5; 3.5/X = 7 saturates to 6 -> 3.0; 1.25/X = 2.5 -> 2 (half to even) -> 1.0;
    # 0.125/X = 0.25, halfway between 0 and 0.5 -> 0 (even); inf -> 6 * X
    x = np.zeros(32, np.float32)
    x[:5] = [3.5, -1.25, 0.125, 0.25, np.inf]
    np.testing.assert_array_equal(make_format("mxfp4")(x)[:5], [3.0, -1.0, 0.0, 0.25, 3.0])


def test_int8_known_values():
    x = np.float32([[127.0, 0.5, 1.5, -2.5, 63.4]])  # scale 1: half to even
    np.testing.assert_array_equal(make_format("int8")(x), [[127.0, 0.0, 2.0, -2.0, 63.0]])


# --- granularity --------------------------------------------------------------------------------------------------


@MORE
@given(x=ANY_ARRAYS)
def test_granularities(x):
    per_row, per_token = make_format("int8", granularity="per_row"), make_format("int8", granularity="per_token")
    np.testing.assert_array_equal(per_row(x), per_token(x))  # same computation, named for the role
    rows = x.reshape(-1, x.shape[-1])
    np.testing.assert_array_equal(per_row(x).reshape(rows.shape), np.stack([per_row(r) for r in rows]))
    per_tensor = make_format("int8", granularity="per_tensor")
    np.testing.assert_array_equal(per_tensor(x), per_row(x.reshape(1, -1)).reshape(x.shape))


@MORE
@given(x=ANY_ARRAYS)
def test_groups_are_consecutive_along_last_axis(x):
    int4 = make_format("int4", group_size=16)
    groups = x.reshape(-1, 16)
    np.testing.assert_array_equal(int4(x).reshape(groups.shape), np.stack([int4(g) for g in groups]))


@pytest.mark.parametrize("name", ["int4", "mxfp4"])
def test_grouped_needs_divisible_last_axis(name):
    with pytest.raises(SweepError, match="divisible"):
        make_format(name)(np.ones((2, 48), np.float32))


# --- make_format / Format -----------------------------------------------------------------------------------------


def test_labels():
    assert make_format("bf16").label == "bf16"
    assert make_format("int8").label == "int8/per_row"
    assert make_format("int8", granularity="per_token").label == "int8/per_token"
    assert make_format("fp8_e4m3").label == "fp8_e4m3/scaled/per_tensor"  # fp8 is scaled by default, per tensor
    assert make_format("fp8_e5m2", granularity="per_row").label == "fp8_e5m2/scaled/per_row"
    assert make_format("fp8_e4m3", scaled=False).label == "fp8_e4m3/unscaled"
    assert make_format("int4").label == "int4/g32"
    assert make_format("mxfp4").label == "mxfp4/g32"
    assert len({f.label for f in ALL_FORMATS}) == len(ALL_FORMATS)


def test_granularity_none_means_the_formats_default():
    assert make_format("int8", granularity=None).granularity == "per_row"
    assert make_format("fp8_e4m3", granularity=None) == make_format("fp8_e4m3", granularity="per_tensor")


def test_unused_params_are_normalized():
    assert make_format("bf16", granularity="per_tensor", group_size=8) == make_format("bf16")
    assert make_format("fp8_e5m2", granularity="per_tensor") == make_format("fp8_e5m2", scaled=True)
    assert make_format("fp8_e5m2", scaled=False, granularity="per_row") == make_format("fp8_e5m2", scaled=False)
    assert make_format("int8", group_size=64) == make_format("int8")
    assert make_format("int4", granularity="per_tensor") == make_format("int4")


def test_registry():
    """Every spec is complete and consistent: parameters known, bits those of its elements, GGUF types from ggml."""
    assert set(PARAMS) == {f for f in Format.__dataclass_fields__ if f != "name"}
    assert [s.name for s in FORMATS.values() if s.ggml is not None] == list(ggml_types.TYPES)
    for name, spec in FORMATS.items():
        assert spec.name == name and spec.doc and set(spec.params) <= set(PARAMS)
        assert spec.applies_to and set(spec.applies_to) <= {"weight", "activation"}
        if spec.ggml is not None:  # weights only, an importance matrix their one parameter, ggml's bits per weight
            assert (spec.applies_to, spec.params, spec.bits) == (("weight",), ("imatrix",), spec.ggml.bpw)
        elif spec.integer:  # the integers in [-qmax, qmax] need `bits` bits
            assert spec.bits == math.ceil(math.log2(2 * spec.qmax + 1)) and spec.scale_bits == 32
        elif spec.element is not None:
            assert spec.bits == ml_dtypes.finfo(spec.element).bits
        assert ("group_size" in spec.params or "granularity" in spec.params) == (spec.scale_bits > 0)


# Today's store keys (Format.key_fields, in job.job_key) of a few formats: stored points stay valid only while these
# stay the same.
STORED_KEYS = [
    (make_format("bf16"), {"name": "bf16", "granularity": "per_row", "group_size": 32, "scaled": True}),
    (make_format("int8", granularity="per_token"),
     {"name": "int8", "granularity": "per_token", "group_size": 32, "scaled": True}),
    (make_format("fp8_e4m3"), {"name": "fp8_e4m3", "granularity": "per_tensor", "group_size": 32, "scaled": True}),
    (make_format("fp8_e5m2", scaled=False, granularity="per_row"),
     {"name": "fp8_e5m2", "granularity": "per_tensor", "group_size": 32, "scaled": False}),
    (make_format("int4", group_size=64), {"name": "int4", "granularity": "per_row", "group_size": 64, "scaled": True}),
    (make_format("q4_K"), {"name": "q4_K", "granularity": "per_row", "group_size": 32, "scaled": True}),
    (make_format("q4_K", imatrix="im.gguf"),
     {"name": "q4_K", "granularity": "per_row", "group_size": 32, "scaled": True, "imatrix": "im.gguf"}),
]


@pytest.mark.parametrize("fmt, key", STORED_KEYS, ids=[f.label for f, _ in STORED_KEYS])
def test_key_fields_are_todays_store_keys(fmt, key):
    assert fmt.key_fields() == key and list(fmt.key_fields()) == list(key)
    assert all(type(v) is type(key[k]) for k, v in fmt.key_fields().items())  # plain str, never the Enum


@pytest.mark.parametrize("fmt", ALL_FORMATS + [make_format(n) for n in ggml_types.TYPES], ids=fid)
def test_key_fields_rowwise_and_bits(fmt):
    assert fmt.key_fields() == {k: v for k, v in asdict(fmt).items() if k not in ("imatrix", "recipe") or v is not None}
    # rowwise: the format computes something else once its granularity is per_tensor, and it takes one
    assert fmt.rowwise == (make_format(**{**asdict(fmt), "granularity": "per_tensor"}) != fmt)
    assert fmt.bits == fmt.spec.bits and fmt.applies_to == fmt.spec.applies_to
    n = {PerTensor: 4 * 64, PerGroup: fmt.group_size}.get(type(fmt.block), 64)  # PerRow, PerToken: a row
    assert fmt.scale_bits((4, 64)) == (fmt.spec.scale_bits / n if fmt.block is not None else 0.0)


def test_config_group_is_the_registry():
    """`fmt=NAME` for every registered format, with the format's own defaults; a bad granularity fails at
    composition."""
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.errors import ConfigCompositionException

    import sweep.pipeline.config  # noqa: F401  (registers the group)

    assert sorted(ConfigStore.instance().list("fmt")) == sorted(f"{n}.yaml" for n in FORMATS)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for name in FORMATS:
            if FORMATS[name].requires:  # fmt=recipe without fmt.recipe=PATH: composes, then fails in one line
                with pytest.raises(SweepError, match=r"^fmt=recipe needs fmt.recipe=\.\.\.: the path of a recipe"):
                    make_format(**compose("config", overrides=[f"fmt={name}"]).fmt)
                continue
            assert make_format(**compose("config", overrides=[f"fmt={name}"]).fmt) == make_format(name)
        cfg = compose("config", overrides=["fmt=fp8_e4m3", "fmt.granularity=per_row"])
        assert make_format(**cfg.fmt).label == "fp8_e4m3/scaled/per_row"
        with pytest.raises(ConfigCompositionException):
            compose("config", overrides=["fmt=int8", "fmt.granularity=per_banana"])


def test_docs_tables_are_the_registry():
    """docs/formats.md shows the tables `sweep formats` prints: paste its output there after adding a
    format."""
    from sweep.quant.formats import markdown_ggml_table, markdown_table

    page = (ROOT / "docs" / "formats.md").read_text()
    assert markdown_table() in page and markdown_ggml_table() in page


def one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_unknown_name():
    with pytest.raises(SweepError) as err:
        make_format("int3")
    assert all(name in one_line(err) for name in FORMATS)


@pytest.mark.parametrize("bad", ["per_col", "", "PER_ROW"])
def test_bad_granularity(bad):
    with pytest.raises(SweepError) as err:
        make_format("int8", granularity=bad)
    assert all(g in one_line(err) for g in GRANULARITIES)


@pytest.mark.parametrize("bad", [0, -32, 1.5, "32", True])
def test_bad_group_size(bad):
    with pytest.raises(SweepError) as err:
        make_format("int4", group_size=bad)
    assert "positive integer" in one_line(err)


def test_bad_scaled():
    with pytest.raises(SweepError) as err:
        make_format("fp8_e4m3", scaled="yes")
    assert "true or false" in one_line(err)


def test_unknown_param():
    with pytest.raises(SweepError) as err:
        make_format("int8", granulartiy="per_row")
    msg = one_line(err)
    assert "granulartiy" in msg and all(p in msg for p in ("granularity", "group_size", "scaled"))


def test_granularity_enum_is_accepted_as_its_value():
    from sweep.quant.formats import Granularity

    fmt = make_format("int8", granularity=Granularity.per_token)
    assert fmt == make_format("int8", granularity="per_token") and type(fmt.granularity) is str


def test_format_validates_on_direct_construction():
    with pytest.raises(SweepError):
        Format("int9")
    with pytest.raises(SweepError):
        Format("int8", granularity="per_col")
