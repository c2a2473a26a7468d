"""``gradscope.health.view``: the helpers the checks share (``trailing_run``, ``for_steps``,
``moving_average``, ``steady_rise``, ``layer_list``) against plain-Python references, and
``view_of``: the window it cuts out of a ``RunState``, absent rows, each row's latest
histogram, and the derived arrays (rms, norm, zero fraction, rms of non-zero elements)
against NumPy formulas applied to the raw gradients the rows were made from."""

import math

import numpy as np
import pytest
import run_builders
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from gradscope import Thresholds
from gradscope.health.view import for_steps, layer_list, moving_average, steady_rise, trailing_run, view_of
from gradscope.run import records
from gradscope.run.state import RunState
from gradscope.stats import layout

# --------------------------------------------------------------------------------------
# References and builders
# --------------------------------------------------------------------------------------


def reference_trailing_run(mask, present):
    """Walk each column from the newest entry back: skip absent entries, count present True
    ones, stop at the first present False one."""
    steps, columns = len(mask), len(mask[0]) if mask else 0
    counts, starts = [], []
    for c in range(columns):
        count, start = 0, steps
        for i in reversed(range(steps)):
            if not present[i][c]:
                continue
            if not mask[i][c]:
                break
            count += 1
            start = i
        counts.append(count)
        starts.append(start)
    return counts, starts


def reference_moving_average(values, window):
    out = []
    for i in range(len(values)):
        kept = [v for v in values[max(0, i - window + 1) : i + 1] if not math.isnan(v)]
        out.append(sum(kept) / len(kept) if kept else math.nan)
    return out


def row_of(values) -> np.ndarray:
    """The statistics row of a gradient, computed here with NumPy (the layout's columns)."""
    g = np.asarray(values, dtype=np.float64).ravel()
    finite = g[np.isfinite(g)]
    nonzero = np.abs(finite[finite != 0])
    row = np.zeros(layout.ROW_WIDTH)
    row[:7] = [
        g.size,
        finite.sum(),
        (finite**2).sum(),
        np.abs(finite).max(initial=0.0),
        np.count_nonzero(g == 0),
        np.count_nonzero(np.isnan(g)),
        np.count_nonzero(np.isinf(g)),
    ]
    _, exponent = np.frexp(nonzero)  # |g| = m * 2**e with m in [0.5, 1): |g| in [2**(e-1), 2**e)
    bins = np.clip(exponent - 1 + 48, 0, 63)
    row[7:] = np.bincount(bins, minlength=64)
    return row


def run_state(rows=("a", "b"), **options) -> RunState:
    """``run_builders.run_state`` with 4 elements per row; ``options``: every, history, hist_history, track_updates."""
    return run_builders.run_state(rows, numel=4, summary={"parameters": 10}, **options)


def sampled(step, gradients, order=None) -> records.Sampled:
    """A sampled record from raw gradients per row (None: the row is absent)."""
    rows = np.zeros((len(gradients), layout.ROW_WIDTH))
    for r, g in enumerate(gradients):
        if g is not None:
            rows[r] = row_of(g)
    present = np.array([g is not None for g in gradients])
    order = np.full(len(gradients), -1) if order is None else np.asarray(order)
    return records.Sampled(step, rows, present, order)


# --------------------------------------------------------------------------------------
# trailing_run
# --------------------------------------------------------------------------------------


def test_trailing_run_examples():
    t, f = True, False
    mask = np.array([[t, t, f], [f, t, t], [t, t, t], [t, f, t], [t, t, t]])
    present = np.array([[t, t, t], [t, t, t], [t, t, f], [f, f, t], [t, t, t]])
    count, start = trailing_run(mask, present)
    # column 0: rows 4, (3 absent), 2 true, 1 false -> 2 from row 2
    # column 1: rows 4, (3 absent, its False ignored), 2, 1, 0 -> 4 from row 0
    # column 2: rows 4, 3, (2 absent), 1 true, 0 false -> 3 from row 1
    assert count.tolist() == [2, 4, 3]
    assert start.tolist() == [2, 0, 1]


