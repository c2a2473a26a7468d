"""The bounded history store: ring slots, absent rows, derived fields, stale writes."""

import numpy as np
import pytest

from gradscope.run.history import History
from gradscope.stats import layout


def rows_with(numel, sum_=0.0, sumsq=0.0, max_abs=0.0, zeros=0, nans=0, infs=0, hist_bin=None):
    rows = np.zeros((len(numel), layout.ROW_WIDTH))
    rows[:, layout.NUMEL] = numel
    rows[:, layout.SUM] = sum_
    rows[:, layout.SUMSQ] = sumsq
    rows[:, layout.MAX_ABS] = max_abs
    rows[:, layout.ZEROS] = zeros
    rows[:, layout.NANS] = nans
    rows[:, layout.INFS] = infs
    if hist_bin is not None:
        rows[:, layout.HIST + hist_bin] = numel
    return rows


def test_sampled_ring_keeps_the_newest_and_maps_steps_by_every():
    h = History(("a", "b"), every=5, capacity=3, hist_capacity=2, step_capacity=100)
    for step in range(0, 40, 5):
        h.add_sampled(step, rows_with([4, 9], sumsq=step), np.array([True, True]), np.array([1, 0]))
    norm = h.series("norm")
    assert list(norm.steps) == [25, 30, 35]
    np.testing.assert_allclose(norm.values[:, 0], np.sqrt([25, 30, 35]))
    assert list(h.series("hist").steps) == [30, 35]
    assert norm.rows == ("a", "b")


def test_absent_rows_are_nan_and_present_is_reported():
    h = History(("a", "b"), every=1, capacity=4, hist_capacity=4, step_capacity=4)
    h.add_sampled(
        0, rows_with([4, 0], sumsq=16.0, zeros=[1, 0], hist_bin=40), np.array([True, False]), np.array([0, -1])
    )
    assert h.series("rms").values[0, 0] == 2.0
    assert np.isnan(h.series("rms").values[0, 1])
    np.testing.assert_array_equal(h.series("present").values, [[True, False]])
    assert h.series("zero_frac").values[0, 0] == 0.25
    assert h.series("hist").values[0, 0, 40] == 4 and np.isnan(h.series("hist").values[0, 1]).all()


def test_derived_fields_count_only_finite_values():
    h = History(("a",), every=1, capacity=2, hist_capacity=2, step_capacity=2)
    h.add_sampled(0, rows_with([10], sum_=8.0, sumsq=32.0, nans=1, infs=1), np.array([True]), np.array([0]))
    assert h.series("finite").values[0, 0] == 8
    assert h.series("mean").values[0, 0] == 1.0
    assert h.series("rms").values[0, 0] == 2.0
    assert h.series("nonfinite").values[0, 0] == 2


def test_per_step_ring_metrics_and_stale_writes():
    h = History(("a",), every=1, capacity=2, hist_capacity=2, step_capacity=3)
    for step in range(5):
        h.add_step(step, loss=float(step), step_time=0.1)
    h.add_metrics(4, {"val_loss": 0.5})
    h.add_step(1, loss=99.0)  # step 1's slot now belongs to step 4: dropped
    loss = h.series("loss")
    assert list(loss.steps) == [2, 3, 4]
    np.testing.assert_array_equal(loss.values, [2.0, 3.0, 4.0])
    np.testing.assert_array_equal(h.series("val_loss").values, [np.nan, np.nan, 0.5])


def test_skipped_steps_follow_the_scale():
    h = History(("a",), every=1, capacity=8, hist_capacity=8, step_capacity=8)
    for step, scale in enumerate([8.0, 8.0, 4.0, 4.0, 8.0, 2.0]):
        h.add_step(step, grad_scale=scale)
    np.testing.assert_array_equal(h.series("skipped").values, [False, True, False, False, True, False])


