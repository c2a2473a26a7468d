"""Records survive their JSON-line encoding bit for bit."""

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import gradscope
from gradscope.run import records
from gradscope.run.info import RunInfo
from gradscope.stats import layout

SCALAR_WIDTH = layout.HIST

special_floats = st.floats(allow_nan=True, allow_infinity=True, width=64)


@st.composite
def sampled_records(draw):
    n_rows = draw(st.integers(0, 12))
    scalars = draw(hnp.arrays(np.float64, (n_rows, SCALAR_WIDTH), elements=special_floats))
    big = draw(st.booleans())
    counts = draw(hnp.arrays(np.int64, (n_rows, layout.NUM_BINS), elements=st.integers(0, 2**40 if big else 2**32 - 1)))
    rows = np.concatenate([scalars, counts.astype(np.float64)], axis=1)
    rows[draw(hnp.arrays(np.bool_, (n_rows,))), layout.HIST :] = layout.NO_HISTOGRAM  # light rows
    present = draw(hnp.arrays(np.bool_, (n_rows,)))
    order = draw(hnp.arrays(np.int64, (n_rows,), elements=st.integers(-1, 10_000)))
    ranks = {}
    if draw(st.booleans()):  # a distributed run: ranks of non-finite gradients per row
        ranks = {
            "nonfinite_rank": draw(hnp.arrays(np.int64, (n_rows,), elements=st.integers(-1, 100_000))),
            "nonfinite_ranks": draw(hnp.arrays(np.int64, (n_rows,), elements=st.integers(0, 100_000))),
        }
    return records.Sampled(draw(st.integers(0, 2**40)), rows, present, order, **ranks)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


@given(sampled_records())
def test_sampled_round_trip_is_bit_exact(record):
    line = records.encode(record)
    assert "\n" not in line
    back = records.decode(line)
    assert back.step == record.step
    assert same_bits(back.rows, record.rows)  # NaN payloads, -0.0 and infinities included
    assert same_bits(back.present, record.present)
    assert same_bits(back.order, record.order)
    if record.nonfinite_rank is None:
        assert back.nonfinite_rank is None and back.nonfinite_ranks is None
    else:
        assert same_bits(back.nonfinite_rank, record.nonfinite_rank)
        assert same_bits(back.nonfinite_ranks, record.nonfinite_ranks)


def test_light_rows_store_no_histogram_and_say_which_rows_have_one():
    rows = np.zeros((3, layout.ROW_WIDTH))
    rows[:, layout.NUMEL] = 10
    rows[:, layout.HIST + 40] = 10
    light = rows.copy()
    light[:, layout.HIST :] = layout.NO_HISTOGRAM
    full_line = records.encode(records.Sampled(5, rows, np.ones(3, bool), np.arange(3)))
    light_line = records.encode(records.Sampled(6, light, np.ones(3, bool), np.arange(3)))
    assert [a[0] for a in json.loads(light_line)["a"]] == ["present", "order", "scalars", "hist_known"]
    assert [a[0] for a in json.loads(full_line)["a"]] == ["present", "order", "scalars", "hist"]
    assert len(light_line) < len(full_line)
    mixed = light.copy()
    mixed[1, layout.HIST :] = rows[1, layout.HIST :]
    back = records.decode(records.encode(records.Sampled(7, mixed, np.ones(3, bool), np.arange(3))))
    assert layout.histogram_known(back.rows).tolist() == [False, True, False]
    assert back.rows[1, layout.HIST + 40] == 10


@given(
    st.integers(0, 20).flatmap(
        lambda n: st.tuples(
            hnp.arrays(np.float64, (n,), elements=special_floats), hnp.arrays(np.float64, (n,), elements=special_floats)
        )
    )
)
def test_updates_round_trip_is_bit_exact(arrays):
    record = records.Updates(7, *arrays)
    back = records.decode(records.encode(record))
    assert same_bits(back.weight_sq, arrays[0]) and same_bits(back.update_sq, arrays[1])


@given(st.dictionaries(st.text(min_size=1, max_size=20), special_floats, max_size=8))
def test_scalar_values_round_trip_including_non_finite(values):
    for kind in (records.StepValues, records.Metrics):
        back = records.decode(records.encode(kind(3, values)))
        assert type(back) is kind and back.step == 3
        assert back.values.keys() == values.keys()
        for key, value in values.items():
            assert back.values[key] == value or (np.isnan(value) and np.isnan(back.values[key]))


