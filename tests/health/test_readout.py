"""``RunReadout.latest``: the newest sampled step that has reached the host, live or read back."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import gradscope
from gradscope.stats import layout


def test_latest_is_the_newest_sampled_step_with_its_rows(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, every=3, log_dir=tmp_path / "run", backend="numpy") as mon:
        assert mon.latest() is None  # nothing sampled yet
        for step in range(8):
            loss = model(torch.randn(5, 4)).square().mean()
            loss.backward()
            grads = [p.grad.detach().double().clone() for p in model.parameters()]
            mon.step(loss=loss)
            opt.step()
            opt.zero_grad()
            if step % 3 == 0:
                sampled_grads = grads
        step, rows, present = mon.latest()
        assert step == 6  # steps 0, 3, 6 are sampled; 7 is not
        assert present.tolist() == [True, True]
        assert rows.shape == (2, layout.ROW_WIDTH)
        first_layer_sumsq = float((sampled_grads[0] ** 2).sum() + (sampled_grads[1] ** 2).sum())
        assert np.isclose(rows[0, layout.SUMSQ], first_layer_sumsq, rtol=1e-6)
        assert rows[0, layout.NUMEL] == 4 * 8 + 8
        # step 6 is a light step (the default cadence gives step 0 a histogram): no histogram
        assert not layout.histogram_known(rows).any() and np.isnan(rows[:, layout.HIST :]).all()
        assert layout.histogram_known(mon.stats(0).to_rows()).all()
        stats = mon.stats(6)
        np.testing.assert_array_equal(rows[:, layout.SUMSQ], stats.sumsq)
    run = gradscope.load_run(tmp_path / "run")
    again = run.latest()
    assert again[0] == 6
    np.testing.assert_array_equal(again[1], rows)
    np.testing.assert_array_equal(again[2], present)