def test_updates_need_tracking_and_unknown_fields_are_named():
    h = History(("a",), every=1, capacity=2, hist_capacity=2, step_capacity=2)
    with pytest.raises(KeyError, match="track_updates=True"):
        h.series("update_ratio")
    with pytest.raises(KeyError, match="unknown history field 'nrom'"):
        h.series("nrom")
    tracked = History(("a",), every=1, capacity=2, hist_capacity=2, step_capacity=2, track_updates=True)
    tracked.add_sampled(0, rows_with([1]), np.array([True]), np.array([0]))
    tracked.add_updates(0, np.array([4.0]), np.array([0.01]))
    tracked.add_updates(7, np.array([4.0]), np.array([0.01]))  # never sampled: ignored
    assert tracked.series("update_ratio").values[0, 0] == pytest.approx(0.05)


def test_series_unpacks_and_converts():
    h = History(("a",), every=1, capacity=2, hist_capacity=2, step_capacity=2)
    h.add_step(0, loss=1.5)
    values, steps, rows = h.series("loss")
    assert values.tolist() == [1.5] and steps.tolist() == [0] and rows is None
    assert np.asarray(h.series("loss")).tolist() == [1.5]


def test_series_read_between_out_of_order_writes_are_never_stale():
    """Series orders are remembered between writes (a judgement reads a dozen series): a step
    written after a newer one (a late step record) must appear at its place at once."""
    h = History(("a",), every=1, capacity=8, hist_capacity=8, step_capacity=8)
    for step in (0, 1, 2, 5):
        h.add_step(step, loss=float(step))
    assert h.series("loss").steps.tolist() == [0, 1, 2, 5]
    h.add_step(3, loss=3.0)  # arrives late
    assert h.series("loss").steps.tolist() == [0, 1, 2, 3, 5]
    assert h.series("loss").values.tolist() == [0.0, 1.0, 2.0, 3.0, 5.0]
    for step in range(6, 14):  # the ring wraps: the oldest are dropped
        h.add_step(step, loss=float(step))
    assert h.series("loss").steps.tolist() == list(range(6, 14))
    assert h.series("loss", last=3).steps.tolist() == [11, 12, 13]


def light(rows: np.ndarray, known=None) -> np.ndarray:
    """``rows`` as light rows: histogram columns NaN except in the rows ``known`` (bool)."""
    rows = rows.copy()
    keep = np.zeros(len(rows), dtype=bool) if known is None else np.asarray(known)
    rows[~keep, layout.HIST :] = layout.NO_HISTOGRAM
    return rows


