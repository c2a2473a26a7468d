"""``Exporter`` and ``ScalarExporter``: the interface's defaults, and records turned into named scalars.

The expected scalars are computed here from the statistics columns with independent NumPy
formulas (norm = sqrt(sumsq), rms = sqrt(sumsq / max(finite, 1)), zero_frac = zeros /
max(numel, 1), update_ratio = sqrt(update_sq / weight_sq)), not with ``layout.derive``.
"""

import warnings

import numpy as np
import pytest
import run_builders
import torch

import gradscope
from gradscope.outputs.exporters.base import SUMMARY_SCALARS, Exporter, ScalarExporter, layer_scalars, summary_scalars
from gradscope.run import records
from gradscope.run.info import RunInfo
from gradscope.stats import layout

NAMES = ("enc", "mid", "head", "empty", "onefinite")


def run_info() -> RunInfo:
    return run_builders.run_info(NAMES, numel=(10, 6, 8, 0, 4), history=10, hist_history=5, track_updates=True)


HEADER = records.Header(info=run_info().to_dict())

# numel, sum, sumsq, max_abs, zeros, nans, infs per row
COLUMNS = np.array(
    [
        [10, 1.5, 16.0, 3.0, 2, 0, 0],  # enc: all finite
        [6, 0.0, 2.0, 1.0, 0, 0, 0],  # mid: absent in most tests
        [8, -2.0, 9.0, 2.5, 1, 2, 1],  # head: 2 NaN, 1 Inf
        [0, 0.0, 0.0, 0.0, 0, 0, 0],  # empty: no elements
        [4, 2.5, 6.25, 2.5, 0, 2, 1],  # onefinite: a single finite element
    ]
)


def make_rows(columns=COLUMNS) -> np.ndarray:
    rows = np.zeros((columns.shape[0], layout.ROW_WIDTH))
    rows[:, : layout.HIST] = columns
    rows[:, layout.HIST + 46] = columns[:, 0] - columns[:, 4] - columns[:, 5] - columns[:, 6]
    return rows


def fp8_flushed(max_abs: float, dtype: torch.dtype) -> float:
    """Fraction of ``make_rows``' non-zero values (all in the binade [0.25, 0.5)) that a real cast
    to ``dtype`` flushes after scaling by the largest power of two keeping ``max_abs`` in range."""
    k = 0
    top = torch.finfo(dtype).max
    while max_abs * 2.0 ** (k + 1) <= top:
        k += 1
    while max_abs * 2.0**k > top:
        k -= 1
    return float(torch.tensor(0.375 * 2.0**k, dtype=torch.float64).to(dtype).float() == 0)


def expected_layer_scalars(columns, present) -> dict:
    out = {}
    for name, (numel, _sum, sumsq, max_abs, zeros, nans, infs), here in zip(NAMES, columns, present, strict=True):
        if not here:
            continue
        out[f"grad_norm/{name}"] = float(np.sqrt(sumsq))
        out[f"grad_rms/{name}"] = float(np.sqrt(sumsq / max(numel - nans - infs, 1)))
        out[f"grad_max_abs/{name}"] = float(max_abs)
        out[f"grad_zero_frac/{name}"] = float(zeros / max(numel, 1))
        if nans + infs:
            out[f"grad_nonfinite/{name}"] = float(nans + infs)
        if numel - zeros - nans - infs > 0 and max_abs > 0:  # FP8 readiness of the non-zero values
            out[f"fp8_e4m3_zero/{name}"] = fp8_flushed(max_abs, torch.float8_e4m3fn)
            out[f"fp8_e5m2_zero/{name}"] = fp8_flushed(max_abs, torch.float8_e5m2)
    return out


