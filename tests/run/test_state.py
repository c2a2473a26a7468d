"""``RunState``: what each record does to it, and the events it remembers for the whole run.

Covers ``apply`` for every record type (sampled steps, step values, metrics, update norms,
desyncs, failures; headers and ``closed`` records change nothing), the non-finite events
(row order, NaN/Inf totals, distributed ranks, the ``KEPT_EVENTS`` cap), the first bad loss
and the initial losses, the desync cap, ``stats(step)``, and that replaying the same records
into two states gives the same history.
"""

import numpy as np
import pytest
from run_builders import run_info

from gradscope.run import records
from gradscope.run.history import STEP_FIELDS
from gradscope.run.info import RunInfo
from gradscope.run.state import INITIAL_LOSSES, KEPT_EVENTS, NonfiniteEvent, RunState
from gradscope.stats import layout

NAMES = ("embed", "block.0", "block.1", "head")
N_ROWS = len(NAMES)


def make_info(rows=NAMES, *, every=1, history=100, hist_history=10, track_updates=False) -> RunInfo:
    return run_info(
        rows, numel=16, every=every, history=history, hist_history=hist_history, track_updates=track_updates
    )


def make_rows(n=N_ROWS, *, numel=16.0, sumsq=None, nans=None, infs=None) -> np.ndarray:
    """Statistics rows: row i has sum i, sumsq (i + 1)**2, max_abs i + 1, i zeros, a histogram."""
    rows = np.zeros((n, layout.ROW_WIDTH))
    rows[:, layout.NUMEL] = numel
    rows[:, layout.SUM] = np.arange(n, dtype=float)
    rows[:, layout.SUMSQ] = (np.arange(n) + 1.0) ** 2 if sumsq is None else sumsq
    rows[:, layout.MAX_ABS] = np.arange(n) + 1.0
    rows[:, layout.ZEROS] = np.arange(n)
    rows[:, layout.NANS] = 0 if nans is None else nans
    rows[:, layout.INFS] = 0 if infs is None else infs
    rows[:, layout.HIST + 40] = 3
    rows[:, layout.HIST + 47] = np.arange(n) + 5
    return rows


def sampled(step, rows=None, present=None, order=None, **ranks) -> records.Sampled:
    rows = make_rows() if rows is None else rows
    n = rows.shape[0]
    present = np.ones(n, bool) if present is None else np.asarray(present, bool)
    order = np.arange(n) if order is None else np.asarray(order)
    return records.Sampled(step, rows, present, order, **ranks)


def bad_rows(nans, infs) -> np.ndarray:
    return make_rows(nans=np.asarray(nans, float), infs=np.asarray(infs, float))


# ---- sampled steps ----------------------------------------------------------------------


def test_sampled_record_fills_the_row_history():
    state = RunState(make_info())
    rows = make_rows()
    state.apply(sampled(0, rows, order=[3, 2, 1, 0]))
    state.apply(sampled(1, rows * 2, present=[True, False, True, True], order=[0, -1, 1, 2]))

    norm = state.series("norm")
    assert norm.steps.tolist() == [0, 1]
    assert norm.rows == NAMES
    np.testing.assert_array_equal(norm.values[0], [1.0, 2.0, 3.0, 4.0])
    np.testing.assert_array_equal(norm.values[1], [np.sqrt(2.0), np.nan, np.sqrt(18.0), np.sqrt(32.0)])
    np.testing.assert_array_equal(state.series("present").values, [[True] * 4, [True, False, True, True]])
    np.testing.assert_array_equal(state.series("backward_order").values, [[3, 2, 1, 0], [0, np.nan, 1, 2]])
    np.testing.assert_array_equal(state.series("max_abs").values[1], [2.0, np.nan, 6.0, 8.0])
    hist = state.series("hist").values
    assert hist.shape == (2, 4, layout.NUM_BINS)
    np.testing.assert_array_equal(hist[1, :, 47], [10, np.nan, 14, 16])  # absent rows have no histogram
    assert state.nonfinite_events == [] and state.nonfinite_steps == 0


def test_header_and_closed_records_change_nothing():
    state = RunState(make_info())
    state.apply(records.Header(info=make_info().to_dict()))
    state.apply(records.Closed(12))
    assert state.history.latest_sampled() == -1
    assert len(state.series("loss")) == 0 and len(state.series("norm")) == 0
    assert state.nonfinite_steps == 0 and state.desync_steps == 0
    assert state.first_bad_loss is None and state.initial_losses == []


