"""What each rank runs in the distributed tests (spawned by :mod:`multiprocess`).

Every job trains a real ``torch.nn`` model under a real process group (gloo, CPU) and
checks gradscope against references computed from the same run's gradients; it returns
plain data for the test to compare across ranks.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import torch
from stats_reference import assert_rows_match, reference_layers
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

import gradscope

FIELDS = ("numel", "sum", "sumsq", "max_abs", "zeros", "nans", "infs", "hist", "norm", "present")
ROWS_PER_RANK = 4


class PoisonGrad(torch.autograd.Function):
    """Identity forward; backward puts NaN into unit 4's gradient (a bug inside the model)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        grad[:, 4] = float("nan")
        return grad


class Net(nn.Module):
    """Layers of uneven sizes (5 output rows of 'hidden' shard unevenly over 2 or 4 ranks)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 9)
        self.hidden = nn.Linear(9, 5)
        self.norm = nn.LayerNorm(5)
        self.out = nn.Linear(5, 3)
        self.poison = False

    def forward(self, x):
        h = self.hidden(torch.relu(self.inp(x)))
        if self.poison:
            h = PoisonGrad.apply(h)
        return self.out(self.norm(h))


def batch(step: int, world: int, rank: int | None = None, nan: bool = False):
    """The step's global batch (``ROWS_PER_RANK`` rows per rank), or one rank's slice; ``nan``:
    that slice's first input is NaN (a bad example in one rank's data)."""
    generator = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(world * ROWS_PER_RANK, 6, generator=generator)
    y = torch.randn(world * ROWS_PER_RANK, 3, generator=generator)
    if rank is None:
        return x, y
    part = slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)
    x, y = x[part], y[part]
    if nan:
        x = x.clone()
        x[0, 0] = float("nan")
    return x, y


def _row_of(model: nn.Module) -> dict[str, str]:
    return {name: name.rpartition(".")[0] for name, _ in model.named_parameters()}


def _series(mon) -> dict:
    return {field: mon.history(field) for field in FIELDS}


def _single_process_grads(reference: Net, step: int, world: int) -> dict[str, torch.Tensor]:
    """Gradients of the same model, unsharded, in this one process, on the global batch."""
    reference.zero_grad()
    x, y = batch(step, world)
    nn.functional.mse_loss(reference(x), y).backward()
    return {name: p.grad.clone() for name, p in reference.named_parameters()}


def _assert_close_to_single_process(series: dict, position: int, single: dict[str, dict]) -> None:
    """Norms within 1e-5 relative, counts and histograms exact: the gradients differ from the
    sharded or averaged ones only in the order of floating-point additions (a few ulps,
    which moves no element of these small models across a binade edge). Histograms where the
    step has them (``watch(histogram_every=)``; these finite gradients trigger none)."""
    step = int(series["norm"].steps[position])
    hist_steps = series["hist"].steps.tolist()
    for r, name in enumerate(series["norm"].rows):
        ref = single[name]
        for field in ("numel", "zeros", "nans", "infs"):
            assert series[field].values[position, r] == ref[field], f"{name}: {field}"
        hist = series["hist"].values[hist_steps.index(step), r] if step in hist_steps else None
        assert step != 0 or hist is not None, f"{name}: no histogram at step 0"
        if hist is not None:
            np.testing.assert_array_equal(hist, ref["hist"], err_msg=name)
        assert abs(series["sumsq"].values[position, r] - ref["sumsq"]) <= 1e-5 * ref["sumsq"], f"{name}: sumsq"
        assert abs(series["max_abs"].values[position, r] - ref["max_abs"]) <= 1e-5 * ref["max_abs"], name


def fsdp_job(rank: int, world: int, root, scenarios: tuple, poison_step: int | None, fail: tuple | None) -> dict:
    """FSDP2 ``fully_shard`` on a CPU mesh: gradscope's combined rows equal the statistics of
    the full gradient (all-gathered) exactly, and the unsharded model's within 1e-5.

    ``scenarios``: ``(mode, backend)`` pairs, each a fresh model and monitor.
    ``fail``: ``(rank, step)`` where gradscope itself is made to fail on one rank.
    """
    mesh = init_device_mesh("cpu", (world,))
    out = {}
    for mode, backend in scenarios:
        torch.manual_seed(0)
        model = Net()
        reference = copy.deepcopy(model)
        for layer in (model.inp, model.hidden, model.out):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)  # the LayerNorm stays in the root group
        log_dir = root / f"log-{mode}-{backend}"
        mon = gradscope.watch(model, mode=mode, backend=backend, log_dir=log_dir)
        if fail is not None and rank == fail[0]:
            _break_capture_at(mon, fail[1])
        steps, full_grads = 6, []
        for step in range(steps):
            model.poison = step == poison_step
            x, y = batch(step, world, rank)
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            full_grads.append({name: p.grad.full_tensor() for name, p in model.named_parameters()})
            mon.step(loss=loss)
            model.zero_grad()
        series = _series(mon)
        assert list(series["norm"].steps) == list(range(steps))
        failed = mon.history("failed")
        for step in range(steps):
            if fail is not None and step == fail[1]:
                assert failed.values[step], "the step a rank failed on is marked failed on every rank"
                assert not series["present"].values[step].any(), "and its rows are absent, never partial"
                continue
            assert not failed.values[step]
            assert_rows_match(series, step, reference_layers(full_grads[step], _row_of(model)))
            if step != poison_step:
                single = _single_process_grads(reference, step, world)
                _assert_close_to_single_process(series, step, reference_layers(single, _row_of(model)))
        report = mon.report(wait=True)
        mon.close()
        out[(mode, backend)] = {
            "report": report.to_dict(),
            "norm": series["norm"].values,
            "writes_log": mon._pump is not None,
            "log_dir": str(log_dir),
            "errors": list(mon.errors),
            "topology": mon.topology.to_dict(),
        }
    return out


def _break_capture_at(mon, step: int) -> None:
    """Make gradscope's own capture raise on this rank at ``step`` (a bug in gradscope)."""
    (capture,) = mon._engines.captures.values()
    for method in ("add", "add_all"):
        original = getattr(capture, method)

        def broken(*args, _original=original, **kwargs):
            if mon.step_index == step:
                raise RuntimeError("injected gradscope failure")
            return _original(*args, **kwargs)

        setattr(capture, method, broken)


