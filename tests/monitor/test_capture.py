"""Capture engines directly: buffer reuse, failures, sparse gradients, the CPU worker."""

import threading

import numpy as np
import pytest
import torch
from stats_reference import reference_row

from gradscope.monitor import capture
from gradscope.stats import host_backend, layout


def test_host_worker_failure_is_reported_not_raised(monkeypatch):
    monkeypatch.setattr(capture, "HAND_OVER_FROM", 1)  # every gradient goes to the worker
    cap = capture.HostCapture(2, "numpy", overlap=True)
    threads = []

    def broken(*args, **kwargs):
        threads.append(threading.current_thread().name)
        raise RuntimeError("boom")

    monkeypatch.setattr(host_backend, "host_rows", broken)
    cap.start(None)
    cap.add(0, torch.ones(3))
    cap.end_backward()  # returns: the worker does not die or hang
    assert threads == ["gradscope-capture"]
    assert isinstance(cap.error, RuntimeError)
    cap.close()


def measured_on(cap: capture.HostCapture) -> list:
    """Records each measurement the capture makes: (thread name, the rows it measures)."""
    calls = []
    compute = cap._compute

    def spy(indices, grads, num_threads):
        calls.append((threading.current_thread().name, sorted(indices)))
        compute(indices, grads, num_threads)

    cap._compute = spy
    return calls


@pytest.mark.parametrize("kernel", ["numpy", "numba"])
@pytest.mark.parametrize("histogram", [True, False])
def test_host_worker_takes_large_gradients_and_small_ones_wait_for_the_end(monkeypatch, kernel, histogram):
    """With a worker, gradients of HAND_OVER_FROM elements or more are measured on it as they
    are handed over; smaller ones on the calling thread when backward ends. The rows are those
    of a capture without a worker, bit for bit (light rows too, whose histograms trigger)."""
    if kernel == "numba":
        pytest.importorskip("numba", reason="numba is not installed")
    monkeypatch.setattr(capture, "HAND_OVER_FROM", 100)
    torch.manual_seed(0)
    # large: 1 (a NaN) and 3 (tiny values) trigger their histograms in light rows, 5 does not
    grads = [torch.randn(n) for n in (40, 100, 99, 300, 7, 200)]
    grads[1][33] = float("nan")
    grads[3] *= 1e-30
    me = threading.current_thread().name
    rows = {}
    for overlap in (True, False):
        cap = capture.HostCapture(len(grads), kernel, overlap=overlap)
        assert [cap.takes_at_once(g.numel()) for g in grads] == [False, overlap, False, overlap, False, overlap]
        calls = measured_on(cap)
        cap.start(None, histogram=histogram)
        for index, grad in enumerate(grads):
            cap.add(index, grad)
        if overlap:
            cap._tasks.join()  # the worker has measured what it was handed, before the end
            assert {name for name, _ in calls} == {"gradscope-capture"}
            assert sorted(i for _, indices in calls for i in indices) == [1, 3, 5]
        else:
            assert calls == []
        before = len(calls)
        cap.finish(step=0)
        assert calls[before:] == [(me, [0, 2, 4] if overlap else [0, 1, 2, 3, 4, 5])]
        ((_, rows[overlap]),) = cap.completed()
        assert cap.error is None
        cap.close()
    np.testing.assert_array_equal(rows[True], rows[False])
    assert np.isnan(rows[True][5, layout.HIST :]).all() is not histogram  # light rows: no histogram
    for index, grad in enumerate(grads):
        expected = reference_row(grad)
        assert rows[True][index, layout.NUMEL] == expected["numel"]
        assert rows[True][index, layout.MAX_ABS] == expected["max_abs"]
    assert rows[True][1, layout.NANS] == 1


def test_host_worker_measures_what_queued_up_in_one_call(monkeypatch):
    """Gradients handed over while the worker is busy are measured together, in one call."""
    monkeypatch.setattr(capture, "HAND_OVER_FROM", 1)
    started, release = threading.Event(), threading.Event()
    calls = []
    host_rows = host_backend.host_rows

    def slow_first(tensors, *args, **kwargs):
        calls.append(len(tensors))
        if len(calls) == 1:
            started.set()
            assert release.wait(10)
        return host_rows(tensors, *args, **kwargs)

    monkeypatch.setattr(host_backend, "host_rows", slow_first)
    grads = [torch.full((5,), float(i + 1)) for i in range(6)]
    cap = capture.HostCapture(len(grads), "numpy", overlap=True)
    try:
        cap.start(None)
        cap.add(0, grads[0])
        assert started.wait(10)  # the worker is measuring the first gradient
        for index in range(1, len(grads)):
            cap.add(index, grads[index])
        release.set()
        cap.finish(step=0)
        assert calls == [1, 5]
        ((_, rows),) = cap.completed()
        assert rows[:, layout.MAX_ABS].tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    finally:
        release.set()
        cap.close()


@pytest.mark.parametrize("overlap", [True, False])
def test_host_capture_counts_unstored_zeros_of_sparse_gradients(overlap):
    grad = torch.sparse_coo_tensor([[0, 4, 4]], [1.0, 2.0, -5.0], (10,), check_invariants=True)
    cap = capture.HostCapture(1, "numpy", overlap=overlap)
    cap.start(None)
    cap.add(0, grad)
    cap.finish(step=0)
    ((step, rows),) = cap.completed()
    ref = reference_row(grad)
    assert step == 0
    assert rows[0, layout.NUMEL] == 10 and rows[0, layout.ZEROS] == ref["zeros"] == 8
    np.testing.assert_array_equal(rows[0, layout.HIST :], ref["hist"])
    cap.close()


def test_kernel_capture_reuses_buffers_and_keeps_step_order(kernel_device, monkeypatch):
    monkeypatch.setattr(capture, "MAX_SLOTS", 2)
    cap = capture.KernelCapture(torch.device(kernel_device), 1)
    grads = [torch.full((100,), float(step + 1), device=kernel_device) for step in range(5)]
    for step, grad in enumerate(grads):
        cap.start(None)
        cap.add(0, grad)
        cap.finish(step)
    done = cap.completed(block=True)
    assert [step for step, _ in done] == [0, 1, 2, 3, 4]
    assert [rows[0, layout.MAX_ABS] for _, rows in done] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert cap._slots <= 2
    cap.close()


def test_kernel_capture_counts_unstored_zeros_of_sparse_gradients(kernel_device):
    grad = torch.sparse_coo_tensor([[1, 7]], [3.0, 0.0], (20,), check_invariants=True).to(kernel_device)
    cap = capture.KernelCapture(torch.device(kernel_device), 1)
    cap.start(None)
    cap.add(0, grad)
    cap.finish(0)
    ((_, rows),) = cap.completed(block=True)
    assert rows[0, layout.NUMEL] == 20 and rows[0, layout.ZEROS] == 19
    cap.close()
