"""The ``number_format`` check (``underflow`` and ``overflow`` of float16/bfloat16), from rows of
real low-precision tensors fed to a ``RunState``: subnormal gradients, gradients the format
flushed to zero (and that ``dead`` leaves alone), values near the format's largest, and the
same rules on module outputs from ``Forward`` records. Expected fractions are counted on the
tensors themselves."""

import dataclasses
import json

import numpy as np
import pytest
import run_builders
import torch

from gradscope import Thresholds
from gradscope.health.checks import dead, number_format
from gradscope.health.findings import SUGGESTIONS
from gradscope.health.view import view_of
from gradscope.run import records
from gradscope.run.state import RunState
from gradscope.stats.host_backend import host_rows

T = Thresholds(sustain=3)
F16_MIN_NORMAL = 2.0**-14
F16_LARGEST_SUBNORMAL = 2.0**-14 - 2.0**-24


def rows_of(tensors):
    return host_rows(tensors)


def state_of(steps, dtypes, names=None, modules=()):
    """``steps``: per sampled step, one tensor per row (None: the row had no gradient)."""
    names = names or tuple("abcdefgh"[: len(steps[0])])
    numel = max(t.numel() for tensors in steps for t in tensors if t is not None)
    info = dataclasses.replace(run_builders.run_info(names, numel=numel), row_dtypes=tuple(dtypes), modules=modules)
    state = RunState(info)
    for step, tensors in enumerate(steps):
        present = np.array([t is not None for t in tensors])
        rows = rows_of([t if t is not None else torch.zeros(0) for t in tensors])
        state.apply(records.Sampled(step, rows, present, np.arange(len(tensors))))
    return state


def detect(state, thresholds=T):
    return number_format.detect(view_of(state, thresholds), thresholds)


def fp16(*parts):
    """A float16 tensor of ``(count, value)`` parts."""
    return torch.cat([torch.full((count,), value) for count, value in parts]).to(torch.float16)


def below_normal_fraction(tensor, min_normal=F16_MIN_NORMAL):
    """Of the finite non-zero values, the fraction below ``min_normal``, counted on the tensor."""
    x = tensor.double()
    nonzero = x[torch.isfinite(x) & (x != 0)].abs()
    return (nonzero < min_normal).sum().item() / nonzero.numel()


def subnormal(k, n=100, zeros=7):
    """``k`` of ``n`` non-zero float16 values subnormal (``2**-20``), the rest normal, plus zeros."""
    return fp16((k, 2.0**-20), (n - k, 2.0**-6), (zeros, 0.0))


HEALTHY = fp16((50, 0.25), (50, -0.125))


# --------------------------------------------------------------------------------------
# underflow: subnormal float16
# --------------------------------------------------------------------------------------


def test_subnormal_float16_gradients():
    tensor = subnormal(60)
    (finding,) = detect(state_of([[HEALTHY, tensor]] * 2, ["float16", "float16"]))
    fraction = below_normal_fraction(tensor)
    assert fraction == 0.6
    assert (finding.kind, finding.severity, finding.layer, finding.layers) == ("underflow", "warning", "b", ("b",))
    assert finding.step == finding.since_step == 1
    assert finding.evidence == {
        "pass": "backward",
        "dtype": "float16",
        "below_normal_fraction": {"b": fraction},
        "min_normal": F16_MIN_NORMAL,
        "hist_step": {"b": 1},  # the histogram the fraction was read from
    }
    assert finding.message.startswith("60% of the non-zero gradient values of 'b' are below float16's smallest normal")
    assert finding.suggestion == SUGGESTIONS["underflow"] and finding.cause is None
    json.dumps(finding.to_dict())


@pytest.mark.parametrize(("fraction", "k", "reported"), [(0.5, 50, True), (0.5, 49, False), (0.25, 25, True)])
def test_the_underflow_fraction_is_inclusive(fraction, k, reported):
    tensor = subnormal(k)
    thresholds = Thresholds(sustain=3, underflow_fraction=fraction)
    found = detect(state_of([[tensor]], ["float16"]), thresholds)
    if reported:
        assert [f.evidence["below_normal_fraction"] for f in found] == [{"a": below_normal_fraction(tensor)}]
        assert below_normal_fraction(tensor) == fraction
    else:
        assert found == []