def expected_summary(columns, present) -> dict:
    """The whole-model scalars every sampled step carries: the present rows as one tensor."""
    kept = columns[np.asarray(present, dtype=bool)]
    if not len(kept):
        return {}
    numel, _sum, sumsq, _max, zeros, nans, infs = kept.sum(axis=0)
    return {
        "gradscope/grad_norm": float(np.sqrt(sumsq)),
        "gradscope/grad_max_abs": float(kept[:, 3].max()),
        "gradscope/grad_zero_frac": float(zeros / numel) if numel else 0.0,
        "gradscope/grad_nonfinite": float(nans + infs),
        "gradscope/layer_grad_norm_min": float(np.sqrt(kept[:, 2]).min()),
        "gradscope/layer_grad_norm_max": float(np.sqrt(kept[:, 2]).max()),
    }


class Capture(ScalarExporter):
    def __init__(self, budget=None):
        self.budget = budget  # every layer at every sampled step unless a test asks for a budget
        self.scalars = []
        self.histograms = []

    def write_scalars(self, step, values):
        self.scalars.append((step, dict(values)))

    def write_histograms(self, record):
        self.histograms.append(record)


@pytest.fixture
def capture() -> Capture:
    exporter = Capture()
    exporter.start(HEADER)
    return exporter


# ---- Exporter ---------------------------------------------------------------------------


def test_exporter_defaults_do_nothing():
    exporter = Exporter()
    before = dict(vars(exporter))
    assert exporter.start(HEADER) is None
    for record in (
        records.Sampled(0, make_rows(), np.ones(5, bool), np.arange(5)),
        records.StepValues(0, {"loss": 1.0}),
        records.Closed(1),
    ):
        assert exporter.write(record) is None
    assert exporter.flush() is None
    assert exporter.close() is None
    assert vars(exporter) == before


def test_scalar_exporter_defaults_write_nothing():
    exporter = ScalarExporter()
    exporter.start(HEADER)
    assert exporter.info == run_info()
    assert exporter.write(records.Sampled(0, make_rows(), np.ones(5, bool), np.arange(5))) is None
    assert exporter.write(records.StepValues(0, {"loss": 1.0})) is None
    assert exporter.write_scalars(0, {"x": 1.0}) is None
    assert exporter.write_histograms(records.Sampled(0, make_rows(), np.ones(5, bool), np.arange(5))) is None


# ---- sampled steps ----------------------------------------------------------------------


def test_start_reads_the_run_info_from_the_header(capture):
    assert capture.info == run_info()
    assert capture.info.rows == NAMES


def test_sampled_record_gives_exact_per_layer_scalars(capture):
    present = np.array([True, False, True, True, True])
    record = records.Sampled(12, make_rows(), present, np.arange(5))
    capture.write(record)
    ((step, values),) = capture.scalars
    assert step == 12
    summary, layers = expected_summary(COLUMNS, present), expected_layer_scalars(COLUMNS, present)
    assert list(values)[: len(summary)] == list(summary)  # the whole model first, then the layers
    assert values.keys() == summary.keys() | layers.keys()
    assert {k: values[k] for k in layers} == layers
    assert {k: values[k] for k in summary} == pytest.approx(summary, rel=1e-12)
    # spelled out, for the rows that matter most
    assert values["grad_norm/enc"] == 4.0
    assert values["grad_rms/enc"] == np.sqrt(1.6)
    assert values["grad_zero_frac/enc"] == 0.2
    assert values["grad_rms/head"] == np.sqrt(9.0 / 5.0)  # over the 5 finite elements
    assert values["grad_nonfinite/head"] == 3.0
    assert values["grad_rms/empty"] == 0.0 and values["grad_zero_frac/empty"] == 0.0
    assert values["grad_rms/onefinite"] == 2.5 and values["grad_nonfinite/onefinite"] == 3.0
    assert "grad_nonfinite/enc" not in values and "grad_nonfinite/empty" not in values
    assert not [k for k in values if k.endswith("/mid")]
    assert all(type(v) is float for v in values.values())
    assert capture.histograms == [record]


