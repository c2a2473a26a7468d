"""Compression readiness (``gradscope.health.compression``) and the noise model under it
(``gradscope.stats.formats.quantization_noise``), against real quantization of real tensors.

The noise estimate is checked against the error of actually casting tensors (INT8 by
rounding, FP8 through torch's float8 dtypes, with the same power-of-two per-tensor scale);
verdicts on tensors built to be ready, outlier-dominated or too wide; the saliency ranking
against sums computed here from the readings.
"""

import dataclasses
import math

import numpy as np
import pytest
import torch

import gradscope
from gradscope.health import compression
from gradscope.run import records
from gradscope.run.weights import WeightState
from gradscope.stats import formats, layout


def rows_of(*tensors: torch.Tensor) -> np.ndarray:
    return gradscope.grad_stats([t.detach() for t in tensors], backend="numpy").to_rows()


def real_noise(x: torch.Tensor, short: str) -> float:
    """Σ (q(x) - x)² / Σ x², quantizing for real with the power-of-two per-tensor amax scale."""
    fmt = compression.QUANT_FORMATS[short]
    x = x.double()
    k = int(formats.amax_scale_exponent(x.abs().max().numpy(), fmt))
    scaled = x * 2.0**k
    if short == "int8":
        q = scaled.round().clamp(-127, 127)
    else:
        dtype = torch.float8_e4m3fn if short == "fp8_e4m3" else torch.float8_e5m2
        q = scaled.float().to(dtype).double()
    return float(((q * 2.0**-k - x) ** 2).sum() / (x**2).sum())


def gaussian(n=200_000, seed=0):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def heavy(n=200_000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g))