def test_the_smallest_normal_is_not_below_it():
    assert detect(state_of([[fp16((10, F16_MIN_NORMAL))]], ["float16"])) == []
    (finding,) = detect(state_of([[fp16((10, F16_LARGEST_SUBNORMAL))]], ["float16"]))
    assert finding.evidence["below_normal_fraction"] == {"a": 1.0}
    # Values too small for float16 flush to zero on the cast: none are left to be below normal.
    assert float(torch.tensor(2.0**-26).to(torch.float16)) == 0.0


def test_several_subnormal_rows_most_affected_first():
    seventy, ninety, fifty_five = subnormal(70), subnormal(90), subnormal(55)
    (finding,) = detect(state_of([[seventy, HEALTHY, ninety, fifty_five]], ["float16"] * 4))
    assert finding.layer == "c" and finding.layers == ("c", "a", "d")
    expected = {
        "c": below_normal_fraction(ninety),
        "a": below_normal_fraction(seventy),
        "d": below_normal_fraction(fifty_five),
    }
    assert list(expected.values()) == [0.9, 0.7, 0.55]
    assert finding.evidence["below_normal_fraction"] == expected
    assert list(finding.evidence["below_normal_fraction"]) == ["c", "a", "d"]
    assert "; also 'a', 'd'" in finding.message


def test_only_the_latest_histogram_counts():
    assert detect(state_of([[subnormal(90)], [HEALTHY]], ["float16"])) == []
    assert len(detect(state_of([[HEALTHY], [subnormal(90)]], ["float16"]))) == 1
    # A row without gradient at the latest step is judged by its own latest histogram, and the
    # finding says which step that is.
    (finding,) = detect(state_of([[subnormal(90), HEALTHY], [None, HEALTHY]], ["float16"] * 2))
    assert finding.layer == "a" and finding.step == 0 and finding.evidence["hist_step"] == {"a": 0}


def test_bfloat16_rows_never_get_the_subnormal_rule():
    tensor = torch.full((64,), 2.0**-20).to(torch.bfloat16)  # below float16's normals, normal in bfloat16
    assert detect(state_of([[tensor]], ["bfloat16"])) == []
    assert len(detect(state_of([[tensor.to(torch.float16)]], ["float16"]))) == 1


def test_bfloat16_rows_get_the_subnormal_rule_only_when_every_value_is_subnormal():
    """bfloat16's subnormals lie below the histogram's range: seen only through max_abs."""
    tensor = torch.full((64,), 2.0**-130).to(torch.bfloat16)  # a bfloat16 subnormal
    assert float(tensor[0]) == 2.0**-130
    (finding,) = detect(state_of([[tensor]], ["bfloat16"]))
    assert finding.kind == "underflow" and finding.evidence["dtype"] == "bfloat16"
    assert finding.evidence["below_normal_fraction"] == {"a": 1.0}
    assert "below ``2**-126``" in number_format.__doc__


# --------------------------------------------------------------------------------------
# underflow: flushed to zero — and what dead says about the same rows
# --------------------------------------------------------------------------------------

ZERO16 = torch.zeros(64, dtype=torch.float16)
ZERO32 = torch.zeros(64)


def dead_layers(state, thresholds=T):
    return [f.layer for f in dead.detect(view_of(state, thresholds), thresholds)]


def test_all_zero_float16_rows_while_another_row_is_subnormal_were_flushed():
    steps = [[HEALTHY, HEALTHY, ZERO32, HEALTHY]] + [[ZERO16, subnormal(80), ZERO32, HEALTHY]] * 3
    state = state_of(steps, ["float16", "float16", "float32", "float16"])
    root, flushed = detect(state)
    assert root.layer == "b" and "rule" not in root.evidence  # the subnormal finding
    assert (flushed.kind, flushed.severity, flushed.layer, flushed.layers) == ("underflow", "warning", "a", ("a",))
    assert flushed.since_step == 1 and flushed.step == 3
    assert flushed.evidence == {"pass": "backward", "dtype": "float16", "layers": ["a"], "rule": "flushed"}
    assert flushed.cause == {"kind": "underflow", "layer": "b", "step": 3}
    assert "for 3 sampled steps" in flushed.message and "already subnormal" in flushed.message
    # 'a' is not reported dead; the float32 row zero for 4 steps is.
    assert dead_layers(state) == ["c"]


