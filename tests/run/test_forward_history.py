"""Forward statistics of a run: where NaN/Inf was born in a forward pass (``nonfinite_origin``),
and the bounded per-module history (``ForwardHistory``), from ``Forward`` records built by hand."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gradscope.run import forward_history, records
from gradscope.run.forward_history import FORWARD_FIELDS, ForwardHistory, ForwardNonfinite, nonfinite_origin
from gradscope.stats import layout

MODULES = ("(root)", "a", "b", "c")

# A sequential model root(a, b, c): the root starts (0), a starts (1) and returns (2), b starts (3)
# and returns (4), c starts (5) and returns (6), the root returns (7).
SEQUENCE = np.array([[0, 1, 3, 5], [7, 2, 4, 6]])
INPUTS, OUTPUTS = 0, 1


def row(numel=8, *, nans=0, infs=0, sum_=0.0, sumsq=0.0, max_abs=0.0, zeros=0):
    out = np.zeros(layout.ROW_WIDTH)
    out[[layout.NUMEL, layout.SUM, layout.SUMSQ, layout.MAX_ABS]] = numel, sum_, sumsq, max_abs
    out[[layout.ZEROS, layout.NANS, layout.INFS]] = zeros, nans, infs
    return out


def forward(step=0, *, outputs=None, inputs=None, order=SEQUENCE, dtypes=("float32",) * 4, rank=None):
    """A record of the model above: ``outputs``/``inputs`` map module index -> row (others finite)."""
    count = order.shape[1]
    both = np.stack([[row() for _ in range(count)] for _ in range(2)])
    for kind, given_rows in ((INPUTS, inputs or {}), (OUTPUTS, outputs or {})):
        for m, values in given_rows.items():
            both[kind, m] = values
    return records.Forward(step, both[OUTPUTS], both[INPUTS], np.array(order), tuple(dtypes), nonfinite_rank=rank)


# --------------------------------------------------------------------------------------
# nonfinite_origin
# --------------------------------------------------------------------------------------


def test_a_finite_pass_has_no_origin():
    assert nonfinite_origin(forward()) is None


def test_the_first_nan_output_in_forward_order_is_the_origin():
    record = forward(
        5,
        outputs={2: row(nans=3, infs=1), 3: row(nans=8), 0: row(nans=8)},
        dtypes=("float32", "float32", "float16", "bfloat16"),
    )
    assert nonfinite_origin(record) == ForwardNonfinite(
        step=5, module=2, where="outputs", nans=3, infs=1, dtype="float16", modules=(2, 3, 0), rank=-1
    )


def test_forward_order_not_model_order_decides():
    # c runs first, then b, then a (a model whose forward calls its children in reverse).
    order = np.array([[0, 5, 3, 1], [7, 6, 4, 2]])
    record = forward(outputs={1: row(nans=1), 3: row(nans=2)}, order=order)
    origin = nonfinite_origin(record)
    assert (origin.module, origin.nans, origin.modules) == (3, 2, (3, 1))


def test_a_nan_in_inputs_no_module_produced_is_the_origin():
    # The parent's own code between a and b made the NaN that b receives and passes on.
    record = forward(inputs={2: row(nans=4)}, outputs={2: row(nans=6), 3: row(nans=6), 0: row(nans=6)})
    origin = nonfinite_origin(record)
    assert (origin.module, origin.where, origin.nans, origin.infs) == (2, "inputs", 4, 0)
    assert origin.modules == (2, 3, 0), "outputs only"


def test_a_nan_in_the_batch_is_born_at_the_root():
    record = forward(inputs={0: row(nans=1), 1: row(nans=1)}, outputs={1: row(nans=2), 0: row(nans=2)})
    origin = nonfinite_origin(record)
    assert (origin.module, origin.where, origin.nans) == (0, "inputs", 1)
    assert origin.modules == (1, 0)


def test_inputs_holding_only_inf_are_masks_never_the_origin():
    # b receives a -inf attention mask (position 3, before c's NaN output at 6).
    record = forward(inputs={2: row(infs=16)}, outputs={3: row(nans=2), 0: row(nans=2)})
    origin = nonfinite_origin(record)
    assert (origin.module, origin.where) == (3, "outputs")
    assert origin.modules == (3, 0)
    # A NaN among the mask's Infs does make those inputs the origin.
    origin = nonfinite_origin(forward(inputs={2: row(infs=16, nans=1)}, outputs={3: row(nans=2)}))
    assert (origin.module, origin.where, origin.nans, origin.infs) == (2, "inputs", 1, 16)


def test_inf_only_with_a_finite_root_output_is_not_an_event():
    # Masks in, +inf padding distances out of b, a finite loss-bearing output.
    record = forward(inputs={0: row(infs=4), 2: row(infs=4)}, outputs={2: row(infs=4), 3: row(infs=1)})
    assert nonfinite_origin(record) is None


def test_inf_in_the_root_output_is_an_event():
    origin = nonfinite_origin(forward(outputs={0: row(infs=2)}))
    assert (origin.module, origin.where, origin.nans, origin.infs, origin.modules) == (0, "outputs", 0, 2, (0,))
    # With the root's output Inf, an earlier Inf output is where it started; the mask still is not.
    record = forward(inputs={1: row(infs=9)}, outputs={2: row(infs=3), 0: row(infs=1)})
    origin = nonfinite_origin(record)
    assert (origin.module, origin.where, origin.infs, origin.modules) == (2, "outputs", 3, (2, 0))


def test_an_inf_output_before_the_first_nan_is_the_origin():
    # b overflows to Inf, c computes inf - inf = NaN: the Inf at b is where it was born.
    origin = nonfinite_origin(forward(outputs={2: row(infs=1), 3: row(nans=1)}))
    assert (origin.module, origin.infs, origin.modules) == (2, 1, (2, 3))


def test_absent_rows_do_not_count():
    order = SEQUENCE.copy()
    order[:, 2] = -1  # b did not run this step: its stale NaN counts mean nothing
    assert nonfinite_origin(forward(inputs={2: row(nans=1)}, outputs={2: row(nans=1)}, order=order)) is None
    order[1, 0] = -1
    assert nonfinite_origin(forward(outputs={0: row(infs=1)}, order=order)) is None


def test_rank_and_dtype_of_the_origin():
    rank = np.full((2, 4), -1)
    rank[INPUTS, 2], rank[OUTPUTS, 2], rank[OUTPUTS, 3] = 1, 0, 3
    record = forward(inputs={2: row(nans=1)}, outputs={3: row(nans=1)}, rank=rank, dtypes=("", "", "float16"))
    origin = nonfinite_origin(record)
    assert (origin.module, origin.where, origin.rank, origin.dtype) == (2, "inputs", 1, "float16")
    origin = nonfinite_origin(forward(outputs={3: row(nans=1)}, rank=rank, dtypes=("", "", "float16")))
    assert (origin.module, origin.rank, origin.dtype) == (3, 3, ""), "dtypes shorter than the modules: unknown"


def reference_origin(record: records.Forward) -> tuple | None:
    """The docstring's rules, call by call in forward order: ``(module, where, nans, infs, modules)``."""
    both = (record.inputs, record.outputs)
    calls = sorted(
        (int(record.order[kind, m]), kind, m)
        for kind in (INPUTS, OUTPUTS)
        for m in range(record.order.shape[1])
        if record.order[kind, m] >= 0
    )

    def nan(kind, m):
        return both[kind][m, layout.NANS] > 0

    def inf(kind, m):
        return both[kind][m, layout.INFS] > 0

    root_bad = record.order[OUTPUTS, 0] >= 0 and (nan(OUTPUTS, 0) or inf(OUTPUTS, 0))
    if not (root_bad or any(nan(kind, m) for _, kind, m in calls)):
        return None
    origin = next((kind, m) for _, kind, m in calls if nan(kind, m) or (kind == OUTPUTS and inf(kind, m)))
    kind, m = origin
    modules = tuple(m for _, k, m in calls if k == OUTPUTS and (nan(k, m) or inf(k, m)))
    where = "outputs" if kind == OUTPUTS else "inputs"
    return m, where, int(both[kind][m, layout.NANS]), int(both[kind][m, layout.INFS]), modules