def ddp_job(rank: int, world: int, root, mode: str, nan_rank: int, nan_step: int) -> dict:
    """DDP: statistics of the averaged gradient (equal to the final ``.grad`` exactly, to the
    single-process gradient within 1e-5), rank 0 logs and warns, the others stay silent, the
    rank whose own batch held a NaN is named, replicas agree under ``check_consistency``."""
    torch.manual_seed(0)
    model = Net()
    reference = copy.deepcopy(model)
    ddp = DDP(model)
    log_dir = root / f"log-{mode}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mon = gradscope.watch(ddp, mode=mode, check_consistency=True, batch_size=ROWS_PER_RANK, log_dir=log_dir)
        steps, grads = 6, []
        for step in range(steps):
            x, y = batch(step, world, rank, nan=rank == nan_rank and step == nan_step)
            loss = nn.functional.mse_loss(ddp(x), y)
            loss.backward()
            grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
            if mode == "backward":  # measured when backward ended: later changes are not seen
                for p in model.parameters():
                    p.grad.mul_(3.0)
            mon.step(loss=loss)
            ddp.zero_grad()
        assert mon.errors == []
        series = _series(mon)
        for step in range(steps):
            assert_rows_match(series, step, reference_layers(grads[step], _row_of(model)))
            if step != nan_step:
                single = _single_process_grads(reference, step, world)
                _assert_close_to_single_process(series, step, reference_layers(single, _row_of(model)))
        report = mon.report(wait=True)
        noise = mon.history("noise_scale")
        mon.close()
        mon.step()  # after close(): a warning, on the logging rank only
    ours = [str(w.message) for w in caught if str(w.message).startswith("gradscope")]
    return {
        "report": report.to_dict(),
        "writes_log": mon._pump is not None,
        "log_dir": str(log_dir),
        "warnings": ours,
        "noise_steps": noise.steps.tolist(),
        "noise": noise.values.tolist(),
    }


def desync_job(rank: int, world: int, root, odd_rank: int | None) -> dict:
    """A parameter DDP is told not to synchronise ('hidden.bias') keeps each rank's own
    gradient: ``check_consistency`` names that layer and the ranks that differ. Every rank
    but ``odd_rank`` sees the same data (so they agree); None: every rank its own data."""
    torch.manual_seed(0)
    model = Net()
    DDP._set_params_and_buffers_to_ignore_for_model(model, ["hidden.bias"])
    ddp = DDP(model)
    mon = gradscope.watch(ddp, check_consistency=True, every=2)
    for step in range(6):
        source = rank if odd_rank is None else (1 if rank == odd_rank else 0)
        x, y = batch(step, world, source)
        nn.functional.mse_loss(ddp(x), y).backward()
        mon.step()
        ddp.zero_grad()
    report = mon.report(wait=True)
    mon.close()
    return {"report": report.to_dict()}