def test_absent_rows_produce_nothing_even_with_nan_columns(capture):
    rows = make_rows()
    rows[[0, 2], :] = np.nan
    present = np.array([False, True, False, False, False])
    capture.write(records.Sampled(3, rows, present, np.full(5, -1)))
    assert capture.scalars == [
        (
            3,
            {
                **expected_summary(COLUMNS, present),
                "grad_norm/mid": float(np.sqrt(2.0)),
                "grad_rms/mid": float(np.sqrt(2.0 / 6.0)),
                "grad_max_abs/mid": 1.0,
                "grad_zero_frac/mid": 0.0,
                "fp8_e4m3_zero/mid": 0.0,
                "fp8_e5m2_zero/mid": 0.0,
            },
        )
    ]


def test_a_step_with_no_present_rows_writes_no_scalars(capture):
    capture.write(records.Sampled(5, np.full((5, layout.ROW_WIDTH), np.nan), np.zeros(5, bool), np.arange(5)))
    assert capture.scalars == [(5, {})]


def test_random_rows_match_the_formulas(capture):
    rng = np.random.default_rng(11)
    for step in range(5):
        numel = rng.integers(0, 1000, 5).astype(float)
        nans = np.floor(numel * rng.uniform(0, 0.2, 5))
        infs = np.floor(numel * rng.uniform(0, 0.2, 5))
        zeros = np.floor((numel - nans - infs) * rng.uniform(0, 1, 5))
        sumsq = rng.uniform(0, 50, 5)
        columns = np.stack([numel, rng.normal(size=5), sumsq, rng.uniform(0, 3, 5), zeros, nans, infs], axis=1)
        present = rng.uniform(size=5) > 0.3
        capture.write(records.Sampled(step, make_rows(columns), present, np.arange(5)))
        got_step, values = capture.scalars[-1]
        assert got_step == step
        summary, layers = expected_summary(columns, present), expected_layer_scalars(columns, present)
        assert values.keys() == summary.keys() | layers.keys()
        assert {k: values[k] for k in layers} == pytest.approx(layers, rel=1e-15, abs=0)
        assert {k: values[k] for k in summary} == pytest.approx(summary, rel=1e-12, abs=0)


# ---- update norms -----------------------------------------------------------------------


