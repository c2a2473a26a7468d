"""Thresholds are validated at construction, naming the field."""

import pytest

import gradscope


def test_defaults_are_valid_and_documented():
    t = gradscope.Thresholds()
    doc = gradscope.Thresholds.__doc__
    for name in vars(t):
        assert f"{name}:" in doc, f"Thresholds.{name} is not documented"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("sustain", 0, "sustain must be a positive integer"),
        ("sustain", 2.5, "sustain must be a positive integer"),
        ("explode_rms", -1.0, "explode_rms must be a positive number"),
        ("vanish_rms", "small", "vanish_rms must be a positive number"),
        ("dead_zero_frac", 1.5, "dead_zero_frac is a fraction"),
        ("spike_factor", 1.0, "spike_factor and trend_growth must be greater than 1"),
        ("update_ratio_low", 0.5, "update_ratio_low must be below update_ratio_high"),
        ("trend_window", 2, "at least 3"),
    ],
)
def test_bad_values_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        gradscope.Thresholds(**{field: value})


def test_watch_and_report_check_the_type():
    import torch

    with pytest.raises(TypeError, match=r"thresholds must be a gradscope\.Thresholds"):
        gradscope.watch(torch.nn.Linear(2, 2), thresholds={"sustain": 3})
    with gradscope.watch(torch.nn.Linear(2, 2)) as mon:
        with pytest.raises(TypeError, match=r"thresholds must be a gradscope\.Thresholds"):
            mon.report(thresholds=3)