def test_header_failed_closed_round_trip():
    header = records.Header({"rows": ["a"], "x": 1}, thresholds={"sustain": 3}, segment=2)
    back = records.decode(records.encode(header))
    assert back == header and back.schema == records.SCHEMA
    assert back.hist_edges == layout.HIST_EDGES.tolist()
    assert records.decode(records.encode(records.Failed(9))) == records.Failed(9)
    assert records.decode(records.encode(records.Closed(12))) == records.Closed(12)
    desync = records.Desync(4, (1, 3), (2,))
    assert records.decode(records.encode(desync)) == desync


def test_schema_1_lines_still_read():
    """A sampled line written by gradscope's first log format (no rank arrays)."""
    old = records.Sampled(5, np.zeros((2, layout.ROW_WIDTH)), np.ones(2, bool), np.arange(2))
    back = records.decode(records.encode(old))
    assert back.nonfinite_rank is None and back.step == 5


def test_each_line_is_plain_json():
    rows = np.zeros((3, layout.ROW_WIDTH))
    obj = json.loads(records.encode(records.Sampled(1, rows, np.ones(3, bool), np.arange(3))))
    assert obj["t"] == "sampled" and obj["step"] == 1


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("[1, 2]", "not a gradscope record"),
        ('{"a": 1}', "not a gradscope record"),
        ('{"t": "mystery"}', "unknown record type 'mystery'"),
        ('{"t": "sampled", "step": 1, "a": [["x", "<f8", [4]]], "z": "eJwDAAAAAAE="}', "do not match"),
    ],
)
def test_foreign_lines_are_rejected(line, message):
    with pytest.raises(ValueError, match=message):
        records.decode(line)


def test_encode_rejects_non_records():
    with pytest.raises(TypeError, match="not a gradscope record: dict"):
        records.encode({"t": "header"})


# --------------------------------------------------------------------------------------
# Forward records (schema 3)
# --------------------------------------------------------------------------------------


@st.composite
def forward_records(draw):
    modules = draw(st.integers(0, 9))
    scalars = draw(hnp.arrays(np.float64, (2, modules, SCALAR_WIDTH), elements=special_floats))
    big = draw(st.booleans())
    counts = draw(
        hnp.arrays(np.int64, (2, modules, layout.NUM_BINS), elements=st.integers(0, 2**40 if big else 2**32 - 1))
    )
    both = np.concatenate([scalars, counts.astype(np.float64)], axis=-1)
    order = draw(hnp.arrays(np.int64, (2, modules), elements=st.integers(-1, 2**40)))
    names = st.sampled_from(["float32", "float16", "bfloat16", "", "float8_e4m3fn"]) | st.text(max_size=12)
    dtypes = tuple(draw(st.lists(names, min_size=modules, max_size=modules)))
    autocast = draw(st.sampled_from(["", "float16", "bfloat16"]))
    rank = None
    if draw(st.booleans()):  # a distributed run
        rank = draw(hnp.arrays(np.int64, (2, modules), elements=st.integers(-1, 100_000)))
    return records.Forward(draw(st.integers(0, 2**40)), both[1], both[0], order, dtypes, autocast, rank)


@given(forward_records())
def test_forward_round_trip_is_bit_exact(record):
    line = records.encode(record)
    assert "\n" not in line and json.loads(line)["t"] == "forward"
    back = records.decode(line)
    assert type(back) is records.Forward and back.step == record.step
    assert same_bits(back.outputs, record.outputs)  # scalars (NaN payloads, -0.0) and histogram counts
    assert same_bits(back.inputs, record.inputs)
    assert same_bits(back.order, record.order)
    np.testing.assert_array_equal(back.present, record.order >= 0)
    assert back.dtypes == record.dtypes and back.autocast == record.autocast
    if record.nonfinite_rank is None:
        assert back.nonfinite_rank is None
    else:
        assert same_bits(back.nonfinite_rank, record.nonfinite_rank)


