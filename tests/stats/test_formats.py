"""Number formats: their constants against ``torch.finfo``, and what a statistics row says
about underflow and FP8 casts, against counts taken from the tensors themselves (float64
comparisons and real ``torch`` casts to ``float8_e4m3fn`` / ``float8_e5m2``)."""

import math
import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tensor_strategies import flat_values, gradient_tensors, special_values

from gradscope.stats import formats, layout
from gradscope.stats.host_backend import host_rows

FORMAT_DTYPES = [
    (formats.FLOAT16, torch.float16),
    (formats.BFLOAT16, torch.bfloat16),
    (formats.FLOAT32, torch.float32),
    (formats.FLOAT64, torch.float64),
    (formats.E4M3, torch.float8_e4m3fn),
    (formats.E5M2, torch.float8_e5m2),
]
FP8 = [(formats.E4M3, torch.float8_e4m3fn, "e4m3"), (formats.E5M2, torch.float8_e5m2, "e5m2")]
_UINT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

# The histogram resolves thresholds 2**e for e in [FIRST_EDGE, LAST_INNER_EDGE]: 2**-47 is the
# upper edge of bin 0 (which also holds everything smaller), 2**15 the lower edge of bin 63
# (which also holds everything larger). Outside, only max_abs < 2**e makes a count exact.
FIRST_EDGE = layout.HIST_MIN_EXPONENT + 1
LAST_INNER_EDGE = layout.HIST_MIN_EXPONENT + layout.NUM_BINS - 1


# ---- helpers: rows from real tensors, references from the same tensors -----------------------


def rows_of(tensors) -> tuple[np.ndarray, np.ndarray]:
    """``(hist (T, 64), max_abs (T,))`` of the tensors, from the NumPy backend."""
    rows = host_rows(tensors)
    return rows[:, layout.HIST : layout.HIST + layout.NUM_BINS], rows[:, layout.MAX_ABS]


def finite_nonzero(tensor: torch.Tensor) -> torch.Tensor:
    """The finite non-zero elements, as float64 (exact for every float dtype)."""
    x = tensor.detach().to(torch.float64).reshape(-1)
    return x[torch.isfinite(x) & (x != 0)]


def true_below(tensor: torch.Tensor, exponents) -> np.ndarray:
    """Exact counts of finite non-zero ``|x| < 2**e`` for each ``e``, in float64."""
    magnitudes = finite_nonzero(tensor).abs().numpy()
    thresholds = np.ldexp(1.0, np.asarray(exponents, dtype=np.int64))
    return (magnitudes[None, :] < thresholds[:, None]).sum(axis=1)


def resolvable(exponent: int, max_abs: float) -> bool:
    """Whether the histogram and max_abs determine the count below 2**exponent exactly."""
    return FIRST_EDGE <= exponent <= LAST_INNER_EDGE or max_abs < math.ldexp(1.0, exponent)


def reference_k(max_abs: float, fmt_max: float) -> int:
    """The largest integer k with max_abs * 2**k <= fmt_max, from the two frexp mantissas:
    fmt_max / max_abs = (m2 / m1) * 2**(e2 - e1) with m2 / m1 in (1/2, 2)."""
    if not (math.isfinite(max_abs) and max_abs > 0):
        return 0
    m1, e1 = math.frexp(max_abs)
    m2, e2 = math.frexp(fmt_max)
    return e2 - e1 - (1 if m2 < m1 else 0)


def log2_exact(power_of_two: float) -> int:
    mantissa, exponent = math.frexp(power_of_two)
    assert mantissa == 0.5, f"{power_of_two} is not a power of two"
    return exponent - 1


