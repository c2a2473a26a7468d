"""A monitor's capture engines (``gradscope.monitor.engines``): when a CPU capture gets a
worker, and which parameters' gradients it takes as they arrive."""

import threading

import numpy as np
import pytest
import torch
from stats_reference import reference_row
from torch import nn

import gradscope
from gradscope.distributed.topology import Topology
from gradscope.monitor import capture, engines
from gradscope.stats import host_backend


def parameters(*sizes: int) -> tuple[nn.Parameter, ...]:
    return tuple(nn.Parameter(torch.zeros(n)) for n in sizes)


def build(params, mode: str = "backward") -> engines.Engines:
    return engines.Engines(params, "numpy", mode, Topology("single"), lambda key: None)


@pytest.mark.parametrize(("cpus", "threads", "spare"), [(2, 1, True), (2, 2, False), (1, 1, False), (16, 4, True)])
def test_cores_are_spare_when_torch_uses_fewer_threads_than_the_process_may_run_on(monkeypatch, cpus, threads, spare):
    monkeypatch.setattr(host_backend, "default_num_threads", lambda: cpus)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    assert engines.spare_cores() is spare


def test_with_spare_cores_only_large_parameters_are_taken_at_once(monkeypatch):
    monkeypatch.setattr(engines, "spare_cores", lambda: True)
    monkeypatch.setattr(capture, "HAND_OVER_FROM", 100)
    eng = build(parameters(10, 200, 100, 99))
    assert eng.gathers_at_end  # one CPU capture: hooks note arrivals, even with a worker
    assert eng.captures[eng.first].overlap
    assert eng.at_once.tolist() == [False, True, True, False]
    eng.close()


@pytest.mark.parametrize(("spare", "mode"), [(False, "backward"), (True, "step")])
def test_without_a_worker_nothing_is_taken_at_once(monkeypatch, spare, mode):
    monkeypatch.setattr(engines, "spare_cores", lambda: spare)
    monkeypatch.setattr(capture, "HAND_OVER_FROM", 100)
    eng = build(parameters(10, 200, 1000), mode)
    assert not eng.captures[eng.first].overlap
    assert eng.gathers_at_end and not eng.at_once.any()
    eng.close()


def test_small_gradients_never_wake_a_worker_even_with_spare_cores(monkeypatch, one_thread):
    """At one torch thread (``torchrun``'s default) on a model of many small parameters, every
    gradient is measured together when backward ends: no worker thread, and the numbers of
    the reference."""
    monkeypatch.setattr(engines, "spare_cores", lambda: True)
    before = set(threading.enumerate())
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(16, 16) for _ in range(20)))
    assert max(p.numel() for p in model.parameters()) < capture.HAND_OVER_FROM
    with gradscope.watch(model, granularity="parameter") as mon:
        assert mon._engines.captures[mon._engines.first].overlap
        assert not mon._engines.at_once.any()
        for _ in range(2):
            model.zero_grad()
            model(torch.randn(4, 16)).square().mean().backward()
            expected = [reference_row(p.grad) for p in model.parameters()]
            mon.step()
        assert not [t for t in set(threading.enumerate()) - before if t.name == "gradscope-capture"]
        max_abs = mon.history("max_abs").values[-1]
        np.testing.assert_array_equal(max_abs, [e["max_abs"] for e in expected])
        numel = mon.history("numel").values[-1]
        np.testing.assert_array_equal(numel, [e["numel"] for e in expected])