def noise_scale_job(rank: int, world: int, root, dim: int, sigma: float, mean: float, per_rank: int, steps: int):
    """A synthetic problem whose gradient noise is known: loss = mean_i(w . z_i) with
    ``z_i ~ N(mean, sigma^2 I)``, so the per-example gradient is ``z_i`` itself:
    ``|G|^2 = dim * mean^2`` and ``tr(Sigma) = dim * sigma^2``."""
    model = nn.Linear(dim, 1, bias=False)
    ddp = DDP(model)
    mon = gradscope.watch(ddp, batch_size=per_rank, noise_scale_decay=0.95)
    generator = torch.Generator().manual_seed(rank)
    for _ in range(steps):
        z = mean + sigma * torch.randn(per_rank, dim, generator=generator)
        ddp(z).mean().backward()
        mon.step()
        ddp.zero_grad()
    small = mon.history("grad_sq_small").values
    big = mon.history("grad_sq_big").values
    noise = mon.history("noise_scale").values
    report = mon.report(wait=True)
    mon.close()
    return {"small": small, "big": big, "noise": noise, "report": report.to_dict()}


def rank_rows_job(rank: int, world: int, root, steps: list) -> list:
    """Combine hand-made statistics rows with :class:`gradscope.distributed.rank_rows.RankRows`.

    ``steps``: per step ``(rows, first_bad, failed)`` with ``rows[rank]`` float64 ``(N, ROW_WIDTH)``,
    ``first_bad[rank]`` float64 ``(N,)`` and ``failed`` the ranks that pass ``failed=True``.
    Returns per step the decoded ``(rows, first_bad, nonfinite_rank)``, or None."""
    from gradscope.distributed.rank_rows import RankRows

    combiner = RankRows(None, len(steps[0][0][rank]), torch.device("cpu"))
    out = []
    for rows, first_bad, failed in steps:
        wire, works = combiner.issue(
            torch.from_numpy(rows[rank]), torch.from_numpy(first_bad[rank]), failed=rank in failed
        )
        for work in works:
            work.wait()
        combined = combiner.decode(wire.numpy())
        out.append(None if combined is None else (combined.rows, combined.first_bad, combined.nonfinite_rank))
    return out


def fsdp_nan_batch_job(rank: int, world: int, root, nan_rank: int, nan_step: int) -> dict:
    """FSDP2 with a NaN in one rank's batch at ``nan_step``, without and with forward
    statistics: each rank's own loss and gradient go NaN there, and the reduce-scatter
    spreads the NaN into every rank's shard. Returns each scenario's report."""
    mesh = init_device_mesh("cpu", (world,))
    out = {}
    for forward in (False, True):
        torch.manual_seed(0)
        model = Net()
        for layer in (model.inp, model.hidden, model.out):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        mon = gradscope.watch(model, forward=forward)
        for step in range(nan_step + 2):
            x, y = batch(step, world, rank, nan=rank == nan_rank and step == nan_step)
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            mon.step(loss=loss)
            model.zero_grad()
        out[forward] = mon.report(wait=True).to_dict()
        assert mon.errors == []
        mon.close()
    return out


def compression_job(rank: int, world: int, root) -> dict:
    """DDP with ``compression=True``: each rank reads its replica's weights and the averaged
    gradients before every optimizer step (Σ g·w against a float64 reference of its own), so
    every rank reports the same compression section; FSDP2 (sharded) parameters are refused
    at ``watch()``."""
    torch.manual_seed(0)
    model = Net()
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    dots: list[list[float]] = []
    scale: list[float] = []  # Σ |g·w| over everything: what float32 rounding is relative to

    def reference(optimizer, args, kwargs) -> None:
        products = [p.grad.double() * p.detach().double() for p in model.parameters()]
        dots.append([float(product.sum()) for product in products])
        scale.append(sum(float(product.abs().sum()) for product in products))

    opt.register_step_pre_hook(reference)
    mon = gradscope.watch(ddp, optimizer=opt, compression=True)
    for step in range(4):
        x, y = batch(step, world, rank)
        loss = nn.functional.mse_loss(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        mon.step(loss=loss)
        opt.step()
    section = mon.report(wait=True).to_dict()["compression"]
    row_of = _row_of(model)
    names = [name for name, _ in model.named_parameters()]
    expected = {}
    for layer in {row_of[n] for n in names}:
        mine = [i for i, n in enumerate(names) if row_of[n] == layer]
        expected[layer] = sum(abs(sum(d[i] for i in mine)) for d in dots)
    mon.close()
    sharded = Net()
    fully_shard(sharded, mesh=init_device_mesh("cpu", (world,)))
    try:
        gradscope.watch(sharded, optimizer=torch.optim.SGD(sharded.parameters(), lr=0.1), compression=True)
        refused = ""
    except ValueError as error:
        refused = str(error)
    return {"section": section, "expected": expected, "scale": sum(scale), "errors": mon.errors, "refused": refused}