def test_forward_histogram_counts_beyond_32_bits_are_exact():
    outputs = np.zeros((2, layout.ROW_WIDTH))
    outputs[0, layout.HIST + 5] = 2**33 + 1
    outputs[1, layout.HIST + 63] = 2**32
    inputs = np.zeros_like(outputs)
    inputs[1, layout.HIST] = 2**32 - 1
    record = records.Forward(3, outputs, inputs, np.array([[0, 2], [3, 1]]), ("float16", "float16"), "float16")
    back = records.decode(records.encode(record))
    assert back.outputs[0, layout.HIST + 5] == 2**33 + 1 and back.outputs[1, layout.HIST + 63] == 2**32
    assert back.inputs[1, layout.HIST] == 2**32 - 1
    assert back.nonfinite_rank is None


def test_a_header_carries_row_dtypes_modules_and_sibling_groups():
    info = RunInfo(
        rows=("a", "b"),
        row_types=("Linear", "Linear"),
        summary={},
        every=1,
        mode="backward",
        granularity="layer",
        history=10,
        hist_history=10,
        track_updates=False,
        row_numel=(4, 2),
        row_dtypes=("float16", "bfloat16"),
        modules=("(root)", "a"),
        module_types=("Net", "Linear"),
        sibling_groups={"experts": ("0", "1")},
    )
    back = records.decode(records.encode(records.Header(info.to_dict())))
    assert back.schema == records.SCHEMA == 7
    assert RunInfo.from_dict(back.info) == info


def test_a_header_carries_the_runs_tags():
    info = RunInfo(("a",), ("Linear",), {}, 1, "backward", "layer", 10, 10, False, (4,), tags={"fold": 2, "lr": 3e-4})
    back = records.decode(records.encode(records.Header(info.to_dict())))
    assert RunInfo.from_dict(back.info).tags == {"fold": 2, "lr": 3e-4}
    without = {k: v for k, v in info.to_dict().items() if k != "tags"}  # a schema 6 header
    assert RunInfo.from_dict(without).tags == {}


OLD_LOG = Path(__file__).resolve().parent.parent / "outputs" / "data" / "run-e76eb21"


def test_a_schema_2_log_still_reads():
    """A log written at commit e76eb21: no forward records, no row dtypes or modules in its header."""
    lines = (OLD_LOG / "gradscope-00000.jsonl").read_text().splitlines()
    decoded = [records.decode(line) for line in lines]
    header = decoded[0]
    assert isinstance(header, records.Header) and header.schema == 2
    assert not {"row_dtypes", "modules", "module_types"} & header.info.keys()
    info = RunInfo.from_dict(header.info)
    assert (info.row_dtypes, info.modules, info.module_types) == ((), (), ())
    assert info.tags == {}  # tags arrived with schema 7
    assert not any(isinstance(r, records.Forward) for r in decoded)
    sampled = [r for r in decoded if isinstance(r, records.Sampled)]
    assert [r.step for r in sampled] == list(range(0, 40, 2))
    assert all(r.rows.shape == (2, layout.ROW_WIDTH) and r.nonfinite_rank is None for r in sampled)

    run = gradscope.load_run(OLD_LOG)
    assert run.info.row_dtypes == () and run.info.modules == ()
    assert not [name for name in run.fields() if name.startswith("forward_")]
    with pytest.raises(KeyError, match="forward=True"):
        run.history("forward_rms")
    assert len(run.history("norm").steps) == 20


def test_weights_round_trip_is_bit_exact():
    rng = np.random.default_rng(2)
    rows = np.zeros((3, layout.ROW_WIDTH))
    rows[:, : layout.HIST] = rng.normal(size=(3, layout.HIST))
    rows[:, layout.HIST :] = rng.integers(0, 2**40, size=(3, layout.NUM_BINS))
    record = records.Weights(
        7, rows, np.array([0, 0, 2]), np.array([2, 1, 4]), rng.normal(size=3), np.array([0.0, np.inf, 1e-300])
    )
    back = records.decode(records.encode(record))
    assert isinstance(back, records.Weights) and back.step == 7
    assert same_bits(back.rows, rows) and same_bits(back.grad_dot_weight, record.grad_dot_weight)
    assert same_bits(back.grad_weight_sq, record.grad_weight_sq)
    assert back.row_of.tolist() == [0, 0, 2] and back.ndim.tolist() == [2, 1, 4]
