"""Step clock, memory, energy and model summary."""

import math
import time

import pytest
import torch

from gradscope.monitor.resources import EnergyMeter, StepClock, as_scalar, model_summary, peak_memory


def test_cpu_clock_records_values_time_and_memory():
    clock = StepClock(torch.device("cpu"))
    time.sleep(0.01)
    clock.tick(0, {"loss": torch.tensor(2.5), "lr": 0.1})
    clock.tick(1, {})
    first, second = clock.completed()
    assert first.step == 0 and first.values == {"loss": 2.5, "lr": 0.1}
    assert first.step_time >= 0.01
    assert second.values == {} and second.step_time >= 0
    assert first.peak_memory > 1e6
    assert math.isnan(first.energy)  # no NVML on CPU
    assert clock.completed() == []


def test_scalars_are_checked():
    assert as_scalar(3, "loss") == 3.0
    assert as_scalar(torch.ones(1, 1), "loss").shape == ()
    with pytest.raises(ValueError, match="loss must be a scalar"):
        as_scalar(torch.ones(2), "loss")
    with pytest.raises(TypeError, match="acc must be a number"):
        as_scalar("high", "acc")


def test_model_summary_counts_tied_parameters_once():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    model[1].weight = model[0].weight
    model[1].bias.requires_grad_(False)
    summary = model_summary(model, rows=2)
    assert summary == {"parameters": 24, "trainable": 20, "bytes": 96, "layers": 2}


def test_energy_meter_is_unavailable_without_a_gpu():
    meter = EnergyMeter(torch.device("cpu"))
    assert not meter.available and math.isnan(meter.joules())
    assert peak_memory(torch.device("cpu")) > 0
