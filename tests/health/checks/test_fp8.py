"""The ``fp8_range`` check: layers whose gradients a cast to FP8 E5M2 (per-tensor power-of-two
amax scaling) would flush to zero in large part, from rows of real tensors fed to a
``RunState``. The expected fractions come from casting the tensors themselves to
``torch.float8_e5m2`` / ``torch.float8_e4m3fn`` after scaling."""

import dataclasses

import numpy as np
import pytest
import run_builders
import torch

from gradscope import Thresholds
from gradscope.health.checks import fp8
from gradscope.health.findings import SUGGESTIONS
from gradscope.health.report import assess
from gradscope.health.view import view_of
from gradscope.run import records
from gradscope.run.state import RunState
from gradscope.stats import formats, layout
from gradscope.stats.host_backend import host_rows

FP8 = {"e5m2": torch.float8_e5m2, "e4m3": torch.float8_e4m3fn}


def amax_scaled_cast(tensor: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cast, nonzero)``: the finite non-zero values of ``tensor``, multiplied by the largest
    ``2**k`` keeping the largest of them within ``dtype``'s range, cast to ``dtype`` (and back)."""
    x = tensor.double().reshape(-1)
    nonzero = x[torch.isfinite(x) & (x != 0)]
    amax, largest = nonzero.abs().max().item(), torch.finfo(dtype).max
    k = 0
    while amax * 2.0**k > largest:
        k -= 1
    while amax * 2.0 ** (k + 1) <= largest:
        k += 1
    return (nonzero * 2.0**k).to(dtype).double(), nonzero


def fractions(tensor: torch.Tensor) -> dict[str, float]:
    """Per FP8 format: fractions of the finite non-zero values flushed to zero and left subnormal."""
    out = {}
    for short, dtype in FP8.items():
        cast, nonzero = amax_scaled_cast(tensor, dtype)
        min_normal = torch.finfo(dtype).smallest_normal
        out[f"fp8_{short}_zero"] = (cast == 0).sum().item() / nonzero.numel()
        out[f"fp8_{short}_subnormal"] = ((cast != 0) & (cast.abs() < min_normal)).sum().item() / nonzero.numel()
    return out


def mixture(big=0, tiny=0, e4m3_only=0, e5m2_subnormal=0, e5m2_smallest=0, e4m3_subnormal=0, zeros=0, amax=3.0, seed=0):
    """Gradient values relative to ``amax`` (whose mantissa, 1.5, keeps every group clear of a
    rounding threshold once scaled): ``big`` near ``amax``; ``tiny`` flushed in both FP8 formats;
    ``e4m3_only`` flushed in E4M3 only; ``e5m2_subnormal``/``e4m3_subnormal`` subnormal in that
    format (and flushed in E4M3 / normal in E5M2); ``e5m2_smallest`` just above half E5M2's
    smallest subnormal once scaled (rounded up to it; flushed in E4M3); exact ``zeros``. One
    value is ``amax``."""
    g = torch.Generator().manual_seed(seed)

    def group(count, low, high):
        signs = torch.where(torch.rand(count, generator=g) < 0.5, -1.0, 1.0)
        return signs * amax * (low + (high - low) * torch.rand(count, generator=g))

    parts = [
        torch.tensor([amax]),
        group(big - 1, 0.5, 1.0) if big else torch.zeros(0),
        group(tiny, 2.0**-40, 1.9 * 2.0**-40),
        group(e4m3_only, 1.1 * 2.0**-24, 1.4 * 2.0**-24),
        group(e5m2_subnormal, 1.1 * 2.0**-31, 1.4 * 2.0**-31),
        group(e5m2_smallest, 1.1 * 2.0**-32, 1.25 * 2.0**-32),
        group(e4m3_subnormal, 1.1 * 2.0**-16, 1.4 * 2.0**-16),
        torch.zeros(zeros),
    ]
    values = torch.cat(parts) if big else torch.cat(parts[1:])
    return values[torch.randperm(len(values), generator=g)]


def state_of(steps, names=None):
    """``steps``: per sampled step, one float32 gradient tensor per row."""
    names = names or tuple("abcdefgh"[: len(steps[0])])
    numel = max(t.numel() for tensors in steps for t in tensors)
    info = dataclasses.replace(run_builders.run_info(names, numel=numel), row_dtypes=("float32",) * len(names))
    state = RunState(info)
    for step, tensors in enumerate(steps):
        rows = host_rows(tensors)
        state.apply(records.Sampled(step, rows, np.ones(len(tensors), bool), np.arange(len(tensors))))
    return state


DEFAULT = Thresholds()


def detect(state, thresholds=DEFAULT):
    return fp8.detect(view_of(state, thresholds), thresholds)


def test_the_mixture_lands_where_it_is_meant_to():
    tensor = mixture(big=10, tiny=20, e4m3_only=30, e5m2_subnormal=40, e5m2_smallest=5, e4m3_subnormal=50)
    assert fractions(tensor) == {
        "fp8_e5m2_zero": 20 / 155,
        "fp8_e5m2_subnormal": 45 / 155,
        "fp8_e4m3_zero": 95 / 155,
        "fp8_e4m3_subnormal": 50 / 155,
    }
    cast, _ = amax_scaled_cast(tensor, torch.float8_e5m2)
    assert (cast.abs() == 2.0**-16).sum() == 5, "e5m2_smallest rounds up to the smallest subnormal"