# ---- non-finite events ------------------------------------------------------------------


def test_nonfinite_rows_are_first_in_backward_order_when_every_order_is_known():
    state = RunState(make_info())
    # Rows 0, 2, 3 hold NaN/Inf; their backward orders are 5, 9, 2: row 3 went bad first.
    # Row 1 is healthy, and its unknown order (-1) does not matter.
    state.apply(sampled(4, bad_rows(nans=[2, 0, 0, 1], infs=[0, 0, 3, 1]), order=[5, -1, 9, 2]))
    assert state.nonfinite_events == [
        NonfiniteEvent(step=4, rows=(3, 0, 2), nans=3, infs=4, backward_order_known=True, rank=-1, ranks=0)
    ]
    assert state.nonfinite_steps == 1


def test_nonfinite_rows_fall_back_to_reverse_model_order_when_an_order_is_unknown():
    state = RunState(make_info())
    state.apply(sampled(2, bad_rows(nans=[1, 0, 7, 0], infs=[0, 0, 0, 2]), order=[0, 1, -1, 3]))
    (event,) = state.nonfinite_events
    assert event.rows == (3, 2, 0)
    assert event.backward_order_known is False
    assert (event.step, event.nans, event.infs) == (2, 8, 2)


def test_nonfinite_totals_cover_only_present_affected_rows():
    state = RunState(make_info())
    # Row 1 is absent: its counts are neither an event nor part of the totals.
    rows = bad_rows(nans=[0, 100, 4, 0], infs=[0, 50, 0, 0])
    state.apply(sampled(0, rows, present=[True, False, True, True]))
    (event,) = state.nonfinite_events
    assert event.rows == (2,) and event.nans == 4 and event.infs == 0


def test_absent_rows_with_nan_columns_are_not_events():
    state = RunState(make_info())
    rows = make_rows()
    rows[1, :] = np.nan  # what an absent row may hold
    rows[3, layout.NANS] = 5  # absent too, with a count
    state.apply(sampled(0, rows, present=[True, False, True, False]))
    state.apply(sampled(1, np.full((4, layout.ROW_WIDTH), np.nan), present=[False] * 4))
    assert state.nonfinite_events == []
    assert state.nonfinite_steps == 0


def test_nonfinite_event_names_the_rank_of_the_first_bad_row():
    state = RunState(make_info())
    rows = bad_rows(nans=[0, 3, 0, 1], infs=[0, 0, 0, 0])
    state.apply(
        sampled(
            6,
            rows,
            order=[0, 2, 3, 1],
            nonfinite_rank=np.array([-1, 4, -1, 7]),
            nonfinite_ranks=np.array([0, 2, 0, 5]),
        )
    )
    (event,) = state.nonfinite_events
    assert event.rows == (3, 1)  # row 3 (order 1) went bad before row 1 (order 2)
    assert (event.rank, event.ranks) == (7, 5)


def test_only_the_first_kept_events_are_kept_but_every_bad_step_is_counted():
    state = RunState(make_info())
    extra = 5
    for k in range(KEPT_EVENTS + extra):
        state.apply(sampled(2 * k, bad_rows(nans=[0, k + 1, 0, 0], infs=[0, 0, 0, 0])))
        state.apply(sampled(2 * k + 1))  # healthy steps in between are not counted
    assert state.nonfinite_steps == KEPT_EVENTS + extra
    assert len(state.nonfinite_events) == KEPT_EVENTS
    assert [e.step for e in state.nonfinite_events] == list(range(0, 2 * KEPT_EVENTS, 2))
    assert [e.nans for e in state.nonfinite_events] == list(range(1, KEPT_EVENTS + 1))


# ---- losses -----------------------------------------------------------------------------


def test_first_bad_loss_is_the_first_non_finite_loss_and_never_replaced():
    state = RunState(make_info())
    state.apply(records.StepValues(0, {"loss": 2.0}))
    state.apply(records.StepValues(1, {"step_time": 0.1}))  # no loss at all
    assert state.first_bad_loss is None
    state.apply(records.StepValues(2, {"loss": float("inf")}))
    state.apply(records.StepValues(3, {"loss": float("nan")}))
    state.apply(records.StepValues(4, {"loss": 1.5}))
    state.apply(records.StepValues(5, {"loss": float("-inf")}))
    assert state.first_bad_loss == (2, float("inf"))
    assert state.initial_losses == [2.0, 1.5]
    np.testing.assert_array_equal(state.series("loss").values, [2.0, np.nan, np.inf, np.nan, 1.5, -np.inf])


