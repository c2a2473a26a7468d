"""Capture engines directly: buffer reuse, failures, sparse gradients."""

import numpy as np
import pytest
import torch
from stats_reference import reference_row

from gradscope.monitor import capture
from gradscope.stats import host_backend, layout


def test_host_worker_failure_is_reported_not_raised(monkeypatch):
    cap = capture.HostCapture(2, "numpy", overlap=True)

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(host_backend, "host_rows", broken)
    cap.start(None)
    cap.add(0, torch.ones(3))
    cap.end_backward()  # returns: the worker does not die or hang
    assert isinstance(cap.error, RuntimeError)
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