def test_updates_give_update_ratios_and_leave_out_non_finite_ones(capture):
    weight_sq = np.array([4.0, 0.0, 64.0, 0.0, np.nan])
    update_sq = np.array([1.0, 1.0, 4.0, 0.0, 1.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 1/0 and 0/0 are not reported as NumPy warnings
        capture.write(records.Updates(8, weight_sq, update_sq))
    assert capture.scalars == [(8, {"update_ratio/enc": 0.5, "update_ratio/head": 0.25})]


def test_update_ratios_match_the_formula(capture):
    rng = np.random.default_rng(5)
    weight_sq, update_sq = rng.uniform(0.1, 10, 5), rng.uniform(0, 1, 5)
    capture.write(records.Updates(2, weight_sq, update_sq))
    expected = {f"update_ratio/{n}": float(np.sqrt(u / w)) for n, w, u in zip(NAMES, weight_sq, update_sq, strict=True)}
    ((step, values),) = capture.scalars
    assert step == 2 and values.keys() == expected.keys()
    assert values == pytest.approx(expected, rel=1e-15, abs=0)


# ---- step values and metrics ------------------------------------------------------------


def test_step_values_pass_finite_values_through(capture):
    values = {
        "loss": 2.5,
        "step_time": 0.125,
        "peak_memory": 1048576.0,
        "energy": float("nan"),
        "grad_scale": 65536.0,
        "lr": 1e-3,
        "acc": float("inf"),
        "tokens": float("nan"),
    }
    capture.write(records.StepValues(4, values))
    assert capture.scalars == [
        (4, {"loss": 2.5, "step_time": 0.125, "peak_memory": 1048576.0, "grad_scale": 65536.0, "lr": 1e-3})
    ]


def test_step_values_put_resources_after_the_other_values(capture):
    capture.write(records.StepValues(0, {"step_time": 0.5, "energy": 3.0, "loss": 1.0, "lr": 0.1}))
    ((_, values),) = capture.scalars
    assert list(values) == ["loss", "lr", "step_time", "energy"]


def test_a_nan_loss_is_dropped(capture):
    capture.write(records.StepValues(9, {"loss": float("nan")}))
    assert capture.scalars == [(9, {})]


def test_metrics_pass_finite_values_and_drop_nan(capture):
    capture.write(records.Metrics(6, {"val_loss": 0.75, "bleu": float("nan"), "ppl": 12.0}))
    assert capture.scalars == [(6, {"val_loss": 0.75, "ppl": 12.0})]
    assert capture.histograms == []


@pytest.mark.parametrize(
    "record", [records.Failed(1), records.Desync(1, (0,), (1,)), records.Closed(3), records.Header(info={})]
)
def test_other_records_write_nothing(capture, record):
    capture.write(record)
    assert capture.scalars == [] and capture.histograms == []


def test_a_learning_rate_change_gives_its_scale(capture):
    capture.write(records.Action(12, "lr", "lr 0.1 -> 0.05 at step 12 because ...", {"scale": 0.5, "old_scale": 1.0}))
    layer = {"scale": 0.25, "old_scale": 0.5, "layers": ["blocks.3"]}
    capture.write(records.Action(40, "lr", "updates of 'blocks.3' x0.5 -> x0.25 ...", layer))
    assert capture.scalars == [(12, {"lr_scale": 0.5}), (40, {"lr_scale/blocks.3": 0.25})]


@pytest.mark.parametrize("action", ["halt", "stop"])
def test_halts_and_stops_write_no_scalar(capture, action):
    capture.write(records.Action(5, action, "...", {}))
    assert capture.scalars == []


# ---- the module-level scalar functions (what the trainer callbacks log) -------------------


def test_layer_scalars_are_the_exporters_scalars():
    rows, present = make_rows(), np.array([True, False, True, True, True])
    assert layer_scalars(rows, present, NAMES) == expected_layer_scalars(COLUMNS, present)


@pytest.mark.parametrize("present", [[True] * 5, [True, False, True, False, False], [False, True, False, False, True]])
def test_summary_scalars_treat_the_present_layers_as_one_tensor(present):
    rows, present = make_rows(), np.array(present)
    kept = COLUMNS[present]
    numel, _sum, sumsq, _max, zeros, nans, infs = kept.sum(axis=0)
    assert summary_scalars(rows, present) == pytest.approx(
        {
            "grad_norm": np.sqrt(sumsq),
            "grad_max_abs": kept[:, 3].max(),
            "grad_zero_frac": zeros / numel,
            "grad_nonfinite": nans + infs,
            "layer_grad_norm_min": np.sqrt(kept[:, 2]).min(),
            "layer_grad_norm_max": np.sqrt(kept[:, 2]).max(),
        },
        rel=1e-12,
    )
    assert tuple(summary_scalars(rows, present)) == SUMMARY_SCALARS


def test_summary_scalars_of_a_step_without_gradients_are_empty():
    assert summary_scalars(make_rows(), np.zeros(5, bool)) == {}


# ---- layer steps: the per-layer values within a time budget ------------------------------


def sampled(step: int, nan_in_head: bool = False) -> records.Sampled:
    columns = COLUMNS.copy()
    columns[2, 5:] = (2, 1) if nan_in_head else (0, 0)
    columns[4, 5:] = 0
    return records.Sampled(step, make_rows(columns), np.array([True, True, True, False, True]), np.arange(5))


def layer_keys(values: dict) -> set:
    return {k for k in values if "/" in k and not k.startswith("gradscope/")}


def test_within_the_budget_layers_go_out_when_paid_for_and_the_summary_always():
    capture = Capture(budget=0.01)
    capture.start(HEADER)
    capture.write(sampled(0))  # the first sampled step always carries its layers
    capture.spent(1.0)  # ... and cost a second: the next layers are due 100 s after it began
    capture.write(sampled(1))
    capture.write(records.Updates(1, np.ones(5), np.ones(5)))  # not a layer step: no update ratios
    capture._timer.last -= 101.0  # 101 s later
    capture.write(sampled(2))
    capture.write(records.Updates(2, np.ones(5), np.ones(5)))  # step 2's layers, update ratios too
    capture.write(sampled(3))  # the period that began at step 2 cost nothing yet: due again
    capture.spent(10.0)
    capture.write(sampled(4))
    steps = [(step, layer_keys(values)) for step, values in capture.scalars]
    assert [step for step, keys in steps if keys] == [0, 2, 2, 3]
    assert [step for step, keys in steps if keys and not keys <= {f"update_ratio/{n}" for n in NAMES}] == [0, 2, 3]
    ratios = {f"update_ratio/{n}" for n in NAMES}
    summary = {f"gradscope/{name}" for name in SUMMARY_SCALARS}
    assert all(summary <= values.keys() for _, values in capture.scalars if not values.keys() & ratios)
    assert [record.step for record in capture.histograms] == [0, 2, 3]


def test_gradients_turning_non_finite_or_finite_again_always_carry_their_layers():
    capture = Capture(budget=1e-9)  # nothing is ever paid for: only the first step and the turns
    capture.start(HEADER)
    for step, nan in enumerate([False, False, True, True, None, False, False, True]):
        if nan is None:  # a step without gradients: neither NaN nor finite
            capture.write(records.Sampled(step, make_rows(), np.zeros(5, bool), np.full(5, -1)))
        else:
            capture.write(sampled(step, nan_in_head=nan))
        capture.spent(1.0)
    layer_steps = [step for step, values in capture.scalars if layer_keys(values)]
    assert layer_steps == [0, 2, 5, 7]
    assert capture.scalars[2][1]["grad_nonfinite/head"] == 3.0  # the first NaN's layers, exactly
    assert capture.scalars[3][1]["gradscope/grad_nonfinite"] == 3.0  # later NaN steps: the summary says it


def test_forward_outputs_turning_non_finite_carry_their_modules():
    info = run_builders.run_info(NAMES, numel=(10, 6, 8, 0, 4), history=10, hist_history=5, track_updates=True)
    info = type(info).from_dict({**info.to_dict(), "modules": ["(root)", "enc", "head"]})
    capture = Capture(budget=1e-9)
    capture.start(records.Header(info=info.to_dict()))

    def forward(step, nan):
        columns = COLUMNS[:3].copy()
        columns[:, 5:] = 0
        columns[1, 5] = 1.0 if nan else 0.0  # a NaN in enc's output
        outputs = make_rows(columns)
        return records.Forward(
            step, outputs, np.zeros((3, layout.ROW_WIDTH)), np.array([[0, 1, 2], [0, 1, 2]]), ("float32",) * 3
        )

    capture.write(sampled(0))
    capture.spent(1.0)
    for step, nan in [(1, False), (2, True), (3, True)]:
        capture.write(forward(step, nan))
    written = [(step, values) for step, values in capture.scalars if any(k.startswith("act_") for k in values)]
    assert [step for step, _ in written] == [2]
    assert written[0][1]["act_nonfinite/enc"] == 1.0


def test_without_a_budget_every_sampled_step_carries_its_layers():
    capture = Capture(budget=None)
    capture.start(HEADER)
    for step in range(5):
        capture.write(sampled(step))
        capture.spent(100.0)  # no budget: cost is not counted against anything
    assert all(layer_keys(values) for _, values in capture.scalars)
    assert [r.step for r in capture.histograms] == list(range(5))


@pytest.mark.parametrize("budget", [0, -0.1, 1.5, True, "1%"])
def test_a_bad_budget_is_refused_naming_the_exporter(budget):
    capture = Capture(budget=budget)
    with pytest.raises(ValueError, match="Capture: budget must be a fraction of wall time"):
        capture.start(HEADER)


def test_the_pump_tells_each_exporter_what_its_calls_cost():
    import time

    from gradscope.outputs.pump import RecordPump

    class Slow(Capture):
        def __init__(self):
            super().__init__(budget=0.01)
            self.costs = []

        def write_scalars(self, step, values):
            time.sleep(0.02)
            super().write_scalars(step, values)

        def spent(self, seconds):
            self.costs.append(seconds)
            super().spent(seconds)

    slow = Slow()
    pump = RecordPump([slow], HEADER, flush_seconds=60)
    pump.put(sampled(0))
    pump.put(sampled(1))
    pump.close(2)
    assert len(slow.costs) == 4  # writes of the two steps and of Closed, the flush at close (not start, close)
    assert slow.costs[0] >= 0.02 and slow.costs[1] >= 0.02
    assert [step for step, values in slow.scalars if layer_keys(values)] == [0]  # 20 ms buys 2 s


@pytest.mark.parametrize("budget", [1e-9, None])
def test_values_of_steps_that_are_not_sampled_go_out_within_the_budget(budget):
    info = run_builders.run_info(NAMES, numel=(10, 6, 8, 0, 4), every=3)
    capture = Capture(budget=budget)
    capture.start(records.Header(info=info.to_dict()))
    for step in range(7):
        if step % 3 == 0:
            capture.write(sampled(step))
        capture.spent(1.0)
        capture.write(records.StepValues(step, {"loss": float(step)}))
        capture.write(records.Metrics(step, {"val_loss": 0.5}))  # metrics: always
    losses = [step for step, values in capture.scalars if "loss" in values]
    assert losses == ([0, 3, 6] if budget else list(range(7)))  # sampled steps always; others as paid for
    assert [step for step, values in capture.scalars if "val_loss" in values] == list(range(7))


def test_grad_norm_is_clip_grad_norms_while_finite_and_the_finite_elements_norm_after():
    """What the docstring says ``grad_norm`` is, checked against torch itself."""
    finite = [torch.tensor([3.0, 4.0, 0.0]), torch.tensor([12.0])]
    rows = gradscope.grad_stats(finite).to_rows()
    summary = summary_scalars(rows, np.ones(2, dtype=bool))
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in finite]
    for p, g in zip(params, finite, strict=True):
        p.grad = g.clone()
    assert summary["grad_norm"] == pytest.approx(float(torch.nn.utils.clip_grad_norm_(params, float("inf"))))
    assert summary["grad_norm"] == pytest.approx(13.0) and summary["grad_nonfinite"] == 0
    broken = [torch.tensor([3.0, 4.0, float("nan"), 0.0])]
    summary = summary_scalars(gradscope.grad_stats(broken).to_rows(), np.ones(1, dtype=bool))
    param = torch.nn.Parameter(torch.zeros(4))
    param.grad = broken[0].clone()
    assert torch.isnan(torch.nn.utils.clip_grad_norm_([param], float("inf")))
    assert summary["grad_norm"] == 5.0 and summary["grad_nonfinite"] == 1


def test_weight_readings_give_quantization_noise_and_fisher_per_layer(capture):
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(64, 64, generator=g), torch.randn(64, generator=g), torch.randn(8, 64, generator=g)]
    rows = gradscope.grad_stats(weights, backend="numpy").to_rows()
    n = len(capture.info.rows)
    record = records.Weights(
        4, rows, np.array([0, 0, n - 1]), np.array([2, 1, 2]), np.array([1.0, -3.0, 0.5]), np.array([1.0, 2.0, 5.0])
    )
    capture.write(record)
    ((step, values),) = capture.scalars
    first, last = capture.info.rows[0], capture.info.rows[-1]
    assert step == 4
    assert values[f"taylor_fisher/{first}"] == 3.0 and values[f"taylor_fisher/{last}"] == 5.0
    assert values[f"taylor_saliency/{first}"] == 2.0 and values[f"taylor_saliency/{last}"] == 0.5
    from gradscope.health.compression import QUANT_FORMATS
    from gradscope.stats import formats

    expected = formats.quantization_noise(rows[0, layout.HIST :], rows[0, layout.MAX_ABS], QUANT_FORMATS["int8"])
    assert values[f"quant_noise_int8/{first}"] == pytest.approx(expected / rows[0, layout.SUMSQ], rel=1e-12)
    assert f"quant_noise_int8/{capture.info.rows[1]}" not in values  # no matrix in that row