@pytest.mark.parametrize("short", ["int8", "fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("make", [gaussian, heavy])
def test_noise_estimate_is_within_ten_percent_of_real_quantization(short, make):
    x = make()
    row = rows_of(x)[0]
    estimate = formats.quantization_noise(row[layout.HIST :], row[layout.MAX_ABS], compression.QUANT_FORMATS[short])
    assert estimate / row[layout.SUMSQ] == pytest.approx(real_noise(x, short), rel=0.1)


def test_flushed_fraction_is_exact_for_int8():
    x = heavy()
    row = rows_of(x)[0]
    flushed, _ = formats.fp8_counts(row[layout.HIST :], row[layout.MAX_ABS], formats.INT8)
    k = int(formats.amax_scale_exponent(x.abs().max().double().numpy(), formats.INT8))
    assert flushed == int(((x.double().abs() * 2.0**k).round() == 0).sum())


def state_of(tensors, row_of, n_rows, taylor=None) -> WeightState:
    rows = rows_of(*tensors)
    t = len(tensors)
    gw, gw2 = (np.zeros(t), np.zeros(t)) if taylor is None else taylor
    state = WeightState(n_rows)
    ndim = np.array([x.dim() for x in tensors])
    state.add(records.Weights(3, rows, np.array(row_of), ndim, np.asarray(gw, float), np.asarray(gw2, float)))
    return state


def judged(state, names):
    return compression.judge_compression(state, tuple(names), ("Linear",) * len(names))


def test_verdicts_ready_outliers_and_bias_only():
    g = torch.Generator().manual_seed(1)
    plain = torch.randn(256, 256, generator=g)
    spiky = torch.randn(256, 256, generator=g)
    spiky.view(-1)[:20] *= 200.0  # 0.03% of the weights set the per-tensor scale
    bias = torch.randn(256, generator=g)
    report = judged(state_of([plain, spiky, bias], [0, 1, 2], 3), ["plain", "spiky", "norm"])
    plain_row, spiky_row, norm_row = report.layers
    assert plain_row.verdict == "ready" and plain_row.format == "int8"
    assert plain_row.formats["int8"]["noise"] <= compression.READY_NOISE
    assert spiky_row.formats["int8"]["verdict"] == "per-channel scaling needed"
    assert spiky_row.formats["int8"]["noise"] > compression.READY_NOISE >= spiky_row.formats["int8"]["bulk_noise"]
    assert spiky_row.verdict == "ready" and spiky_row.format == "fp8_e4m3"  # FP8's range takes the outliers
    assert norm_row.verdict is None and norm_row.quantized_numel == 0 and norm_row.numel == 256
    assert plain_row.quantized_numel == plain.numel()
    assert "INT8" in plain_row.reason and "dB" in plain_row.reason


def test_e5m2_keeps_any_weights_in_16_bit_two_mantissa_bits_are_too_few():
    # Its rounding noise (~3e-3 relative) is above READY_NOISE for any spread of values,
    # outliers or not: the verdict is about precision, not range.
    layer = judged(state_of([torch.randn(128, 128)], [0], 1), ["w"]).layers[0]
    e5m2 = layer.formats["fp8_e5m2"]
    assert e5m2["verdict"] == "keep in 16-bit" and min(e5m2["noise"], e5m2["bulk_noise"]) > compression.READY_NOISE


def test_nonfinite_weights_are_kept():
    w = torch.randn(16, 16)
    w[0, 0] = float("nan")
    layer = judged(state_of([w], [0], 1), ["broken"]).layers[0]
    assert layer.verdict == "keep in 16-bit" and "NaN" in layer.reason


def test_saliency_sums_absolute_per_step_layer_sums_and_ranks_by_it():
    tensors = [torch.randn(4, 4), torch.randn(4), torch.randn(4, 4)]
    rows = rows_of(*tensors)
    state = WeightState(2)
    readings = [([1.0, -3.0, 0.5], [1.0, 2.0, 9.0]), ([2.0, 1.0, -0.25], [0.5, 0.5, 4.0])]
    for step, (gw, gw2) in enumerate(readings):
        state.add(records.Weights(step, rows, np.array([0, 0, 1]), np.array([2, 1, 2]), np.array(gw), np.array(gw2)))
    report = judged(state, ["a", "b"])
    a, b = report.layers
    assert a.saliency == abs(1.0 - 3.0) + abs(2.0 + 1.0) and b.saliency == 0.5 + 0.25
    assert a.fisher == 1 + 2 + 0.5 + 0.5 and b.fisher == 13.0
    assert report.readings == 2 and report.step == 1
    # saliency ranks b first (0.75 < 5), fisher would rank a first (4 < 13)
    assert report.least_important == ("b", "a") and (a.saliency_rank, b.saliency_rank) == (2, 1)
    assert a.fisher_per_element == a.fisher / 20 and b.saliency_per_element == b.saliency / 16
    nan = records.Weights(2, rows, np.array([0, 0, 1]), np.array([2, 1, 2]), np.array([math.nan, 0, 0]), np.ones(3))
    state.add(nan)
    assert state.readings == 2 and state.step == 2 and state.saliency[0] == a.saliency  # nothing added


def test_to_dict_is_plain_json_and_text_names_the_outlier_layer():
    import json

    spiky = torch.randn(128, 128)
    spiky.view(-1)[:5] *= 500.0
    report = judged(state_of([torch.randn(64, 64), spiky], [0, 1], 2), ["fine", "spiky"])
    data = json.loads(json.dumps(report.to_dict()))
    assert [layer["name"] for layer in data["layers"]] == ["fine", "spiky"]
    assert data["layers"][1]["formats"]["int8"]["verdict"] == "per-channel scaling needed"
    assert "least important" in str(report)


def test_bulk_noise_is_the_noise_of_the_tensor_without_its_outliers():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(200_000, generator=g)
    x[:50] *= 300.0  # 0.025%: with the Gaussian's 13 values in [4, 8), the top 0.1% is everything >= 4
    layer = judged(state_of([x.reshape(400, 500)], [0], 1), ["spiky"]).layers[0]
    bulk = x[x.abs() < 4].double()
    for short in ("int8", "fp8_e4m3"):
        k = int(formats.amax_scale_exponent(np.array(np.nextafter(4.0, 0)), compression.QUANT_FORMATS[short]))
        scaled = bulk * 2.0**k
        if short == "int8":
            q = scaled.round().clamp(-127, 127)
        else:
            q = scaled.float().to(torch.float8_e4m3fn).double()
        real = float(((q * 2.0**-k - bulk) ** 2).sum() / (bulk**2).sum())
        # the bulk's sum of squares comes from its binades (values uniform in each): coarser
        assert layer.formats[short]["bulk_noise"] == pytest.approx(real, rel=0.25)


def figures(noise, bulk_noise, flushed=0.0):
    """One tensor's (T=1) figures as _tensor_figures gives them, for a tensor with sumsq 1,
    1000 non-zero values and a bulk with sum of squares 1."""
    return np.array([[flushed * 1000, 0.0, noise, bulk_noise, 1.0]])


@pytest.mark.parametrize(
    ("int8", "e4m3", "verdict", "fmt"),
    [
        ((2e-4, 2e-4), (5e-4, 5e-4), "ready", "int8"),  # both ready: the one with less noise
        ((9e-4, 9e-4), (5e-4, 5e-4), "ready", "fp8_e4m3"),
        ((1e-3, 1e-3), (2e-3, 2e-3), "ready", "int8"),  # ready at the threshold itself
        ((5e-2, 2e-4), (2e-3, 9e-4), "per-channel scaling needed", None),
        ((5e-2, 5e-3), (2e-3, 1.5e-3), "keep in 16-bit", None),
    ],
)
def test_layer_verdict_rules(int8, e4m3, verdict, fmt):
    rows = np.zeros((1, layout.ROW_WIDTH))
    rows[0, layout.SUMSQ], rows[0, layout.HIST + 40], rows[0, layout.MAX_ABS] = 1.0, 1000, 1.0
    judged_layer = compression._judge_layer(
        rows, {"int8": figures(*int8), "fp8_e4m3": figures(*e4m3), "fp8_e5m2": figures(3e-3, 3e-3)}
    )
    assert (judged_layer["verdict"], judged_layer["format"]) == (verdict, fmt)
    assert judged_layer["formats"]["fp8_e5m2"]["verdict"] == "keep in 16-bit"
    if verdict == "per-channel scaling needed":
        assert "INT8 would reach 2.0e-04" in judged_layer["reason"]


def test_zero_and_out_of_range_matrices_are_not_judged():
    zero = torch.zeros(8, 8)
    huge = torch.randn(8, 8)
    huge[0, 0] = 40_000.0  # the histogram's top bin (from 2**15) holds everything above
    report = judged(state_of([zero, huge], [0, 1], 2), ["zero", "huge"])
    assert [layer.verdict for layer in report.layers] == [None, None]
    assert "all zero" in report.layers[0].reason and "beyond the histogram's range" in report.layers[1].reason


def test_a_single_reading_at_step_0_is_judged_and_the_newest_rows_win():
    w = torch.randn(16, 16)
    state = WeightState(1)
    rows = rows_of(w)
    state.add(records.Weights(0, rows, np.array([0]), np.array([2]), np.ones(1), np.ones(1)))
    report = judged(state, ["w"])
    assert report is not None and report.step == 0 and report.layers[0].verdict == "ready"
    assert report.layers[0].type == "Linear" and report.layers[0].numel == 256
    older = rows_of(torch.full((16, 16), float("nan")))
    state.add(records.Weights(-1, older, np.array([0]), np.array([2]), np.ones(1), np.ones(1)))  # arrives late
    assert judged(state, ["w"]).layers[0].verdict == "ready" and state.readings == 2
    assert compression.judge_compression(WeightState(1), ("w",), ("Linear",)) is None
    assert compression.judge_compression(None, ("w",), ("Linear",)) is None


def test_equal_saliencies_keep_the_rows_order_and_the_text_names_what_is_not_ready():
    tensors = [torch.randn(4, 4) for _ in range(3)]
    report = judged(state_of(tensors, [0, 1, 2], 3), ["c", "a", "b"])  # all saliencies 0
    assert report.least_important == ("c", "a", "b")
    layer = dataclasses.replace(report.layers[1], verdict="keep in 16-bit", reason="because")
    text = str(dataclasses.replace(report, layers=(report.layers[0], layer, report.layers[2])))
    assert "2 ready, 0 per-channel scaling needed, 1 keep in 16-bit" in text
    assert "a: keep in 16-bit: because" in text and "c: " not in text.split("\n", 1)[1].split("least")[0]


def test_layer_fractions_and_reason_match_real_casts():
    x = heavy(n=64 * 1024, seed=5)
    layer = judged(state_of([x.reshape(256, 256)], [0], 1), ["w"]).layers[0]
    nonzero = int((x != 0).sum())
    for short, dtype in (("int8", None), ("fp8_e4m3", torch.float8_e4m3fn)):
        fmt = compression.QUANT_FORMATS[short]
        k = int(formats.amax_scale_exponent(x.abs().max().double().numpy(), fmt))
        scaled = x.double().abs() * 2.0**k
        cast = scaled.round() if dtype is None else scaled.float().to(dtype).double()
        assert layer.formats[short]["flushed"] == int(((cast == 0) & (x != 0)).sum()) / nonzero
        if dtype is not None:  # kept, but below the smallest normal
            subnormal = int(((cast != 0) & (scaled < fmt.min_normal)).sum())
            assert layer.formats[short]["subnormal"] == subnormal / nonzero
    best = layer.formats[layer.format]
    assert f"SQNR {-10 * math.log10(best['noise']):.0f} dB" in layer.reason


def test_inf_alone_keeps_a_layer_in_16_bit():
    w = torch.randn(8, 8)
    w[1, 1] = float("inf")
    assert judged(state_of([w], [0], 1), ["w"]).layers[0].verdict == "keep in 16-bit"


def test_to_dict_top_level_keys():
    report = judged(state_of([torch.randn(8, 8)], [0], 1), ["w"])
    data = report.to_dict()
    assert data["step"] == 3 and data["readings"] == 1 and data["ready_noise"] == compression.READY_NOISE
    assert data["least_important"] == ["w"]