def test_first_bad_loss_keeps_a_nan():
    state = RunState(make_info())
    state.apply(records.StepValues(7, {"loss": float("nan")}))
    state.apply(records.StepValues(8, {"loss": float("inf")}))
    step, loss = state.first_bad_loss
    assert step == 7 and np.isnan(loss)


def test_initial_losses_keep_the_first_finite_losses_only():
    state = RunState(make_info())
    finite = []
    for step in range(INITIAL_LOSSES + 20):
        loss = float("nan") if step % 7 == 3 else 100.0 - step
        if np.isfinite(loss):
            finite.append(loss)
        state.apply(records.StepValues(step, {"loss": loss}))
    assert len(finite) > INITIAL_LOSSES
    assert state.initial_losses == finite[:INITIAL_LOSSES]
    assert state.first_bad_loss[0] == 3


# ---- desync, failures, step values, metrics, updates ------------------------------------


def test_desync_records_are_kept_up_to_kept_events_and_all_counted():
    state = RunState(make_info())
    desyncs = [records.Desync(step, (step % 4,), (1, 3)) for step in range(KEPT_EVENTS + 3)]
    for record in desyncs:
        state.apply(record)
    assert state.desync_steps == KEPT_EVENTS + 3
    assert state.desync_events == desyncs[:KEPT_EVENTS]
    assert state.nonfinite_steps == 0


def test_failed_marks_only_that_step_failed():
    state = RunState(make_info())
    state.apply(records.StepValues(0, {"loss": 1.0}))
    state.apply(records.StepValues(1, {"loss": 0.9}))
    state.apply(records.Failed(1))
    state.apply(records.StepValues(2, {"loss": 0.8}))
    state.apply(records.Failed(4))  # a step without values
    failed = state.series("failed")
    assert failed.steps.tolist() == [0, 1, 2, 4]
    assert failed.values.tolist() == [False, True, False, True]
    np.testing.assert_array_equal(state.series("loss").values, [1.0, 0.9, 0.8, np.nan])


def test_step_values_go_to_step_fields_and_the_rest_to_metrics():
    state = RunState(make_info())
    state.apply(records.StepValues(0, {"loss": 3.0, "step_time": 0.25, "grad_scale": 1024.0, "lr": 0.01}))
    state.apply(records.StepValues(1, {"loss": 2.5, "peak_memory": 4096.0, "energy": 12.5, "lr": 0.02, "tok_s": 7.0}))
    state.apply(records.Metrics(1, {"val_loss": 2.75}))
    assert set(state.history.metric_names) == {"lr", "tok_s", "val_loss"}
    assert not set(state.history.metric_names) & set(STEP_FIELDS)
    assert {"lr", "tok_s", "val_loss"} <= set(state.fields())
    np.testing.assert_array_equal(state.series("lr").values, [0.01, 0.02])
    np.testing.assert_array_equal(state.series("tok_s").values, [np.nan, 7.0])
    np.testing.assert_array_equal(state.series("val_loss").values, [np.nan, 2.75])
    np.testing.assert_array_equal(state.series("loss").values, [3.0, 2.5])
    np.testing.assert_array_equal(state.series("step_time").values, [0.25, np.nan])
    np.testing.assert_array_equal(state.series("peak_memory").values, [np.nan, 4096.0])
    np.testing.assert_array_equal(state.series("energy").values, [np.nan, 12.5])
    np.testing.assert_array_equal(state.series("grad_scale").values, [1024.0, np.nan])
    assert state.series("val_loss").steps.tolist() == [0, 1]


def test_updates_records_give_update_norms_of_sampled_steps():
    state = RunState(make_info(track_updates=True))
    state.apply(records.Updates(0, np.full(4, 9.0), np.full(4, 1.0)))  # step 0 not sampled yet: dropped
    state.apply(sampled(0))
    state.apply(records.Updates(0, np.array([4.0, 9.0, 16.0, 0.0]), np.array([1.0, 0.0, 4.0, 0.0])))
    np.testing.assert_array_equal(state.series("weight_norm").values, [[2.0, 3.0, 4.0, 0.0]])
    np.testing.assert_array_equal(state.series("update_norm").values, [[1.0, 0.0, 2.0, 0.0]])
    np.testing.assert_array_equal(state.series("update_ratio").values, [[0.5, 0.0, 0.5, np.nan]])


