"""Forward statistics (``watch(model, forward=True)``) in the life of a run: sampling, failures
inside the hooks, closing and dropping the monitor, ``torch.compile``, both modes, the run
log, the Triton engine and DDP."""

from __future__ import annotations

import copy
import gc
import warnings
import weakref

import numpy as np
import pytest
import torch
import torch.distributed as dist
from forward_reference import ROOT, hooks_installed, latest
from multiprocess import run_ranks
from torch import nn

import gradscope
from gradscope.monitor import forward
from gradscope.run.forward_history import FORWARD_FIELDS
from gradscope.stats import layout


class Residual(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.a = nn.Linear(width, width)
        self.b = nn.Linear(width, width)

    def forward(self, x):
        return self.b(self.a(x) + x)


def small() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Sequential(nn.LayerNorm(8), nn.GELU()), Residual(8), nn.Linear(8, 2))


def batch(step: int) -> torch.Tensor:
    return torch.randn(4, 6, generator=torch.Generator().manual_seed(100 + step))


class NoMonitor:
    def step(self, loss=None) -> None:
        pass


def train(model, mon, steps: int, *, device: str = "cpu") -> None:
    """SGD steps on deterministic batches."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(steps):
        loss = model(batch(step).to(device)).square().mean()
        loss.backward()
        mon.step(loss=loss)
        opt.step()
        opt.zero_grad()


def forward_history(mon) -> dict[str, np.ndarray]:
    return {field: mon.history(field).values for field in FORWARD_FIELDS}


def assert_rows_close(a: np.ndarray, b: np.ndarray, rtol: float) -> None:
    """Rows of the same tensors measured two ways: counts, max and histogram exactly, sums
    within ``rtol`` of their magnitude."""
    counts = [layout.NUMEL, layout.MAX_ABS, layout.ZEROS, layout.NANS, layout.INFS]
    exact = [*counts, *range(layout.HIST, layout.ROW_WIDTH)]
    np.testing.assert_array_equal(a[..., exact], b[..., exact])
    for column in (layout.SUM, layout.SUMSQ):
        scale = np.maximum(np.abs(a[..., column]), a[..., layout.SUMSQ] ** 0.5)
        assert (np.abs(a[..., column] - b[..., column]) <= rtol * scale + 1e-30).all(), column


# ---- sampling ------------------------------------------------------------------------------


def test_only_sampled_steps_are_measured_and_other_steps_run_without_hooks():
    model = small()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, every=3, forward=True, backend="numpy") as mon:
        sums = []
        for step in range(7):
            sampled = step % 3 == 0
            assert hooks_installed(model) == sampled, f"step {step} before its forward"
            x = batch(step)
            sums.append(float(x.double().sum()))
            model(x).square().mean().backward()
            assert hooks_installed(model) == sampled, f"step {step} after its backward"
            mon.step()
            opt.step()
            opt.zero_grad()
        assert list(mon.history("forward_sum").steps) == [0, 3, 6] and list(mon._run.forward.steps()) == [0, 3, 6]
        assert list(mon.history("forward_numel").values[:, 0]) == [8, 8, 8], "the root's output, one batch each"
        record = latest(mon)
    assert record.step == 6 and record.inputs[0, layout.NUMEL] == 24
    assert record.inputs[0, layout.SUM] == pytest.approx(sums[6], rel=1e-12)


# ---- robustness -------------------------------------------------------------------------


def test_a_failing_hook_never_reaches_training(monkeypatch):
    model = small()
    reference = copy.deepcopy(model)
    original, hits, mon_steps = forward.find_tensors, [], []

    def broken(*args, **kwargs):
        if len(mon_steps) < 2:  # steps 0 and 1 fail, later steps are measured
            hits.append(len(mon_steps))
            raise RuntimeError("injected forward failure")
        return original(*args, **kwargs)

    monkeypatch.setattr(forward, "find_tensors", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gradscope.watch(model, forward=True, backend="numpy") as mon:
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            for step in range(4):
                loss = model(batch(step)).square().mean()
                loss.backward()
                mon.step(loss=loss)
                mon_steps.append(step)
                opt.step()
                opt.zero_grad()
            assert list(mon._run.forward.steps()) == [2, 3], "failed steps have no forward record"
            np.testing.assert_array_equal(mon.history("failed").values, [True, True, False, False])
            assert np.isfinite(mon.history("loss").values).all()
    assert set(hits) == {0, 1}, "the patched function ran inside the hooks"
    assert mon.errors and all("injected forward failure" in e for e in mon.errors)
    assert {e.split(":")[0] for e in mon.errors} == {"step 0", "step 1"}
    ours = [w for w in caught if str(w.message).startswith("gradscope")]
    assert len(ours) == 1 and "injected forward failure" in str(ours[0].message)
    # Training was not touched: the same steps without gradscope give the same weights.
    train(reference, NoMonitor(), 4)
    for mine, theirs in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("every", [1, 2])
def test_close_removes_every_forward_hook(every):
    model = small()
    mon = gradscope.watch(model, every=every, forward=True, backend="numpy")
    assert hooks_installed(model)
    train(model, mon, 2)
    mon.close()
    assert not hooks_installed(model)
    with pytest.warns(RuntimeWarning, match=r"after close\(\) is ignored"):
        train(model, mon, 1)
    assert not hooks_installed(model)


def test_a_dropped_monitor_leaves_no_forward_hooks():
    model = small()
    mon = gradscope.watch(model, forward=True, backend="numpy")
    train(model, mon, 1)
    assert hooks_installed(model), "step 1 is sampled: hooks are in"
    dropped = weakref.ref(mon)
    del mon
    gc.collect()
    assert dropped() is None
    assert not hooks_installed(model)
    before = next(model.parameters()).detach().clone()
    train(model, NoMonitor(), 2)
    assert not torch.equal(before, next(model.parameters()))
    with gradscope.watch(model, forward=True, backend="numpy") as again:  # and it can be watched again
        train(model, again, 1)
        assert list(again._run.forward.steps()) == [0]


# ---- torch.compile and modes ------------------------------------------------------------


def test_a_compiled_model_gives_the_same_forward_rows_as_eager():
    eager = small()
    compiled = torch.compile(copy.deepcopy(eager), backend="aot_eager")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with (
        gradscope.watch(eager, every=2, forward=True, backend="numpy") as mon_e,
        gradscope.watch(compiled, every=2, forward=True, backend="numpy") as mon_c,
    ):
        assert mon_c.info.modules == mon_e.info.modules
        train(eager, mon_e, 3)
        train(compiled, mon_c, 3)
        assert not hooks_installed(eager) and not hooks_installed(compiled._orig_mod), "step 3 is not sampled"
        eager_rows, compiled_rows = forward_history(mon_e), forward_history(mon_c)
        record_e, record_c = mon_e._run.forward.latest, mon_c._run.forward.latest
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1, "the model did run compiled"
    assert list(mon_c._run.forward.steps()) == [0, 2]
    assert record_c.step == record_e.step == 2
    np.testing.assert_array_equal(record_c.order, record_e.order)
    assert_rows_close(record_c.outputs, record_e.outputs, 1e-6)
    assert_rows_close(record_c.inputs, record_e.inputs, 1e-6)
    np.testing.assert_array_equal(compiled_rows["forward_present"], eager_rows["forward_present"])
    np.testing.assert_allclose(compiled_rows["forward_norm"], eager_rows["forward_norm"], rtol=1e-6)


def test_backward_and_step_modes_give_identical_forward_rows():
    models = {mode: small() for mode in ("backward", "step")}
    records = {}
    for mode, model in models.items():
        with gradscope.watch(model, mode=mode, forward=True, backend="numpy") as mon:
            train(model, mon, 3)
            records[mode] = (forward_history(mon), mon._run.forward.latest)
    (history_b, latest_b), (history_s, latest_s) = records["backward"], records["step"]
    for field in FORWARD_FIELDS:
        np.testing.assert_array_equal(history_b[field], history_s[field], err_msg=field)
    for part in ("outputs", "inputs", "order"):
        np.testing.assert_array_equal(getattr(latest_b, part), getattr(latest_s, part), err_msg=part)
    assert latest_b.step == 2 and (latest_b.order[1] >= 0).all()


# ---- the run log --------------------------------------------------------------------------


class Amplify(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(6, 6)
        self.scale = 1.0

    def forward(self, x):
        return self.inner(x) * self.scale


def test_the_run_log_replays_forward_history_and_findings(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(Amplify(), nn.LayerNorm(6), nn.Linear(6, 2))
    with gradscope.watch(model, forward=True, backend="numpy", log_dir=tmp_path) as mon:
        for step in range(4):
            model[0].scale = 1e39 if step == 2 else 1.0  # float32 overflow at step 2
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=step == 3):
                loss = model(batch(step)).float().square().mean()
            loss.backward()
            mon.step(loss=loss)
            model.zero_grad()
    replayed = gradscope.load_run(tmp_path)
    assert replayed.info.modules == mon.info.modules == (ROOT, "0", "0.inner", "1", "2")
    for field in FORWARD_FIELDS:
        live, again = mon.history(field), replayed.history(field)
        assert list(again.steps) == list(live.steps) == [0, 1, 2, 3], field
        np.testing.assert_array_equal(again.values, live.values, err_msg=field)
    infs = mon.history("forward_infs").values
    assert infs[2, 1] == 24 and not infs[2, 2], "Amplify overflowed, its child did not"
    live_latest, replayed_latest = mon._run.forward.latest, replayed._state.forward.latest
    assert replayed_latest.step == live_latest.step == 3
    assert replayed_latest.autocast == live_latest.autocast == "bfloat16"
    assert replayed_latest.dtypes == live_latest.dtypes and live_latest.dtypes[2] == "bfloat16", "autocast Linear"
    for part in ("outputs", "inputs", "order"):
        np.testing.assert_array_equal(getattr(replayed_latest, part), getattr(live_latest, part), err_msg=part)
    assert replayed._state.forward.events == mon._run.forward.events != []
    live_findings = mon.report().to_dict()["findings"]
    assert replayed.report().to_dict()["findings"] == live_findings
    root = next(f for f in live_findings if f["kind"] == "nonfinite" and f["cause"] is None)
    assert root["evidence"]["pass"] == "forward" and root["evidence"]["module"] == "0"


# ---- the Triton engine --------------------------------------------------------------------


def test_triton_rows_equal_numpy_rows(kernel_device):
    """The kernels (interpreted on the CPU, compiled on a GPU) against the NumPy backend; the
    kernels add float32 values in float32 blocks, hence sums within 1e-5 (as for gradients)."""
    rows = {}
    for backend in ("numpy", "triton"):
        model = small().to(kernel_device)
        with gradscope.watch(model, forward=True, backend=backend) as mon:
            train(model, mon, 2, device=kernel_device)
            rows[backend] = (forward_history(mon), mon._run.forward.latest)
    (history_n, latest_n), (history_t, latest_t) = rows["numpy"], rows["triton"]
    assert latest_t.step == 1 and (latest_t.order[1] >= 0).all()
    np.testing.assert_array_equal(latest_t.order, latest_n.order)
    assert latest_t.dtypes == latest_n.dtypes
    assert_rows_close(latest_t.outputs, latest_n.outputs, 1e-5)
    assert_rows_close(latest_t.inputs, latest_n.inputs, 1e-5)
    for field in ("forward_numel", "forward_max_abs", "forward_present", "forward_order"):
        np.testing.assert_array_equal(history_t[field], history_n[field], err_msg=field)


# ---- DDP -----------------------------------------------------------------------------------


@pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed")
@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_ranks_combine_their_own_batches_and_name_the_rank_of_a_nan(tmp_path, wrapper):
    """DDP and FSDP2: each rank measures its own batch; the rows are combined over the ranks
    (checked in the job against the global batch), so a NaN in rank 1's batch is an event on
    every rank, naming rank 1."""
    import forward_jobs

    first, second = run_ranks(forward_jobs.ddp_forward_job, 2, tmp_path, 1, 1, wrapper)
    assert first["errors"] == second["errors"] == []
    assert first["modules"] == second["modules"] == (ROOT, "0", "1", "2")
    assert first["events"] == second["events"] == [(1, ROOT, "inputs", 1, 1)]
    assert first["nonfinite_rank"] == second["nonfinite_rank"] == [[-1] * 4] * 2, "step 2 was finite"
    root = next(f for f in first["findings"] if f["kind"] == "nonfinite" and f["cause"] is None)
    assert root["evidence"]["pass"] == "forward" and root["evidence"]["module"] == ROOT
    assert root["evidence"]["rank"] == 1 and root["layer"] == ROOT
    assert second["findings"] == first["findings"]
    assert first["hooked_after_close"] == second["hooked_after_close"] == []


@pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed")
def test_a_report_names_the_steps_still_in_flight(tmp_path):
    import forward_jobs

    first, second = run_ranks(forward_jobs.in_flight_job, 2, tmp_path)
    assert 1 in first["in_flight"] and first["forward_steps_early"] == [0]
    assert "statistics of sampled step 1 are still in flight" in first["early"]
    assert "report(wait=True) waits for them" in first["early"]
    for rank in (first, second):
        assert rank["forward_steps_late"] == [0, 1]
        assert rank["late"] is None or "in flight" not in rank["late"]