def test_every_low_precision_row_all_zero_was_flushed():
    steps = [[ZERO16, ZERO16, ZERO32]] * 3
    state = state_of(steps, ["float16", "float16", "float32"])
    (flushed,) = detect(state)
    assert flushed.layers == ("a", "b") and flushed.layer == "b" and flushed.cause is None
    assert flushed.since_step == 0 and "for at least 3 sampled steps" in flushed.message
    assert "every low-precision gradient of the model" in flushed.message
    assert dead_layers(state) == ["c"]
    # bfloat16 flushes too.
    assert detect(state_of([[ZERO16.bfloat16()] * 2] * 3, ["bfloat16"] * 2))[0].layers == ("a", "b")


def test_an_all_zero_float16_row_next_to_live_ones_is_dead_not_flushed():
    state = state_of([[ZERO16, HEALTHY]] * 3, ["float16", "float16"])
    assert detect(state) == []
    assert dead_layers(state) == ["a"]


def test_flushed_needs_sustain_steps():
    steps = [[HEALTHY, subnormal(80)]] * 2 + [[ZERO16, subnormal(80)]] * 2
    state = state_of(steps, ["float16", "float16"])
    assert [f.evidence.get("rule") for f in detect(state)] == [None]  # the subnormal finding only
    (flushed,) = [f for f in detect(state_of([*steps, steps[-1]], ["float16"] * 2)) if f.evidence.get("rule")]
    assert flushed.layers == ("a",) and flushed.since_step == 2


# --------------------------------------------------------------------------------------
# overflow
# --------------------------------------------------------------------------------------


def test_float16_gradients_within_one_binade_of_the_largest():
    big = fp16((3, 40000.0), (5, 1.0))
    edge = fp16((1, 32768.0), (5, -1.0))
    (finding,) = detect(state_of([[HEALTHY, big, edge, fp16((4, 30000.0))]], ["float16"] * 4))
    assert (finding.kind, finding.severity, finding.layer, finding.layers) == ("overflow", "warning", "b", ("b", "c"))
    assert finding.evidence == {"pass": "backward", "dtype": "float16", "max_abs": {"b": 40000.0, "c": 32768.0}}
    assert finding.message.startswith("the float16 gradient of 'b' reaches 40000, within one binade of float16's")
    assert finding.suggestion == SUGGESTIONS["overflow_format"]


@pytest.mark.parametrize(
    ("dtype", "largest_below_the_top_binade"),
    [(torch.float16, 32768.0 - 16.0), (torch.bfloat16, 2.0**127 * (1 - 2.0**-8))],
    ids=["float16", "bfloat16"],
)
def test_the_binade_below_the_top_one_is_not_overflow(dtype, largest_below_the_top_binade):
    tensor = torch.full((4,), largest_below_the_top_binade, dtype=torch.float64).to(dtype)
    assert float(tensor[0]) == largest_below_the_top_binade  # representable, and below the top binade
    assert detect(state_of([[tensor]], [str(dtype).removeprefix("torch.")])) == []


def test_bfloat16_overflow_and_its_range():
    top = torch.full((4,), 2.0**127).to(torch.bfloat16)
    (finding,) = detect(state_of([[top, fp16((4, 40000.0)).bfloat16()]], ["bfloat16"] * 2))
    assert finding.layers == ("a",) and finding.evidence["dtype"] == "bfloat16"


def test_overflow_reads_the_latest_present_step():
    big = fp16((3, 40000.0))
    assert detect(state_of([[big], [HEALTHY]], ["float16"])) == []
    (finding,) = detect(state_of([[big], [None]], ["float16"]))
    assert finding.layers == ("a",)


# --------------------------------------------------------------------------------------
# float32 runs, unknown dtypes
# --------------------------------------------------------------------------------------


