"""``RunInfo`` round trips through a dict and JSON (tuples restored), ``package_version``, and
the rows of each member of its sibling groups (the experts of a mixture of experts)."""

import dataclasses
import json
from importlib import metadata

import numpy as np
import pytest

from gradscope.run import info as info_module
from gradscope.run.info import DISTRIBUTION, ROOT_MODULE, RunInfo, package_version


def make_info() -> RunInfo:
    return RunInfo(
        rows=("encoder.0", "encoder.1", "head"),
        row_types=("Linear", "LayerNorm", "Linear"),
        summary={"parameters": 1234, "trainable": 1200, "bytes": 4936, "layers": 3},
        every=4,
        mode="step",
        granularity="parameter",
        history=500,
        hist_history=50,
        track_updates=True,
        row_numel=(1024, 10, 200),
        extra={"versions": {"torch": "2.4.0"}, "created": 1700000000.5, "distributed": None},
    )


def test_to_dict_holds_every_field():
    data = make_info().to_dict()
    assert data == {
        "rows": ("encoder.0", "encoder.1", "head"),
        "row_types": ("Linear", "LayerNorm", "Linear"),
        "summary": {"parameters": 1234, "trainable": 1200, "bytes": 4936, "layers": 3},
        "every": 4,
        "mode": "step",
        "granularity": "parameter",
        "history": 500,
        "hist_history": 50,
        "track_updates": True,
        "row_numel": (1024, 10, 200),
        "extra": {"versions": {"torch": "2.4.0"}, "created": 1700000000.5, "distributed": None},
        "row_dtypes": (),
        "modules": (),
        "module_types": (),
        "histogram_every": 1,
        "sibling_groups": {},
        "history_mib": 512,
        "tags": {},
    }


def test_an_older_header_without_a_memory_budget_reads_with_the_default():
    data = make_info().to_dict()
    del data["history_mib"]
    assert RunInfo.from_dict(data).history_mib == 512


def test_an_older_header_without_dtypes_or_modules_reads_with_empty_ones():
    data = make_info().to_dict()
    for name in ("row_dtypes", "modules", "module_types"):
        del data[name]
    back = RunInfo.from_dict(data)
    assert back.row_dtypes == () and back.modules == () and back.module_types == ()
    assert back.rows == ("encoder.0", "encoder.1", "head")


def test_round_trip_through_json_restores_tuples():
    original = make_info()
    data = json.loads(json.dumps(original.to_dict()))
    assert isinstance(data["rows"], list) and isinstance(data["row_numel"], list)
    back = RunInfo.from_dict(data)
    assert back == original
    assert type(back.rows) is tuple and type(back.row_types) is tuple and type(back.row_numel) is tuple
    assert back.row_numel == (1024, 10, 200)
    assert back.extra["versions"] == {"torch": "2.4.0"}
    assert isinstance(data["rows"], list)  # the caller's dict is left as it was
    assert hash(back.rows) == hash(original.rows)


def test_from_dict_defaults_extra_and_refuses_unknown_fields():
    data = make_info().to_dict()
    del data["extra"]
    assert RunInfo.from_dict(data).extra == {}
    with pytest.raises(TypeError):
        RunInfo.from_dict({**make_info().to_dict(), "surprise": 1})
    with pytest.raises(KeyError):
        RunInfo.from_dict({"every": 1})


def test_package_version_is_the_installed_distributions():
    try:
        expected = metadata.version("gradscope-diagnostics")
    except metadata.PackageNotFoundError:
        pytest.skip("gradscope-diagnostics is not installed")
    assert DISTRIBUTION == "gradscope-diagnostics"
    assert package_version() == expected
    assert expected != "unknown"


def test_package_version_is_unknown_when_not_installed(monkeypatch):
    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(info_module.metadata, "version", missing)
    assert package_version() == "unknown"


def test_an_older_header_without_histogram_every_had_a_histogram_at_every_sampled_step():
    data = make_info().to_dict()
    del data["histogram_every"]
    assert RunInfo.from_dict(json.loads(json.dumps(data))).histogram_every == 1


def test_an_older_header_without_sibling_groups_has_none():
    data = make_info().to_dict()
    del data["sibling_groups"]
    back = RunInfo.from_dict(json.loads(json.dumps(data)))
    assert back.sibling_groups == {} and back.sibling_rows == ()


def test_sibling_groups_round_trip_through_json_as_tuples():
    original = dataclasses.replace(make_info(), sibling_groups={"encoder": ("0", "1")})
    back = RunInfo.from_dict(json.loads(json.dumps(original.to_dict())))
    assert back == original and back.sibling_groups == {"encoder": ("0", "1")}


def rows_of(info: RunInfo) -> list[tuple[str, tuple[str, ...], list[list[int]]]]:
    return [(g.name, g.members, [r.tolist() for r in g.rows]) for g in info.sibling_rows]


def test_each_member_has_the_rows_under_its_module_name():
    """Layer rows of nested modules, a member's own row, parameter rows; a row under a member
    of an outer group (a block) and of an inner one (an expert in it) belongs to both; a
    member none of whose parameters is watched has no row and is left out."""
    rows = (
        "layers.0.router",
        "layers.0.experts.0.w_in",
        "layers.0.experts.0.w_out",
        "layers.0.experts.1",  # an expert owning its parameters itself
        "layers.0.experts.10.w_in",  # "experts.1" is no prefix of "experts.10" (at a dot)
        "layers.1.router",
        "head",
    )
    info = dataclasses.replace(
        make_info(),
        rows=rows,
        sibling_groups={"layers": ("0", "1"), "layers.0.experts": ("0", "1", "2", "10")},
    )
    assert rows_of(info) == [
        ("layers", ("layers.0", "layers.1"), [[0, 1, 2, 3, 4], [5]]),
        (
            "layers.0.experts",
            ("layers.0.experts.0", "layers.0.experts.1", "layers.0.experts.10"),
            [[1, 2], [3], [4]],
        ),
    ]
    assert all(r.dtype == np.int64 for g in info.sibling_rows for r in g.rows)
    assert info.sibling_rows is info.sibling_rows, "computed once per run"

    by_parameter = dataclasses.replace(info, rows=("experts.0.weight", "experts.0.bias", "experts.1.weight"))
    by_parameter = dataclasses.replace(by_parameter, sibling_groups={"experts": ("0", "1")})
    assert rows_of(by_parameter) == [("experts", ("experts.0", "experts.1"), [[0, 1], [2]])]


def test_a_group_of_the_model_itself_is_named_root():
    info = dataclasses.replace(make_info(), rows=("0", "1", "2"), sibling_groups={"": ("0", "1", "2")})
    assert rows_of(info) == [(ROOT_MODULE, ("0", "1", "2"), [[0], [1], [2]])]