def test_trailing_run_empty_and_broken_runs():
    mask = np.array([[True, True], [True, False]])
    count, start = trailing_run(mask)
    assert count.tolist() == [2, 0] and start.tolist() == [0, 2]  # an empty run starts at S
    count, start = trailing_run(np.zeros((0, 3), bool))
    assert count.tolist() == [0, 0, 0] and start.tolist() == [0, 0, 0]
    count, start = trailing_run(np.ones((3, 1), bool), np.zeros((3, 1), bool))
    assert count.tolist() == [0] and start.tolist() == [3], "absent entries alone are no run"


def test_absent_entries_neither_break_nor_extend_a_run():
    mask = np.array([[False], [True], [False], [True]])
    count, start = trailing_run(mask, np.array([[True], [True], [False], [True]]))
    assert (count[0], start[0]) == (2, 1)  # the absent False at row 2 does not break it
    count, start = trailing_run(np.array([[False], [True], [True]]), np.array([[True], [False], [True]]))
    assert (count[0], start[0]) == (1, 2)  # the absent True at row 1 does not extend it


@given(
    data=st.data(),
    shape=st.tuples(st.integers(0, 12), st.integers(1, 5)),
)
def test_trailing_run_matches_a_plain_loop(data, shape):
    mask = data.draw(arrays(np.bool_, shape), label="mask")
    present = data.draw(arrays(np.bool_, shape), label="present")
    count, start = trailing_run(mask, present)
    if shape[0] == 0:
        assert count.tolist() == [0] * shape[1] and start.tolist() == [0] * shape[1]
        return
    expected_count, expected_start = reference_trailing_run(mask.tolist(), present.tolist())
    assert count.tolist() == expected_count
    assert start.tolist() == expected_start
    everywhere = trailing_run(mask)  # no presence mask: every entry present
    expected = reference_trailing_run(mask.tolist(), np.ones(shape, bool).tolist())
    assert [c.tolist() for c in everywhere] == list(expected)


# --------------------------------------------------------------------------------------
# for_steps, layer_list
# --------------------------------------------------------------------------------------


def test_for_steps_says_at_least_only_from_the_window_start():
    assert for_steps(7, 0) == "for at least 7 sampled steps"
    assert for_steps(7, 1) == "for 7 sampled steps"
    assert for_steps(3, 12) == "for 3 sampled steps"


def test_layer_list_shows_six_names_then_counts():
    assert layer_list(["a"]) == "'a'"
    assert layer_list(list("abcdef")) == "'a', 'b', 'c', 'd', 'e', 'f'"
    assert layer_list(list("abcdefgh")) == "'a', 'b', 'c', 'd', 'e', 'f' and 2 more"
    assert layer_list(list("abc"), limit=2) == "'a', 'b' and 1 more"


# --------------------------------------------------------------------------------------
# moving_average, steady_rise
# --------------------------------------------------------------------------------------


def test_moving_average_example():
    values = np.array([1.0, np.nan, 3.0, 5.0, np.nan, np.nan, np.nan])
    out = moving_average(values, 3)
    np.testing.assert_allclose(out[:5], [1.0, 1.0, 2.0, 4.0, 4.0])
    assert out[5] == 5.0 and np.isnan(out[6])  # nothing finite in the last window


@given(
    values=st.lists(st.one_of(st.floats(-1e3, 1e3), st.just(math.nan)), max_size=40),
    window=st.integers(1, 9),
)
def test_moving_average_matches_a_plain_loop(values, window):
    out = moving_average(np.array(values, dtype=np.float64), window)
    expected = np.array(reference_moving_average(values, window), dtype=np.float64)
    assert out.shape == (len(values),)
    np.testing.assert_allclose(out, expected, rtol=1e-9, atol=1e-9)  # NaN where expected is NaN


def test_steady_rise_of_a_known_line():
    x = np.arange(12, dtype=np.float64)
    slope, correlation = steady_rise(2.5 * x - 1.0)
    assert slope == pytest.approx(np.polyfit(x, 2.5 * x - 1.0, 1)[0]) == pytest.approx(2.5)
    assert correlation == pytest.approx(1.0)
    slope, correlation = steady_rise(4.0 - 0.25 * x)
    assert slope == pytest.approx(-0.25) and correlation == pytest.approx(-1.0)
    assert type(slope) is float and type(correlation) is float