def test_float32_runs_and_unknown_dtypes_produce_nothing():
    trouble = [subnormal(90).float(), torch.full((4,), 40000.0), ZERO32]
    steps = [trouble] * 4
    assert detect(state_of(steps, ["float32"] * 3)) == []
    assert detect(state_of(steps, ["float64", "", "int8"])) == []
    assert detect(state_of(steps, [])) == []  # logs written before dtypes were recorded
    assert detect(state_of(steps, ["float16"] * 2)) == []  # not one dtype per row: unknown


# --------------------------------------------------------------------------------------
# activations (module outputs, from forward statistics)
# --------------------------------------------------------------------------------------

MODULES = ("(root)", "a", "b", "c", "d")


def forward_state(outputs, dtypes, autocast="float16"):
    """A run with forward statistics: one sampled float32 gradient row and one ``Forward`` record
    whose module outputs are ``outputs`` (None: the module did not run)."""
    state = state_of([[HEALTHY.float()]], ["float32"], modules=MODULES[: len(outputs)])
    present = [t is not None for t in outputs]
    rows = rows_of([t if t is not None else torch.zeros(0) for t in outputs])
    order = np.array([np.arange(len(outputs)), np.where(present, np.arange(len(outputs)) + 10, -1)])
    state.apply(records.Forward(0, rows, np.zeros_like(rows), order, tuple(dtypes), autocast))
    return state


def test_float16_activations_near_the_largest_value():
    outputs = [HEALTHY, fp16((2, 40000.0)), HEALTHY, fp16((1, -32768.0)), fp16((1, 60000.0))]
    dtypes = ["float16", "float16", "float16", "float16", "float32"]
    (finding,) = detect(forward_state(outputs, dtypes))
    assert (finding.kind, finding.layer, finding.layers, finding.step) == ("overflow", "a", ("a", "c"), 0)
    assert finding.evidence == {"pass": "forward", "dtype": "float16", "max_abs": {"a": 40000.0, "c": 32768.0}}
    assert finding.message.startswith("the float16 output of module 'a' (autocast float16) reaches 40000")
    (finding,) = detect(forward_state(outputs, dtypes, autocast=""))
    assert "(autocast" not in finding.message


def test_float16_activations_below_32768_are_not_overflow():
    assert detect(forward_state([HEALTHY, fp16((2, 32752.0))], ["float16", "float16"])) == []


def test_subnormal_float16_activations():
    a, c = subnormal(60), subnormal(95)
    outputs = [HEALTHY, a, HEALTHY, c, subnormal(95).float()]
    (finding,) = detect(forward_state(outputs, ["float16"] * 4 + ["float32"]))
    assert (finding.kind, finding.layer, finding.layers) == ("underflow", "c", ("a", "c"))  # worst; model order
    assert finding.evidence == {
        "pass": "forward",
        "dtype": "float16",
        "below_normal_fraction": {"a": below_normal_fraction(a), "c": below_normal_fraction(c)},
    }
    assert finding.message.startswith("95% of the non-zero float16 outputs of module 'c' (autocast float16)")
    assert finding.message.endswith("; also 'a'")


def test_activations_of_modules_that_did_not_run_or_are_not_low_precision():
    bf16_top = torch.full((2,), 2.0**127).to(torch.bfloat16)
    outputs = [HEALTHY, None, bf16_top, subnormal(99).bfloat16(), None]
    state = forward_state(outputs, ["float16", "float16", "bfloat16", "bfloat16", ""])
    (finding,) = detect(state)  # bfloat16 overflow only; subnormal float16 is not bfloat16's subnormal
    assert (finding.kind, finding.layers) == ("overflow", ("b",))
    # Absent modules keep their (stale) rows out of the verdict.
    rows = rows_of([HEALTHY, fp16((2, 40000.0)), subnormal(99)])
    order = np.array([[0, 1, 2], [10, -1, -1]])
    state = state_of([[HEALTHY.float()]], ["float32"], modules=MODULES[:3])
    state.apply(records.Forward(0, rows, np.zeros_like(rows), order, ("float16",) * 3, "float16"))
    assert detect(state) == []
    assert detect(forward_state([subnormal(90), fp16((2, 40000.0))], ["float32", "float32"])) == []