def test_updates_without_tracking_are_ignored():
    state = RunState(make_info(track_updates=False))
    state.apply(sampled(0))
    state.apply(records.Updates(0, np.ones(4), np.ones(4)))
    assert "update_ratio" not in state.fields()
    with pytest.raises(KeyError, match="track_updates"):
        state.series("update_ratio")


# ---- stats ------------------------------------------------------------------------------


def test_stats_returns_the_present_rows_with_their_names():
    state = RunState(make_info())
    rows = make_rows()
    state.apply(sampled(0, rows))
    state.apply(sampled(1, rows * 3, present=[False, True, False, True]))

    latest = state.stats()
    assert latest.names == ("block.0", "head")
    np.testing.assert_array_equal(latest.numel, [48, 48])
    np.testing.assert_array_equal(latest.sumsq, [12.0, 48.0])
    np.testing.assert_array_equal(latest.zeros, [3, 9])
    np.testing.assert_array_equal(latest.to_rows(), rows[[1, 3]] * 3)

    first = state.stats(0)
    assert first.names == NAMES
    np.testing.assert_array_equal(first.to_rows(), rows)
    assert first.hist[2, 47] == 7 and first.hist[0, 40] == 3


def test_stats_raises_key_error_for_steps_not_kept():
    state = RunState(make_info())
    with pytest.raises(KeyError, match="step -1"):
        state.stats()  # nothing sampled yet
    state.apply(sampled(0))
    state.apply(records.StepValues(1, {"loss": 1.0}))
    for step in (1, 2, 99):
        with pytest.raises(KeyError, match=f"step {step} is not a kept sampled step"):
            state.stats(step)


# ---- replay -----------------------------------------------------------------------------


def run_records() -> list:
    rng = np.random.default_rng(3)
    out = []
    for step in range(12):
        rows = make_rows(sumsq=rng.uniform(0.5, 2.0, len(NAMES)))
        present = rng.uniform(size=len(NAMES)) > 0.2
        if step in (4, 5):  # step 5 is not sampled
            rows[2, layout.NANS] = 2
            present[2] = True
        if step % 2 == 0:
            out.append(sampled(step, rows, present, rng.permutation(len(NAMES))))
            out.append(records.Updates(step, rng.uniform(1, 2, len(NAMES)), rng.uniform(0, 1, len(NAMES))))
        loss = float("nan") if step == 7 else float(3.0 - 0.1 * step)
        out.append(records.StepValues(step, {"loss": loss, "step_time": 0.01 * step, "lr": 1e-3}))
        if step % 3 == 0:
            out.append(records.Metrics(step, {"val_loss": loss + 0.5}))
        if step == 9:
            out.append(records.Failed(step))
            out.append(records.Desync(step, (1,), (0,)))
    return out


def test_replaying_the_same_records_gives_the_same_state():
    info = make_info(every=2, history=4, hist_history=2, track_updates=True)
    a, b = RunState(info), RunState(info)
    for record in run_records():
        a.apply(record)
    for record in run_records():
        b.apply(record)
    assert a.fields() == b.fields()
    assert {"val_loss", "lr", "update_ratio"} <= set(a.fields())
    for name in a.fields():
        sa, sb = a.series(name), b.series(name)
        assert sa.rows == sb.rows, name
        np.testing.assert_array_equal(sa.steps, sb.steps, err_msg=name)
        np.testing.assert_array_equal(sa.values, sb.values, err_msg=name)
    assert a.series("norm").steps.tolist() == [4, 6, 8, 10]  # a 4-step ring over steps 0..10
    assert a.nonfinite_events == b.nonfinite_events
    assert [(e.step, e.rows, e.nans) for e in a.nonfinite_events] == [(4, (2,), 2)]
    assert a.nonfinite_steps == b.nonfinite_steps == 1
    assert a.first_bad_loss[0] == b.first_bad_loss[0] == 7
    assert a.initial_losses == b.initial_losses and len(a.initial_losses) == 11
    assert a.desync_events == b.desync_events == [records.Desync(9, (1,), (0,))]


def test_forward_series_last_beyond_the_kept_steps_returns_them_all():
    info = RunInfo(**{**make_info().to_dict(), "modules": ("(root)",)})
    state = RunState(info)
    for step in range(3):
        zeros = np.zeros((1, layout.ROW_WIDTH))
        state.apply(records.Forward(step, zeros, zeros, np.array([[0], [1]]), ("float32",)))
    assert list(state.series("forward_rms", last=2).steps) == [1, 2]
    assert list(state.series("forward_rms", last=5).steps) == [0, 1, 2]  # as History.series does
