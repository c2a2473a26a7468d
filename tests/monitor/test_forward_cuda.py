"""Forward statistics on a CUDA device: the numbers, and no host synchronisation.

These run only where CUDA is available (the GPU check, ``make gpu-check``); on CPU the same
code paths are covered by ``test_forward.py`` with the NumPy backend and, for the kernels,
Triton's interpreter. Nothing here claims more than that.
"""

import numpy as np
import pytest
import torch
from stats_reference import reference_row
from torch import nn

import gradscope
from gradscope.stats import layout

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.LayerNorm(64), nn.Linear(64, 8)).cuda()


@pytest.mark.parametrize("mode", ["backward", "step"])
def test_forward_statistics_on_cuda_do_not_synchronise_and_match_the_reference(mode):
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(16, 32, device="cuda")
    captured = {}
    names = {module: name or "(root)" for name, module in model.named_modules()}
    for module in model.modules():
        module.register_forward_hook(lambda m, a, out: captured.__setitem__(names[m], out.detach().clone()))
    with gradscope.watch(model, mode=mode, forward=True) as mon:
        for _ in range(2):  # compile kernels, allocate buffers
            model(x).square().mean().backward()
            mon.step()
            opt.step()
            opt.zero_grad()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            loss = model(x).square().mean()
            loss.backward()
            mon.step(loss=loss)
            opt.step()
            opt.zero_grad()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        mon.report(wait=True)
        record = mon._run.forward.latest
    assert record.step == 2
    for m, name in enumerate(mon.info.modules):
        expected = reference_row(captured[name])
        got = record.outputs[m]
        for column in ("numel", "zeros", "nans", "infs", "max_abs"):
            assert got[layout.SCALAR_FIELDS.index(column)] == expected[column], (name, column)
        np.testing.assert_array_equal(got[layout.HIST :], expected["hist"])
        np.testing.assert_allclose(got[layout.SUMSQ], expected["sumsq"], rtol=1e-6)


def test_forward_statistics_record_the_autocast_dtype_and_bfloat16_outputs():
    model = _net()
    x = torch.randn(16, 32, device="cuda")
    with gradscope.watch(model, forward=True) as mon:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x).float().square().mean()
        loss.backward()
        mon.step(loss=loss)
        mon.report(wait=True)
        record = mon._run.forward.latest
    assert record.autocast == "bfloat16"
    assert record.dtypes[mon.info.modules.index("0")] == "bfloat16"  # Linear under autocast