GRADIENTS = {
    "a": mixture(big=90, tiny=10, e4m3_subnormal=7, seed=1),  # 10/107 flushed
    "b": mixture(big=60, tiny=40, zeros=25, seed=2),  # 0.4 (zeros are not counted)
    "c": mixture(big=70, e4m3_only=30, e5m2_subnormal=20, seed=3),  # nothing flushed in E5M2
    "d": mixture(big=120, tiny=80, seed=4),  # 0.4, tied with b
    "e": mixture(big=96, tiny=4, seed=5),  # 0.04: below fp8_flush_fraction
    "f": mixture(big=95, tiny=5, seed=6),  # 0.05: at it
}


def test_layers_e5m2_would_flush_most_affected_first():
    expected = {name: fractions(t) for name, t in GRADIENTS.items()}
    assert [round(expected[n]["fp8_e5m2_zero"], 4) for n in "abcdef"] == [0.0935, 0.4, 0.0, 0.4, 0.04, 0.05]
    (finding,) = detect(state_of([list(GRADIENTS.values())], names=tuple(GRADIENTS)))
    assert (finding.kind, finding.severity, finding.layer) == ("fp8_range", "info", "b")
    assert finding.layers == ("b", "d", "a", "f")
    assert finding.step == finding.since_step == 0
    assert finding.evidence == {
        **{field: {name: expected[name][field] for name in ("b", "d", "a", "f")} for field in formats.FP8_FIELDS},
        "hist_step": dict.fromkeys(("b", "d", "a", "f"), 0),  # the histograms' step
    }
    e4m3 = round(100 * expected["b"]["fp8_e4m3_zero"])
    assert finding.message == (
        f"in FP8 E5M2 (per-tensor amax scaling) 40% of the non-zero gradient values of 'b' would be flushed "
        f"to zero (E4M3: {e4m3}%); also 'd', 'a', 'f'"
    )
    assert finding.suggestion == SUGGESTIONS["fp8_range"]


def test_agrees_with_fp8_fields_on_the_same_rows():
    tensors = list(GRADIENTS.values())
    rows = host_rows(tensors)
    fields = formats.fp8_fields(rows[:, layout.HIST :], rows[:, layout.MAX_ABS])
    for r, tensor in enumerate(tensors):
        for name, value in fractions(tensor).items():
            assert fields[name][r] == value, (r, name)


@pytest.mark.parametrize(("fraction", "layers"), [(0.05, ("b", "d", "a", "f")), (0.06, ("b", "d", "a")), (0.5, ())])
def test_the_flush_fraction_is_inclusive(fraction, layers):
    state = state_of([list(GRADIENTS.values())], names=tuple(GRADIENTS))
    found = detect(state, Thresholds(fp8_flush_fraction=fraction))
    assert tuple(layer for f in found for layer in f.layers) == layers


@pytest.mark.parametrize("amax", [3.0 * 2.0**-4, 3.0, 3.0 * 2.0**8])
def test_flushing_is_relative_to_the_scaled_amax(amax):
    tensor = mixture(big=70, tiny=30, e5m2_subnormal=10, e5m2_smallest=10, amax=amax, seed=7)
    assert fractions(tensor)["fp8_e5m2_zero"] == 30 / 120
    (finding,) = detect(state_of([[tensor]]))
    assert finding.evidence["fp8_e5m2_zero"] == {"a": 30 / 120}
    assert finding.evidence["fp8_e5m2_subnormal"] == {"a": 20 / 120}


def test_the_scale_keeps_amax_within_the_format():
    # amax = 1.9 * 2**14 after the largest scale 2**14: one more doubling (62259) exceeds 57344.
    # Values at 1.2 * 2**-32 scale to 0.6 * 2**-17, below half the smallest subnormal: flushed.
    g = torch.Generator().manual_seed(9)
    tensor = torch.cat([torch.tensor([1.9]), 0.5 + torch.rand(69, generator=g), torch.full((30,), 1.2 * 2.0**-32)])
    cast, _ = amax_scaled_cast(tensor, torch.float8_e5m2)
    assert torch.tensor(1.9 * 2.0**15) > torch.finfo(torch.float8_e5m2).max >= cast.abs().max()
    assert fractions(tensor)["fp8_e5m2_zero"] == 0.3
    (finding,) = detect(state_of([[tensor]]))
    assert finding.evidence["fp8_e5m2_zero"] == {"a": 0.3}


def test_small_gradients_are_scaled_up_not_flushed():
    tensor = torch.linspace(1e-7, 4e-6, 200)  # all below E5M2's smallest subnormal unscaled
    assert (tensor.to(torch.float8_e5m2).float() == 0).all()
    assert fractions(tensor)["fp8_e5m2_zero"] == 0.0
    assert detect(state_of([[tensor]])) == []


def test_e4m3_losses_alone_are_not_reported():
    tensor = GRADIENTS["c"]
    assert fractions(tensor)["fp8_e4m3_zero"] >= 0.25
    assert detect(state_of([[tensor]])) == []


def test_only_the_latest_histogram_counts():
    flushing, fine = GRADIENTS["b"], mixture(big=100, seed=8)
    assert detect(state_of([[flushing], [fine]])) == []
    assert [f.layers for f in detect(state_of([[fine], [flushing]]))] == [("a",)]


def test_an_fp8_range_finding_leaves_a_run_healthy():
    state = state_of([[GRADIENTS["a"], GRADIENTS["b"], GRADIENTS["c"]]] * 2)
    report = assess(state, Thresholds(sustain=2))
    assert [(f.kind, f.severity) for f in report.findings] == [("fp8_range", "info")]
    assert report.status == "healthy"
    assert [layer.status for layer in report.layers] == ["healthy"] * 3
    assert [layer.fp8_e5m2_zero for layer in report.layers] == [
        fractions(GRADIENTS[name])["fp8_e5m2_zero"] for name in "abc"
    ]