@st.composite
def random_forwards(draw):
    count = draw(st.integers(1, 6))
    positions = np.array(draw(st.permutations(range(2 * count)))).reshape(2, count)
    absent = np.array(draw(st.lists(st.booleans(), min_size=2 * count, max_size=2 * count))).reshape(2, count)
    order = np.where(absent, -1, positions)
    counts = st.lists(st.sampled_from([0, 0, 1, 3]), min_size=2 * count, max_size=2 * count)
    nans, infs = (np.array(draw(counts)).reshape(2, count) for _ in range(2))
    both = np.zeros((2, count, layout.ROW_WIDTH))
    both[..., layout.NUMEL] = 8
    both[..., layout.NANS], both[..., layout.INFS] = nans, infs
    return records.Forward(draw(st.integers(0, 100)), both[1], both[0], order, ("float16",) * count)


@given(random_forwards())
def test_origin_matches_the_rules_call_by_call(record):
    expected = reference_origin(record)
    origin = nonfinite_origin(record)
    if expected is None:
        assert origin is None
    else:
        assert (origin.module, origin.where, origin.nans, origin.infs, origin.modules) == expected
        assert origin.step == record.step and origin.rank == -1


# --------------------------------------------------------------------------------------
# ForwardHistory
# --------------------------------------------------------------------------------------


