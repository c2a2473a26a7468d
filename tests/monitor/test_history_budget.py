"""``watch(history_mib=...)`` on a real model: the monitor's history sized by its memory budget,
the one warning when it keeps less than asked (none for a small model), and a run log read back
into the same thinned history."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import gradscope
from gradscope.stats.reporting import GradscopeWarning


def deep_model(layers: int = 50) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(2, 2) for _ in range(layers)])


def train(mon, model, steps: int) -> None:
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        loss = model(torch.randn(4, 2, generator=generator)).square().mean()
        loss.backward()
        mon.step(loss=loss)
        model.zero_grad()


def test_a_small_model_keeps_its_whole_history_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with gradscope.watch(deep_model(3), backend="numpy") as mon:
            assert not mon._run.plan.shortened and mon._run.plan.capacity == 10_000


def test_a_history_over_its_budget_warns_once_naming_the_numbers():
    model = deep_model()
    with pytest.warns(GradscopeWarning) as caught:
        mon = gradscope.watch(model, history_mib=1, backend="numpy")
    assert len(caught) == 1
    message = str(caught[0].message)
    plan = mon._run.plan
    assert f"history_mib=1 keeps {plan.capacity} sampled-step slots for the history=10000" in message
    assert "50 rows take 3058 bytes per sampled step and 13258 per step with histograms" in message
    assert "watch(..., history_mib=43) or more" in message
    assert plan.nbytes <= 2**20 == mon.info.history_mib * 2**20
    with mon:
        train(mon, model, 3)  # no second warning (gradscope's warnings are errors in the tests)


def test_the_run_log_reads_back_into_the_same_thinned_history(tmp_path):
    model = deep_model()
    with pytest.warns(GradscopeWarning, match=r"watch\(\.\.\., history_mib="):
        mon = gradscope.watch(model, history_mib=1, backend="numpy", log_dir=tmp_path)
    with mon:
        train(mon, model, 300)
    plan, kept = mon._run.plan, mon.history("norm").steps.tolist()
    older = [k for k in range(300 - plan.dense + 1) if k % plan.stride == 0][-(plan.capacity - plan.dense) :]
    assert kept == older + list(range(300 - plan.dense, 300))
    assert len(older) >= 2  # thinned steps are kept, not only the newest
    with pytest.warns(GradscopeWarning, match=r"load_run\(\.\.\., history_mib="):
        run = gradscope.load_run(tmp_path)
    for name in ("norm", "hist", "backward_order", "loss"):
        ours, theirs = run.history(name), mon.history(name)
        np.testing.assert_array_equal(ours.steps, theirs.steps, err_msg=name)
        np.testing.assert_array_equal(ours.values, theirs.values, err_msg=name)
    assert run.report().to_dict() == mon.report().to_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not gradscope.load_run(tmp_path, history_mib=64)._state.plan.shortened


@pytest.mark.parametrize("value", [0, 1.5, True, "64"])
def test_load_run_checks_history_mib(tmp_path, value):
    with pytest.raises(ValueError, match="load_run: history_mib must be None or a positive integer"):
        gradscope.load_run(tmp_path, history_mib=value)