def test_steady_rise_keeps_the_positions_of_missing_values():
    # Fitted on x = 0, 2, 3, 5 (not 0, 1, 2, 3): y = x + 1 exactly.
    slope, correlation = steady_rise(np.array([1.0, np.nan, 3.0, 4.0, np.nan, 6.0]))
    assert slope == pytest.approx(1.0) and correlation == pytest.approx(1.0)


def test_steady_rise_of_noisy_data_matches_least_squares():
    rng = np.random.default_rng(0)
    x = np.arange(30, dtype=np.float64)
    y = 0.3 * x + rng.normal(0, 2.0, 30)
    y[[4, 17]] = np.nan
    ok = np.isfinite(y)
    xs, ys = x[ok], y[ok]
    cov = np.mean((xs - xs.mean()) * (ys - ys.mean()))
    slope, correlation = steady_rise(y)
    assert slope == pytest.approx(cov / np.var(xs), rel=1e-9)
    assert correlation == pytest.approx(cov / (np.std(xs) * np.std(ys)), rel=1e-9)
    assert 0.5 < correlation < 1.0


@pytest.mark.parametrize(
    "values",
    [[], [1.0], [1.0, 2.0], [1.0, np.nan, 2.0, np.nan], [5.0, 5.0, 5.0, 5.0], [2.0, np.nan, 2.0, 2.0, np.inf]],
)
def test_steady_rise_needs_three_finite_varying_points(values):
    assert steady_rise(np.array(values, dtype=np.float64)) == (0.0, 0.0)


# --------------------------------------------------------------------------------------
# view_of
# --------------------------------------------------------------------------------------


def test_no_view_before_the_first_step():
    state = run_state()
    assert view_of(state, Thresholds()) is None
    assert view_of(state, Thresholds(sustain=1, spike_window=1, trend_window=3)) is None


def test_a_loss_alone_makes_a_view_without_sampled_steps():
    state = run_state()
    state.apply(records.StepValues(0, {"loss": 2.0}))
    view = view_of(state, Thresholds())
    assert view is not None
    assert view.sampled_steps.shape == (0,) and view.present.shape == (0, 2)
    assert view.steps.tolist() == [0] and view.loss.tolist() == [2.0]
    assert np.isnan(view.latest_hist).all()


def test_a_sampled_step_alone_makes_a_view_without_losses():
    state = run_state()
    state.apply(sampled(0, [np.ones(4), None]))
    view = view_of(state, Thresholds())
    assert view.sampled_steps.tolist() == [0] and len(view.loss) == 0
    assert view.present.tolist() == [[True, False]]


@pytest.mark.parametrize(
    ("thresholds", "window"),
    [
        (Thresholds(sustain=20, spike_window=5, trend_window=3), 20),
        (Thresholds(sustain=2, spike_window=9, trend_window=3), 10),
        (Thresholds(sustain=2, spike_window=4, trend_window=12), 12),
        (Thresholds(sustain=6, spike_window=5, trend_window=3), 6),
    ],
)
def test_the_window_is_the_longest_a_check_needs(thresholds, window):
    state = run_state()
    for step in range(30):
        state.apply(sampled(step, [np.full(4, float(step + 1)), np.ones(4)]))
        state.apply(records.StepValues(step, {"loss": 1.0 / (step + 1)}))
    view = view_of(state, thresholds)
    assert view.sampled_steps.tolist() == list(range(30 - window, 30))
    assert view.present.shape == view.numel.shape == view.sumsq.shape == (window, 2)
    np.testing.assert_array_equal(view.max_abs[:, 0], np.arange(31 - window, 31))
    assert len(view.steps) == 30, "per-step values are not cut to the window"


def test_the_window_counts_sampled_steps_not_steps():
    state = run_state(every=3)
    for step in range(0, 60, 3):
        state.apply(sampled(step, [np.ones(4), np.ones(4)]))
    view = view_of(state, Thresholds(sustain=2, spike_window=4, trend_window=5))
    assert view.sampled_steps.tolist() == [45, 48, 51, 54, 57]