def test_forward_fields_are_the_columns_derived_values_presence_and_order():
    assert FORWARD_FIELDS == tuple(
        "forward_" + name
        for name in (
            "numel",
            "sum",
            "sumsq",
            "max_abs",
            "zeros",
            "nans",
            "infs",
            "norm",
            "rms",
            "mean",
            "zero_frac",
            "nonfinite",
            "finite",
            "present",
            "order",
        )
    )


REFERENCE = {  # each forward field from the named scalar columns, written out independently
    "numel": lambda c: c["numel"],
    "sum": lambda c: c["sum"],
    "sumsq": lambda c: c["sumsq"],
    "max_abs": lambda c: c["max_abs"],
    "zeros": lambda c: c["zeros"],
    "nans": lambda c: c["nans"],
    "infs": lambda c: c["infs"],
    "norm": lambda c: np.sqrt(c["sumsq"]),
    "rms": lambda c: np.sqrt(c["sumsq"] / np.maximum(c["numel"] - c["nans"] - c["infs"], 1)),
    "mean": lambda c: c["sum"] / np.maximum(c["numel"] - c["nans"] - c["infs"], 1),
    "zero_frac": lambda c: c["zeros"] / np.maximum(c["numel"], 1),
    "nonfinite": lambda c: c["nans"] + c["infs"],
    "finite": lambda c: c["numel"] - c["nans"] - c["infs"],
}


def random_record(step, rng, count, absent=()):
    """Random plausible columns; absent modules keep non-zero garbage (to be hidden as NaN)."""
    outputs = np.zeros((count, layout.ROW_WIDTH))
    numel = rng.integers(1, 50, count).astype(np.float64)
    nans = np.floor(rng.random(count) * numel / 4)
    infs = np.floor(rng.random(count) * numel / 4)
    outputs[:, layout.NUMEL], outputs[:, layout.NANS], outputs[:, layout.INFS] = numel, nans, infs
    outputs[:, layout.ZEROS] = np.floor(rng.random(count) * (numel - nans - infs))
    outputs[:, layout.SUM] = rng.normal(size=count) * 10
    outputs[:, layout.SUMSQ] = rng.random(count) * 100
    outputs[:, layout.MAX_ABS] = rng.random(count) * 5
    outputs[:, layout.HIST + 40] = 1
    order = rng.permutation(2 * count).reshape(2, count)
    order[1, list(absent)] = -1
    return records.Forward(step, outputs, np.zeros_like(outputs), order, ("float32",) * count)


