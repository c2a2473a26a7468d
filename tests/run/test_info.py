"""``RunInfo`` round trips through a dict and JSON (tuples restored), and ``package_version``."""

import json
from importlib import metadata

import pytest

from gradscope.run import info as info_module
from gradscope.run.info import DISTRIBUTION, RunInfo, package_version


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
        "history_mib": 512,
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