def test_absent_rows_are_nan_in_every_per_row_array():
    state = run_state(rows=("a", "b", "c"))
    state.apply(sampled(0, [np.ones(4), np.full(4, 2.0), None], order=[2, 0, 1]))
    state.apply(sampled(1, [None, np.full(4, 3.0), np.zeros(4)], order=[-1, 0, 1]))
    view = view_of(state, Thresholds())
    assert view.present.tolist() == [[True, True, False], [False, True, True]]
    for name in ("numel", "finite", "zeros", "nonfinite", "sumsq", "max_abs", "backward_order"):
        values = getattr(view, name)
        assert np.isnan(values[0, 2]) and np.isnan(values[1, 0]), name
        assert np.isfinite(values[0, :2]).all() and np.isfinite(values[1, 1:]).all(), name
    for name in ("rms", "norm", "zero_frac"):
        values = getattr(view, name)
        assert np.isnan(values[0, 2]) and np.isnan(values[1, 0]), name
    assert view.backward_order[0, :2].tolist() == [2.0, 0.0]
    assert view.sumsq[:, 1].tolist() == [16.0, 36.0]
    assert view.total_norm.tolist() == [math.sqrt(4 + 16), 6.0]  # absent rows add nothing


def test_latest_hist_is_each_rows_histogram_at_its_latest_present_step():
    state = run_state(rows=("a", "b", "c"))
    state.apply(sampled(0, [np.full(4, 1.0), np.full(4, 0.25), None]))  # 1.0 -> bin 48, 0.25 -> bin 46
    state.apply(sampled(1, [np.full(4, 2.0), None, None]))  # 2.0 -> bin 49
    state.apply(sampled(2, [np.full(4, 4.0), None, None]))  # 4.0 -> bin 50
    view = view_of(state, Thresholds())
    assert view.latest_hist.shape == (3, 64)
    expected_a, expected_b = np.zeros(64), np.zeros(64)
    expected_a[50] = 4
    expected_b[46] = 4
    np.testing.assert_array_equal(view.latest_hist[0], expected_a)
    np.testing.assert_array_equal(view.latest_hist[1], expected_b)  # from step 0, its latest
    assert np.isnan(view.latest_hist[2]).all(), "never present: no histogram"


def test_latest_hist_of_a_row_outside_the_window_is_nan():
    state = run_state(rows=("a", "b"))
    state.apply(sampled(0, [np.ones(4), np.ones(4)]))
    for step in range(1, 10):
        state.apply(sampled(step, [np.ones(4), None]))
    view = view_of(state, Thresholds(sustain=3, spike_window=2, trend_window=3))
    assert view.sampled_steps.tolist() == [7, 8, 9]
    assert view.latest_hist[0, 48] == 4
    assert np.isnan(view.latest_hist[1]).all()


def test_latest_hist_is_nan_when_its_histogram_is_no_longer_kept():
    state = run_state(rows=("a", "b"), hist_history=2)
    state.apply(sampled(0, [np.ones(4), np.ones(4)]))
    for step in range(1, 4):
        state.apply(sampled(step, [np.ones(4), None]))
    view = view_of(state, Thresholds())
    assert view.latest_hist[0, 48] == 4
    assert np.isnan(view.latest_hist[1]).all()


def gradients_for_derived_values():
    rng = np.random.default_rng(7)
    mixed = rng.normal(0, 0.3, 40)
    mixed[::5] = 0.0
    broken = rng.normal(0, 2.0, 25)
    broken[[1, 2]] = [np.nan, np.inf]
    broken[[3, 4, 5]] = 0.0
    step0 = [mixed, broken, np.zeros(9), np.full(6, np.nan), None]
    step1 = [rng.normal(0, 1e-3, 16), None, np.array([0.0, 0.0, -5.0]), np.array([np.inf, 0.0, 0.0, 1.0]), -mixed]
    return [step0, step1]