def test_histogram_ring_keeps_the_newest_steps_that_have_histograms_however_spaced():
    """On a cadence, histogram steps are one in N: the ring keeps ``hist_capacity`` of them,
    not the histograms of the last ``hist_capacity`` sampled steps (which would be one or none)."""
    h = History(("a",), every=2, capacity=100, hist_capacity=3, step_capacity=200)
    for step in range(0, 80, 2):
        full = (step // 2) % 8 == 0
        rows = rows_with([4], sumsq=step, hist_bin=10 + step // 16)
        h.add_sampled(step, rows if full else light(rows), np.array([True]), np.array([0]))
    hist = h.series("hist")
    assert list(hist.steps) == [32, 48, 64]
    assert [int(np.argmax(v[0])) for v in hist.values] == [12, 13, 14]
    assert h.has_hist(64) and not h.has_hist(66) and not h.has_hist(16)
    rows, present = h.sampled_rows(66)
    assert present.all() and np.isnan(rows[:, layout.HIST :]).all()  # a light step: no histogram
    assert rows[0, layout.SUMSQ] == 66
    rows, _ = h.sampled_rows(64)
    assert rows[0, layout.HIST + 14] == 4


def test_rows_without_a_histogram_at_a_step_are_nan_and_latest_finds_each_rows_own():
    h = History(("a", "b", "c"), every=1, capacity=10, hist_capacity=10, step_capacity=10)
    both = np.array([True, True, True])
    h.add_sampled(0, rows_with([4, 9, 1], max_abs=1.0, hist_bin=20), both, np.array([0, 1, 2]))
    # step 1: only 'b' has a histogram (it triggered one on a light step)
    h.add_sampled(1, light(rows_with([4, 9, 1], max_abs=2.0, hist_bin=30), [False, True, False]), both, np.zeros(3))
    h.add_sampled(2, light(rows_with([4, 9, 1], max_abs=3.0)), both, np.zeros(3))
    series = h.series("hist")
    assert list(series.steps) == [0, 1]
    assert np.isnan(series.values[1, 0]).all() and series.values[1, 1, 30] == 9
    hist, steps, max_abs = h.latest_histograms()
    assert steps.tolist() == [0, 1, 0]
    assert hist[0, 20] == 4 and hist[1, 30] == 9 and hist[2, 20] == 1
    assert max_abs.tolist() == [1.0, 2.0, 1.0]  # max_abs at the histogram's own step, not the latest
    fp8 = h.series("fp8_e5m2_zero")
    assert np.isnan(fp8.values[1, 0]) and np.isfinite(fp8.values[1, 1])


def test_latest_histograms_of_an_empty_history():
    h = History(("a",), every=1, capacity=2, hist_capacity=2, step_capacity=2)
    hist, steps, max_abs = h.latest_histograms()
    assert np.isnan(hist).all() and steps.tolist() == [-1] and np.isnan(max_abs).all()
    h.add_sampled(0, light(rows_with([4])), np.array([True]), np.array([0]))
    assert h.latest_histograms()[1].tolist() == [-1] and len(h.series("hist")) == 0


# ---- a thinned sampled ring (dense newest steps, one older step in `stride`) ----------------


def kept_reference(newest: int, dense: int, thinned: int, stride: int) -> list[int]:
    """Sampled indices a thinned ring holds once indices 0..newest were written in order: the
    newest ``dense``, and the newest ``thinned`` multiples of ``stride`` older than those."""
    recent = [k for k in range(newest + 1) if k > newest - dense]
    older = [k for k in range(newest + 1) if k <= newest - dense and k % stride == 0]
    return (older[-thinned:] if thinned else []) + recent


def sampled_step(h: History, step: int, rows: int = 2) -> None:
    """Sampled ``step``, its values saying which step they are: sumsq = step, order = step + row,
    a row absent on odd steps."""
    present = np.ones(rows, dtype=bool)
    present[-1] = step % 2 == 0
    h.add_sampled(step, rows_with([4] * rows, sumsq=float(step)), present, step + np.arange(rows))


@pytest.mark.parametrize(
    ("capacity", "dense", "stride", "every"),
    [(10, 6, 3, 1), (7, 4, 2, 5), (9, 9, 1, 2), (5, 3, 4, 1), (12, 6, 7, 3), (4, 1, 2, 1)],
)
def test_thinned_ring_keeps_the_newest_every_one_and_older_ones_one_in_stride(capacity, dense, stride, every):
    h = History(
        ("a", "b"), every=every, capacity=capacity, hist_capacity=2, step_capacity=4, dense=dense, stride=stride
    )
    for newest in range(70):
        sampled_step(h, newest * every)
        expected = [k * every for k in kept_reference(newest, dense, capacity - dense, stride)]
        norm = h.series("sumsq")
        assert norm.steps.tolist() == expected, f"after sampled step {newest}"
    # Each kept step's values moved with it.
    steps = np.array(expected)
    np.testing.assert_array_equal(h.series("sumsq").values[:, 0], steps)
    present = np.stack([np.ones(len(steps), dtype=bool), steps % 2 == 0], axis=1)
    np.testing.assert_array_equal(h.series("present").values, present)
    order = np.where(present, steps[:, None] + [0, 1], np.nan)
    np.testing.assert_array_equal(h.series("backward_order").values, order)
    for step in range(0, 70 * every, every):
        found = h.sampled_rows(step)
        if step in expected:
            assert found[0][0, layout.SUMSQ] == step and found[1][1] == (step % 2 == 0)
        else:
            assert found is None


def test_update_norms_move_with_their_step_into_the_thinned_part():
    h = History(("a",), every=1, capacity=4, hist_capacity=1, step_capacity=4, track_updates=True, dense=2, stride=2)
    for step in range(8):
        h.add_sampled(step, rows_with([1]), np.array([True]), np.array([0]))
        h.add_updates(step, np.array([float(step + 1) ** 2]), np.array([1.0]))
    ratio = h.series("update_ratio")
    assert ratio.steps.tolist() == [2, 4, 6, 7]
    np.testing.assert_allclose(ratio.values[:, 0], 1.0 / np.array([3.0, 5.0, 7.0, 8.0]))
    h.add_updates(4, np.array([1.0]), np.array([4.0]))  # a late write to a thinned step lands there
    assert h.series("update_norm").values[1, 0] == 2.0
    h.add_sampled(8, rows_with([1]), np.array([True]), np.array([0]))  # no update norms (yet)
    assert h.series("update_norm").steps.tolist() == [4, 6, 7, 8]
    assert np.isnan(h.series("update_norm").values[-1, 0])  # not those of the step its slot held


def test_a_late_step_is_kept_only_where_the_rule_keeps_it():
    h = History(("a",), every=1, capacity=4, hist_capacity=1, step_capacity=4, dense=2, stride=2)
    for step in (0, 1, 3, 4, 5):  # step 2 late
        sampled_step(h, step, rows=1)
    assert h.series("sumsq").steps.tolist() == [0, 4, 5]
    sampled_step(h, 2, rows=1)  # too old for the dense part; a multiple of 2 newer than its thinned slot's
    sampled_step(h, 1, rows=1)  # not a multiple: dropped
    assert h.series("sumsq").steps.tolist() == [0, 2, 4, 5]
    sampled_step(h, 0, rows=1)  # already kept: rewritten in place
    assert h.series("sumsq").steps.tolist() == [0, 2, 4, 5]


def test_a_stale_step_leaving_the_dense_part_never_replaces_a_newer_older_step():
    """With sampled steps missing (failed), a dense slot may still hold an old step when a newer
    step already took its thinned slot: the newer one stays."""
    h = History(("a",), every=1, capacity=5, hist_capacity=1, step_capacity=4, dense=3, stride=2)
    for step in (0, 4, 10, 12):  # 4 leaves dense slot 1 for thinned slot 3 at step 10; 0 leaves slot 0 at 12
        sampled_step(h, step, rows=1)
    assert h.series("sumsq").steps.tolist() == [4, 10, 12]
    np.testing.assert_array_equal(h.series("sumsq").values[:, 0], [4, 10, 12])


def test_skipped_reads_the_nonfinite_counts_of_thinned_steps():
    h = History(("a",), every=1, capacity=4, hist_capacity=1, step_capacity=16, dense=2, stride=4)
    for step in range(10):
        h.add_sampled(step, rows_with([4], nans=int(step in (4, 5))), np.array([True]), np.array([0]))
        h.add_step(step, grad_scale=8.0)
    assert h.series("sumsq").steps.tolist() == [0, 4, 8, 9]  # step 5 is no longer kept
    skipped = h.series("skipped")
    assert skipped.steps[skipped.values].tolist() == [4]


@pytest.mark.parametrize(("dense", "stride"), [(0, 1), (5, 1), (2, 0)])
def test_dense_and_stride_are_checked(dense, stride):
    with pytest.raises(ValueError, match="need 0 < dense <= capacity and stride >= 1"):
        History(("a",), every=1, capacity=4, hist_capacity=1, step_capacity=4, dense=dense, stride=stride)