def spread(seed: int, n: int, c: float, dtype: torch.dtype, scale_exponent: int = 0) -> torch.Tensor:
    """``randn * exp(c * randn) * 2**scale_exponent``: many binades wide for large c."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64) * torch.exp(
        c * torch.randn(n, generator=g, dtype=torch.float64)
    )
    return (x * 2.0**scale_exponent).to(dtype)


def fp8_cast_reference(tensor: torch.Tensor, fmt: formats.NumberFormat, fp8_dtype: torch.dtype) -> dict:
    """What a real cast does: scale the finite non-zero values by 2**k (k from the definition),
    cast to the FP8 dtype, count zeros and subnormals.

    ``flushed`` and ``subnormal`` follow the module's documented convention: a value exactly at
    the flush threshold (half the smallest subnormal), which round-half-to-even sends to zero,
    is counted as kept, i.e. as subnormal. ``cast_flushed`` is what the cast really does.
    """
    x = finite_nonzero(tensor)
    max_abs = float(x.abs().max()) if x.numel() else 0.0
    k = reference_k(max_abs, fmt.max)
    scaled = x * 2.0**k  # exact: inputs are float16/bfloat16/float32, |k| < 200
    assert bool((scaled.abs() <= fmt.max).all())
    y = scaled.to(fp8_dtype).to(torch.float64)
    assert bool((y.abs() <= fmt.max).all())  # no NaN (E4M3's overflow), no value beyond max
    cast_flushed = int((y == 0).sum())
    subnormal = int(((y != 0) & (scaled.abs() < fmt.min_normal)).sum())
    ties = int((scaled.abs() == fmt.flush_below).sum())
    assert int((y[scaled.abs() == fmt.flush_below] == 0).sum()) == ties  # ties do round to zero
    return {
        "k": k,
        "max_abs": max_abs,
        "nonzero": x.numel(),
        "flushed": cast_flushed - ties,
        "subnormal": subnormal + ties,
        "cast_flushed": cast_flushed,
        "ties": ties,
    }


# ---- 1. format constants -----------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "dtype"), FORMAT_DTYPES, ids=lambda v: getattr(v, "name", None))
def test_format_constants_are_torchs(fmt, dtype):
    info = torch.finfo(dtype)
    assert fmt.name == str(dtype).split(".")[-1]
    assert fmt.max == float(info.max)
    assert fmt.min_normal == float(info.tiny) == float(info.smallest_normal)
    # Smallest subnormal: the bit pattern 0...01 (torch.finfo.smallest_subnormal where it exists).
    one_ulp = torch.tensor(1, dtype=_UINT_OF_SIZE[info.bits // 8]).view(dtype).to(torch.float64)
    assert fmt.min_subnormal == float(one_ulp)
    if hasattr(info, "smallest_subnormal"):
        assert fmt.min_subnormal == float(info.smallest_subnormal)
    assert 0 < fmt.min_subnormal < fmt.min_normal < 1 < fmt.max
    log2_exact(fmt.min_normal)
    log2_exact(fmt.min_subnormal)
    if dtype is not torch.float64:  # float64's flush threshold 2**-1075 is not a float64
        # Half the smallest subnormal rounds to zero (a tie, to even); three quarters round up.
        assert fmt.flush_below == fmt.min_subnormal / 2
        below = torch.tensor([fmt.flush_below, 0.75 * fmt.min_subnormal], dtype=torch.float64).to(dtype)
        assert below.to(torch.float64).tolist() == [0.0, fmt.min_subnormal]


def test_format_tables():
    assert formats.FORMATS == {fmt.name: fmt for fmt, _ in FORMAT_DTYPES}
    assert formats.FP8_FORMATS == {"e4m3": formats.E4M3, "e5m2": formats.E5M2}
    assert set(formats.FP8_FIELDS) == {f"fp8_{s}_{w}" for s in ("e4m3", "e5m2") for w in ("zero", "subnormal")}
    for name in formats.LOW_PRECISION:
        assert formats.format_of(name) is not None


@pytest.mark.parametrize(("fmt", "dtype"), FORMAT_DTYPES, ids=lambda v: getattr(v, "name", None))
def test_format_of_dtypes_and_their_names(fmt, dtype):
    assert formats.format_of(dtype) is fmt
    assert formats.format_of(str(dtype)) is fmt  # "torch.float16"
    assert formats.format_of(str(dtype).removeprefix("torch.")) is fmt  # "float16"


@pytest.mark.parametrize(
    "other",
    [torch.int8, torch.uint8, torch.int32, torch.int64, torch.bool, torch.complex64, "torch.int16", "int64", "", None],
    ids=str,
)
def test_format_of_anything_else_is_none(other):
    assert formats.format_of(other) is None


# ---- 2. count_below ----------------------------------------------------------------------------

EXPONENTS = np.arange(-60, 81)


def assert_count_below_matches(tensors, exponents=EXPONENTS) -> int:
    """count_below against the exact counts, for every exponent; returns the exact checks made."""
    hist, max_abs = rows_of(tensors)
    exact_checks = 0
    for e in exponents:
        got = formats.count_below(hist, max_abs, np.full(len(tensors), e))
        assert got.shape == (len(tensors),) and got.dtype == np.float64
        for i, tensor in enumerate(tensors):
            expected = true_below(tensor, [e])[0]
            where = f"tensor {i} ({tensor.dtype}), e={e}, max_abs={max_abs[i]!r}"
            if resolvable(int(e), max_abs[i]):
                assert got[i] == expected, f"{where}: {got[i]} != {expected}"
                exact_checks += 1
            else:  # a lower bound (below 2**-47: the values known to be below, i.e. none)
                assert got[i] <= expected, f"{where}: {got[i]} > {expected}"
                if e < FIRST_EDGE:
                    assert got[i] == 0, where
    return exact_checks


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_count_below_is_exact_in_the_resolvable_range(dtype):
    tensors = [spread(seed, 300, c, dtype) for seed, c in ((0, 4.0), (1, 4.0), (2, 1.0), (3, 8.0))]
    tensors += [
        torch.cat([spread(4, 200, 4.0, dtype), special_values(dtype)]),
        special_values(dtype),
        torch.zeros(5, dtype=dtype),
        torch.tensor([float("nan"), float("inf")], dtype=dtype),
        torch.zeros(0, dtype=dtype),
    ]
    exact_checks = assert_count_below_matches(tensors)
    assert exact_checks >= len(EXPONENTS) * 4  # the exact branch is what this test is about
    # Exponents given per row and as a scalar broadcast the same way.
    hist, max_abs = rows_of(tensors)
    per_row = np.arange(len(tensors)) * 7 - 30
    got = formats.count_below(hist, max_abs, per_row)
    for i, tensor in enumerate(tensors):
        if resolvable(int(per_row[i]), max_abs[i]):
            assert got[i] == true_below(tensor, [per_row[i]])[0]
    np.testing.assert_array_equal(
        formats.count_below(hist, max_abs, -3), formats.count_below(hist, max_abs, np.full(len(tensors), -3))
    )


def test_count_below_counts_everything_below_a_threshold_above_max_abs():
    x = torch.tensor([3.0, -1e-20, 2.0**-60, 0.0, float("inf"), float("nan"), 0.5], dtype=torch.float32)
    hist, max_abs = rows_of([x])
    for e in (2, 3, 16, 40, 127, 500, 5000):  # 2**5000 is inf in float64: still above max_abs
        assert formats.count_below(hist, max_abs, e)[0] == 4  # the finite non-zero values
    assert formats.count_below(hist, max_abs, 1)[0] == 3  # 3.0 is not below 2
    assert formats.count_below(hist, max_abs, -60)[0] == 0  # 2**-60 is not below 2**-60, nor known to be


@given(st.lists(gradient_tensors(max_numel=300), min_size=1, max_size=4), st.lists(st.integers(-70, 140), max_size=6))
def test_count_below_on_any_tensor(tensors, extra_exponents):
    assert_count_below_matches(tensors, exponents=[-48, -47, -46, -14, -1, 0, 1, 15, 16, 17, *extra_exponents])


# ---- 3. below_normal ---------------------------------------------------------------------------


def float16_subnormals(x: torch.Tensor) -> int:
    return int(((x != 0) & (x.abs() < torch.finfo(torch.float16).tiny)).sum())


@given(st.lists(flat_values(torch.float16, 400), min_size=1, max_size=4))
def test_below_normal_counts_float16_subnormals(tensors):
    hist, max_abs = rows_of(tensors)
    got = formats.below_normal(hist, max_abs, formats.FLOAT16)
    assert got.tolist() == [float16_subnormals(t) for t in tensors]


def test_below_normal_on_float16_data_with_many_subnormals():
    tensors = [spread(seed, 500, 3.0, torch.float16, scale_exponent=-12) for seed in range(3)]
    tensors.append(special_values(torch.float16))
    hist, max_abs = rows_of(tensors)
    expected = [float16_subnormals(t) for t in tensors]
    assert min(expected) > 0
    assert formats.below_normal(hist, max_abs, formats.FLOAT16).tolist() == expected


# ---- 4. amax_scale_exponent --------------------------------------------------------------------


def assert_is_amax_scale_exponent(k: int, max_abs: float, fmt: formats.NumberFormat) -> None:
    """k is the largest integer with max_abs * 2**k <= fmt.max, in exact arithmetic."""
    scaled = Fraction(max_abs) * Fraction(2) ** k
    assert scaled <= Fraction(fmt.max), f"max_abs={max_abs!r}, k={k}: {float(scaled)} > {fmt.max}"
    assert scaled * 2 > Fraction(fmt.max), f"max_abs={max_abs!r}: k={k} is not the largest"


def amax_cases(fmt: formats.NumberFormat) -> list[float]:
    rng = np.random.default_rng(0)
    values = [math.ldexp(1.0, j) for j in range(-80, 81)]  # exact powers of two
    values += [fmt.max, fmt.max / 2, np.nextafter(fmt.max, 0)]
    if fmt.max < np.finfo(np.float64).max:
        values += [fmt.max * 2, np.nextafter(fmt.max, np.inf)]
    values += [fmt.max * 2.0**j for j in (-40, -7, -1, 3, 30)]
    values += [np.nextafter(math.ldexp(1.0, j), 0) for j in (-30, 0, 9, 16)]
    values += [fmt.min_normal, fmt.min_subnormal, 1e-30, 3e-12, 0.1, 1 / 3, 448.5, 65504.0, 1e20, 3.4e38, 1e300]
    values += [np.finfo(np.float64).max, np.finfo(np.float64).tiny]
    values += list(np.exp(rng.normal(0, 20, 200)))
    values = [v for v in values if np.isfinite(v)]
    # Only max_abs whose ratio fmt.max / max_abs is a finite float64 (see the xfail below).
    return [float(v) for v in values if Fraction(fmt.max) / Fraction(float(v)) < Fraction(np.finfo(np.float64).max)]


@pytest.mark.parametrize(("fmt", "dtype"), FORMAT_DTYPES, ids=lambda v: getattr(v, "name", None))
def test_amax_scale_exponent_is_the_largest_k_within_range(fmt, dtype):
    cases = amax_cases(fmt)
    got = formats.amax_scale_exponent(np.array(cases), fmt)
    assert got.shape == (len(cases),) and np.issubdtype(got.dtype, np.integer)
    for max_abs, k in zip(cases, got.tolist(), strict=True):
        assert_is_amax_scale_exponent(k, max_abs, fmt)
        assert k == reference_k(max_abs, fmt.max)
    for max_abs in cases[:20]:  # scalars too
        assert int(formats.amax_scale_exponent(max_abs, fmt)) == reference_k(max_abs, fmt.max)


def test_amax_scale_exponent_at_the_formats_max_and_powers_of_two():
    for fmt, _ in FORMAT_DTYPES:
        assert formats.amax_scale_exponent(fmt.max, fmt) == 0
        if fmt is not formats.FLOAT64:  # nothing finite lies above float64's max
            assert formats.amax_scale_exponent(np.nextafter(fmt.max, np.inf), fmt) == -1
    # E4M3's max is 448 = 1.75 * 2**8: a power of two 2**j scales to 2**(8 - j) * 2**j = 256.
    for j in range(-20, 21):
        assert formats.amax_scale_exponent(2.0**j, formats.E4M3) == 8 - j
        assert formats.amax_scale_exponent(2.0**j, formats.E5M2) == 15 - j  # 57344 = 1.75 * 2**15


def test_amax_scale_exponent_of_nothing_to_scale_is_zero():
    values = np.array([0.0, -0.0, np.inf, -np.inf, np.nan])
    for fmt, _ in FORMAT_DTYPES:
        np.testing.assert_array_equal(formats.amax_scale_exponent(values, fmt), 0)


@pytest.mark.parametrize(
    ("max_abs", "fmt"),
    [(0.5, formats.FLOAT64), (1e-300, formats.FLOAT32), (1e-306, formats.E4M3), (5e-324, formats.E5M2)],
    ids=["float64_at_0.5", "float32_at_1e-300", "e4m3_at_1e-306", "e5m2_at_min_subnormal"],
)
def test_amax_scale_exponent_when_the_ratio_overflows(max_abs, fmt):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no overflow on the way either
        k = int(formats.amax_scale_exponent(max_abs, fmt))
    assert_is_amax_scale_exponent(k, max_abs, fmt)


# ---- 5. FP8 counts and fields against real casts -----------------------------------------------

FP8_DATA = [
    (seed, dtype, c, scale)
    for seed, (dtype, c, scale) in enumerate(
        [
            (torch.float32, 0.5, 0),
            (torch.float32, 2.0, 0),
            (torch.float32, 4.0, 0),
            (torch.float32, 4.0, -20),
            (torch.float32, 6.0, 12),
            (torch.float32, 3.0, -40),
            (torch.bfloat16, 1.0, 0),
            (torch.bfloat16, 4.0, 0),
            (torch.bfloat16, 4.0, 30),
            (torch.bfloat16, 2.5, -25),
            (torch.float16, 0.5, 0),
            (torch.float16, 2.0, 0),
            (torch.float16, 2.0, -8),
            (torch.float16, 3.0, 4),
        ]
    )
]


def assert_fp8_counts_match_casts(tensors, fmt, fp8_dtype) -> dict:
    """fp8_counts against real casts: exact where both thresholds are resolvable, bounds
    elsewhere. Returns what was checked exactly, so callers can insist it is not vacuous."""
    hist, max_abs = rows_of(tensors)
    flushed, subnormal = formats.fp8_counts(hist, max_abs, fmt)
    assert flushed.shape == subnormal.shape == (len(tensors),)
    seen = {"exact_rows": 0, "flushed": 0, "subnormal": 0, "ties": 0}
    for i, tensor in enumerate(tensors):
        ref = fp8_cast_reference(tensor, fmt, fp8_dtype)
        assert ref["max_abs"] == max_abs[i]
        flush_exponent = log2_exact(fmt.flush_below) - ref["k"]
        normal_exponent = log2_exact(fmt.min_normal) - ref["k"]
        where = f"tensor {i} ({tensor.dtype}), {fmt.name}, max_abs={max_abs[i]!r}, k={ref['k']}: {ref}"
        got_flushed, got_below = flushed[i], flushed[i] + subnormal[i]
        ref_below = ref["flushed"] + ref["subnormal"]
        if resolvable(flush_exponent, ref["max_abs"]):
            assert got_flushed == ref["flushed"], f"{where}: flushed {got_flushed}"
        else:
            assert got_flushed <= ref["flushed"], f"{where}: flushed {got_flushed}"
        if resolvable(normal_exponent, ref["max_abs"]):
            assert got_below == ref_below, f"{where}: flushed + subnormal {got_below}"
        else:
            assert got_below <= ref_below, f"{where}: flushed + subnormal {got_below}"
        if resolvable(flush_exponent, ref["max_abs"]) and resolvable(normal_exponent, ref["max_abs"]):
            assert subnormal[i] == ref["subnormal"], f"{where}: subnormal {subnormal[i]}"
            seen["exact_rows"] += 1
            seen["flushed"] += ref["flushed"]
            seen["subnormal"] += ref["subnormal"]
            seen["ties"] += ref["ties"]
    return seen


@pytest.mark.parametrize(("fmt", "fp8_dtype", "short"), FP8, ids=["e4m3", "e5m2"])
def test_fp8_counts_match_a_real_cast(fmt, fp8_dtype, short):
    tensors = [spread(seed, 400, c, dtype, scale) for seed, dtype, c, scale in FP8_DATA]
    seen = assert_fp8_counts_match_casts(tensors, fmt, fp8_dtype)
    # Not vacuous: most rows are checked exactly, and they do flush and keep subnormals.
    assert seen["exact_rows"] >= len(tensors) - 2
    assert seen["flushed"] > 50 and seen["subnormal"] > 20, seen


@pytest.mark.parametrize(("fmt", "fp8_dtype", "short"), FP8, ids=["e4m3", "e5m2"])
@given(st.lists(gradient_tensors(dtypes=(torch.float16, torch.bfloat16, torch.float32), max_numel=300), max_size=4))
def test_fp8_counts_match_a_real_cast_on_any_tensor(fmt, fp8_dtype, short, tensors):
    if tensors:
        assert_fp8_counts_match_casts(tensors, fmt, fp8_dtype)


@pytest.mark.parametrize(("fmt", "fp8_dtype", "short"), FP8, ids=["e4m3", "e5m2"])
def test_values_at_the_flush_threshold_are_counted_as_kept(fmt, fp8_dtype, short):
    """The documented convention: a value exactly at half the smallest subnormal (after
    scaling) is counted as subnormal, although round-half-to-even sends it to zero; just
    below it is flushed, just above it is subnormal."""
    k = reference_k(1.0, fmt.max)
    threshold = fmt.flush_below / 2.0**k  # in the unscaled tensor
    x = torch.tensor([1.0, threshold, np.nextafter(threshold, 0, dtype=np.float32), threshold * 1.25])
    ref = fp8_cast_reference(x, fmt, fp8_dtype)
    assert ref["cast_flushed"] == 2 and ref["ties"] == 1  # the cast flushes the tie too
    hist, max_abs = rows_of([x])
    flushed, subnormal = formats.fp8_counts(hist, max_abs, fmt)
    assert (flushed[0], subnormal[0]) == (1, 2)


RESOLVABLE_FP8_DATA = FP8_DATA[:4] + FP8_DATA[6:8]
"""Data whose E4M3 and E5M2 thresholds all lie within the histogram (max_abs not huge, not tiny)."""


def fields_reference(tensor: torch.Tensor) -> dict[str, float]:
    """FP8 fields from real casts (the tensor's thresholds must be resolvable)."""
    out = {}
    for fmt, fp8_dtype, short in FP8:
        ref = fp8_cast_reference(tensor, fmt, fp8_dtype)
        for threshold in (fmt.flush_below, fmt.min_normal):
            assert resolvable(log2_exact(threshold) - ref["k"], ref["max_abs"]), "unsuitable test data"
        n = ref["nonzero"]
        out[f"fp8_{short}_zero"] = ref["flushed"] / n if n else math.nan
        out[f"fp8_{short}_subnormal"] = ref["subnormal"] / n if n else math.nan
    return out


def test_fp8_fields_are_fractions_of_the_finite_nonzero_elements():
    tensors = [spread(seed, 400, c, dtype, scale) for seed, dtype, c, scale in RESOLVABLE_FP8_DATA]
    tensors += [torch.cat([spread(50, 100, 3.0, torch.float32), torch.zeros(50), torch.tensor([np.nan, -np.inf])])]
    tensors += [torch.zeros(3), torch.tensor([np.nan, np.inf]), torch.zeros(0)]  # nothing finite non-zero: NaN
    hist, max_abs = rows_of(tensors)
    fields = formats.fp8_fields(hist, max_abs)
    assert set(fields) == set(formats.FP8_FIELDS)
    for i, tensor in enumerate(tensors):
        expected = fields_reference(tensor)
        for name in formats.FP8_FIELDS:
            assert fields[name].shape == (len(tensors),)
            np.testing.assert_array_equal(fields[name][i], expected[name], err_msg=f"tensor {i}, {name}")
    assert sum(expected["fp8_e4m3_zero"] > 0 for expected in map(fields_reference, tensors[:-3])) >= 3


def test_fp8_fields_of_stacked_rows_with_absent_rows():
    """History is (steps, rows): absent rows are NaN and give NaN, never an exception or a
    warning; every other entry equals the same row's fields computed alone."""
    tensors = [spread(seed, 200, c, dtype, scale) for seed, dtype, c, scale in RESOLVABLE_FP8_DATA]
    hist, max_abs = rows_of(tensors)
    hist, max_abs = hist.reshape(2, 3, layout.NUM_BINS).copy(), max_abs.reshape(2, 3).copy()
    hist[0, 1] = np.nan  # an absent row
    max_abs[0, 1] = np.nan
    max_abs[1, 2] = np.nan  # half-absent rows, either way round
    hist[1, 0, :] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stacked = formats.fp8_fields(hist, max_abs)
        alone = {(s, r): formats.fp8_fields(hist[s, r], max_abs[s, r]) for s in range(2) for r in range(3)}
    absent = {(0, 1), (1, 2), (1, 0)}
    for name in formats.FP8_FIELDS:
        assert stacked[name].shape == (2, 3)
        for (s, r), fields in alone.items():
            assert np.shape(fields[name]) == ()
            if (s, r) in absent:
                assert np.isnan(stacked[name][s, r]) and np.isnan(fields[name])
            else:
                assert stacked[name][s, r] == fields[name]
                assert stacked[name][s, r] == fields_reference(tensors[3 * s + r])[name]


# ---- 6. properties on rows of any tensor -------------------------------------------------------


@given(st.lists(gradient_tensors(max_numel=300), min_size=1, max_size=5))
def test_fp8_counts_are_nested_and_e5m2_flushes_no_more_than_e4m3(tensors):
    """0 <= flushed <= flushed + subnormal <= finite non-zero count, in each format.

    E5M2 against E4M3: 57344 = 448 * 2**7, so k_e5m2 = k_e4m3 + 7 exactly, and E5M2's flush
    threshold 2**-17 / 2**k_e5m2 = 2**(-24 - k_e4m3) lies 14 binades below E4M3's
    2**(-10 - k_e4m3); its smallest normal 2**(-21 - k_e4m3) lies 15 binades below E4M3's
    2**(-6 - k_e4m3). Every value E5M2 flushes (or leaves below normal) E4M3 flushes (or leaves
    below normal) too, and counts below a threshold only grow with it.
    """
    hist, max_abs = rows_of(tensors)
    nonzero = np.array([finite_nonzero(t).numel() for t in tensors])
    counts = {short: formats.fp8_counts(hist, max_abs, fmt) for fmt, _, short in FP8}
    for flushed, subnormal in counts.values():
        assert (flushed >= 0).all() and (subnormal >= 0).all()
        assert (flushed + subnormal <= nonzero).all()
    (f4, s4), (f5, s5) = counts["e4m3"], counts["e5m2"]
    np.testing.assert_array_equal(
        formats.amax_scale_exponent(max_abs, formats.E5M2)[max_abs > 0],
        formats.amax_scale_exponent(max_abs, formats.E4M3)[max_abs > 0] + 7,
    )
    assert (f5 <= f4).all()
    assert (f5 + s5 <= f4 + s4).all()
    fields = formats.fp8_fields(hist, max_abs)
    for name in formats.FP8_FIELDS:
        values = fields[name]
        assert (np.isnan(values) == (nonzero == 0)).all()
        assert ((values[nonzero > 0] >= 0) & (values[nonzero > 0] <= 1)).all()


# ---- what the histogram cannot resolve: documented lower bounds --------------------------------


def test_count_below_a_threshold_inside_the_last_bin_is_a_lower_bound():
    """Bin 63 holds every |x| >= 2**15: [1e9, 1e5] and [1e9, 40000] give the same row, so a
    threshold of 2**16 below max_abs cannot be resolved; the docstring says it is a lower bound."""
    x = torch.tensor([40000.0, 70000.0])
    hist, max_abs = rows_of([x])
    assert formats.count_below(hist, max_abs, 16)[0] == 0 < true_below(x, [16])[0] == 1
    assert "lower" in formats.count_below.__doc__


def test_fp8_counts_when_the_normal_threshold_is_in_the_last_bin_under_count():
    x = torch.tensor([1e9, 40000.0])  # k = -22: 40000 * 2**-22 ~ 0.0095 < 2**-6, a subnormal
    ref = fp8_cast_reference(x, formats.E4M3, torch.float8_e4m3fn)
    assert ref["subnormal"] == 1
    hist, max_abs = rows_of([x])
    flushed, subnormal = formats.fp8_counts(hist, max_abs, formats.E4M3)
    assert flushed[0] <= ref["flushed"] and flushed[0] + subnormal[0] <= ref["flushed"] + ref["subnormal"]
    assert "9.4e8" in formats.__doc__  # the module docstring names where this starts