def test_derived_arrays_match_numpy_formulas_on_the_gradients():
    steps = gradients_for_derived_values()
    state = run_state(rows=("a", "b", "c", "d", "e"))
    for step, gradients in enumerate(steps):
        state.apply(sampled(step, gradients))
    view = view_of(state, Thresholds())

    def expected(g, formula):
        if g is None:
            return math.nan
        finite = g[np.isfinite(g)]
        return formula(g, finite)

    formulas = {
        "rms": lambda g, f: math.sqrt(np.mean(f**2)) if f.size else 0.0,
        "norm": lambda g, f: math.sqrt(np.sum(f**2)),
        "zero_frac": lambda g, f: np.count_nonzero(g == 0) / g.size,
        "rms_nonzero": lambda g, f: math.sqrt(np.mean(f[f != 0] ** 2)) if np.any(f != 0) else math.nan,
    }
    for name, formula in formulas.items():
        want = np.array([[expected(g, formula) for g in gradients] for gradients in steps])
        np.testing.assert_allclose(getattr(view, name), want, rtol=1e-12, atol=0, err_msg=name)
    want_total = [
        math.sqrt(sum(np.sum(g[np.isfinite(g)] ** 2) for g in gradients if g is not None)) for gradients in steps
    ]
    np.testing.assert_allclose(view.total_norm, want_total, rtol=1e-12)
    # Spot values that need no formula.
    assert view.rms_nonzero[0, 2] != view.rms_nonzero[0, 2], "all zeros: no non-zero elements, NaN"
    assert view.zero_frac[0, 2] == 1.0 and view.rms[0, 2] == 0.0
    assert view.rms[0, 3] == 0.0 and np.isnan(view.rms_nonzero[0, 3]), "all NaN: no finite elements"
    assert view.rms_nonzero[1, 2] == 5.0 and view.zero_frac[1, 3] == 0.5
    assert view.finite[0].tolist()[:4] == [40, 23, 9, 0] and view.nonfinite[0].tolist()[:4] == [0, 2, 0, 6]


def test_step_values_and_remembered_events_reach_the_view():
    state = run_state()
    losses = [4.0, math.nan, 2.0, 3.0, 1.0, 0.5]
    for step, loss in enumerate(losses):
        state.apply(records.StepValues(step, {"loss": loss, "grad_scale": 8.0 if step != 3 else 4.0}))
    state.apply(sampled(2, [np.array([np.nan, 1.0]), np.ones(2)], order=[1, 0]))
    state.apply(records.Metrics(5, {"val_loss": 0.7}))
    view = view_of(state, Thresholds(smooth=3))
    assert view.steps.tolist() == list(range(6))
    assert view.skipped.tolist() == [False, False, True, False, False, False]  # the scale fell after step 2
    assert view.first_bad_loss[0] == 1 and math.isnan(view.first_bad_loss[1])
    assert view.initial_loss == pytest.approx((4.0 + 2.0 + 3.0) / 3)  # first `smooth` finite losses
    assert view.metrics["val_loss"][0].tolist() == [5] and view.metrics["val_loss"][1].tolist() == [0.7]
    (event,) = view.nonfinite_events
    assert (event.step, event.rows, event.nans, event.infs) == (2, (0,), 1, 0)
    assert view.nonfinite_steps == 1 and view.world == 1
    assert view.summary == {"parameters": 10} and view.rows == ("a", "b")
    assert view.update_ratio is None and view.weight_norm is None


def test_update_ratio_is_update_norm_over_weight_norm():
    state = run_state(track_updates=True)
    state.apply(sampled(0, [np.ones(4), np.ones(4)]))
    state.apply(records.Updates(0, np.array([4.0, 9.0]), np.array([1e-6, 0.0])))
    state.apply(sampled(1, [np.ones(4), np.ones(4)]))  # no optimizer step seen for step 1
    view = view_of(state, Thresholds())
    np.testing.assert_allclose(view.weight_norm[0], [2.0, 3.0])
    np.testing.assert_allclose(view.update_ratio[0], [1e-3 / 2.0, 0.0])
    assert np.isnan(view.update_ratio[1]).all()
