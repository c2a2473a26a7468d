"""Exporters fed by a monitor whose model trains on a CUDA device (the GPU check runs these).

The exporters receive host records, but on CUDA those records reach the host late (each
sampled step's rows and each step's values land when their CUDA events complete) and the
energy readings come from a worker thread: this checks that everything arrives, once, in
step order, equal to what the monitor holds.
"""

import math

import numpy as np
import pytest
import torch

import gradscope
from gradscope.monitor.resources import EnergyMeter

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
pytest.importorskip("tensorboard", reason="needs the tensorboard extra")
from models import TinyTransformer  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from gradscope.outputs.exporters import TensorBoardExporter  # noqa: E402


def test_tensorboard_export_of_a_cuda_run_equals_the_monitor(tmp_path):
    torch.manual_seed(0)
    model = TinyTransformer().cuda()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(3)
    with gradscope.watch(
        model, every=2, exporters=[TensorBoardExporter(tmp_path, histogram_every=2, budget=None)]
    ) as mon:
        for _ in range(7):
            x, y = torch.randn(8, 5, 32, generator=g).cuda(), torch.randint(0, 4, (8,), generator=g).cuda()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            mon.step(loss=loss)
            opt.step()
            opt.zero_grad()
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == list(range(7))
    np.testing.assert_allclose([e.value for e in events.Scalars("loss")], mon.history("loss").values, rtol=1e-6)
    norm = mon.history("norm")
    assert list(norm.steps) == [0, 2, 4, 6]
    for r, row in enumerate(mon.rows):
        written = {e.step: e.value for e in events.Scalars(f"grad_norm/{row}")}
        expected = {int(s): v for s, v in zip(norm.steps, norm.values[:, r], strict=True) if np.isfinite(v)}
        assert written.keys() == expected.keys()
        for step, value in written.items():
            assert value == pytest.approx(expected[step], rel=1e-6)
    assert all(e.value > 0 for e in events.Scalars("step_time"))
    energy = mon.history("energy").values
    if EnergyMeter(torch.device("cuda")).available:  # NVML readable: every step has its energy
        assert len(energy) == 7 and all(math.isfinite(v) and v >= 0 for v in energy)