def test_series_are_the_stored_columns_and_their_derived_values():
    rng = np.random.default_rng(0)
    history = ForwardHistory(MODULES, capacity=8)
    added = [random_record(step, rng, 4, absent={(step // 10) % 4}) for step in range(0, 50, 10)]
    for record in added:
        history.add(record)
    present = np.array([r.order[1] >= 0 for r in added])
    for name, formula in REFERENCE.items():
        values, steps = history.series("forward_" + name)
        assert list(steps) == [0, 10, 20, 30, 40]
        assert values.shape == (5, 4) and values.dtype == np.float64
        columns = {field: np.array([r.outputs[:, i] for r in added]) for i, field in enumerate(layout.SCALAR_FIELDS)}
        expected = np.where(present, formula(columns), np.nan)
        np.testing.assert_allclose(values, expected, rtol=1e-15, err_msg=name)
        assert (np.isnan(values) == ~present).all(), f"{name}: NaN exactly where a module did not run"
        # The same as the row definition's own derivation, NaN where absent.
        via_layout = layout.derive(name, columns)
        np.testing.assert_array_equal(values, np.where(present, via_layout, np.nan))
    values, _ = history.series("forward_present")
    np.testing.assert_array_equal(values, present.astype(np.float64))  # 0/1, never NaN
    values, _ = history.series("forward_order")
    np.testing.assert_array_equal(values, np.where(present, [r.order[1] for r in added], np.nan))


def test_a_module_whose_output_has_no_finite_values_has_zero_rms_and_mean():
    history = ForwardHistory(("(root)",), capacity=2)
    history.add(records.Forward(0, row(4, nans=4)[None], np.zeros((1, layout.ROW_WIDTH)), np.array([[0], [1]]), ("",)))
    assert history.series("forward_rms")[0][0, 0] == 0.0 and history.series("forward_mean")[0][0, 0] == 0.0
    assert history.series("forward_finite")[0][0, 0] == 0 and history.series("forward_nonfinite")[0][0, 0] == 4


def test_the_ring_drops_the_oldest_steps():
    rng = np.random.default_rng(1)
    history = ForwardHistory(MODULES, capacity=3)
    added = [random_record(step, rng, 4) for step in range(7)]
    for record in added:
        history.add(record)
    assert list(history.steps()) == [4, 5, 6]
    assert not history.sampled(3) and history.sampled(4) and history.sampled(6) and not history.sampled(7)
    values, steps = history.series("forward_sumsq")
    assert list(steps) == [4, 5, 6]
    np.testing.assert_array_equal(values, [r.outputs[:, layout.SUMSQ] for r in added[4:]])


def test_an_empty_history():
    history = ForwardHistory(MODULES, capacity=4)
    assert history.steps().shape == (0,) and history.latest is None and history.events == []
    values, steps = history.series("forward_rms")
    assert values.shape == (0, 4) and steps.shape == (0,)


@pytest.mark.parametrize("field", ["rms", "forward_hist", "forward_rms_nonzero", "forward_", "backward_order"])
def test_unknown_fields_raise_key_error(field):
    with pytest.raises(KeyError, match=field):
        ForwardHistory(MODULES).series(field)


def test_latest_is_the_newest_record():
    history = ForwardHistory(MODULES, capacity=4)
    first, second, again, stale = forward(3), forward(5), forward(5), forward(4)
    history.add(first)
    assert history.latest is first
    history.add(second)
    history.add(stale)  # an older step arriving late does not replace the newest
    assert history.latest is second
    history.add(again)  # the same step measured again: the newer measurement
    assert history.latest is again


def test_events_are_kept_up_to_the_limit_while_all_are_counted():
    history = ForwardHistory(MODULES, capacity=4)
    limit = forward_history.KEPT_EVENTS
    bad_steps = list(range(1, 2 * (limit + 5), 2))  # odd steps hold NaN
    for step in range(2 * (limit + 5)):
        if step in bad_steps:
            history.add(forward(step, outputs={1: row(nans=1), 0: row(nans=1)}))
        elif step % 4 == 0:
            history.add(forward(step, outputs={2: row(infs=1)}))  # Inf-only padding: not an event
        else:
            history.add(forward(step))
    assert history.nonfinite_steps == len(bad_steps) == limit + 5
    assert len(history.events) == limit
    assert [e.step for e in history.events] == bad_steps[:limit], "the first ones, for the whole run"
    assert all(e.module == 1 and e.modules == (1, 0) for e in history.events)
    assert list(history.steps()) == list(range(2 * (limit + 5) - 4, 2 * (limit + 5)))
