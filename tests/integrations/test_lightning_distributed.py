"""GradscopeCallback in a real ``lightning.pytorch.Trainer.fit`` on two gloo ranks (CPU).

Each rank is a process spawned by :func:`multiprocess.run_ranks` (which creates the process
group); the rank's environment says it was launched externally (``LOCAL_RANK``...), so
Lightning launches nothing and, finding a process group, creates none. The jobs are in
:mod:`lightning_jobs`. gradscope's numbers are compared with an independent float64
reference computed here: the same weights (as the module recorded them at each optimizer
step), the global batch (every micro-batch of every rank in the step), the mean loss.

Starting a rank and importing Lightning takes far longer than these fits, so the DDP and the
FSDP2 fit run one after the other in the same two ranks (one spawn, shared by two tests);
the halting run, whose failure would be a hang, has its own.
"""

from __future__ import annotations

import math
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from multiprocess import run_ranks
from stats_reference import reference_layers
from torch import nn

import gradscope

pytest.importorskip("lightning.pytorch")

import lightning_jobs  # after the skip: it imports Lightning

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed")

WORLD = 2
DEADLINE_S = 150
"""Seconds a spawn may take (about 30 s on two busy cores, most of it importing Lightning)."""
DDP = {"steps": 3, "accumulate": 2, "clip": 0.05}
FSDP = {"steps": 3}
LAYERS = {"net.inp": 6 * 9 + 9, "net.hidden": 9 * 5 + 5, "net.norm": 5 + 5, "net.out": 5 * 3 + 3}
"""Each row of gradscope and its full (unsharded) number of gradient elements."""
RTOL_FLOAT64 = 1e-5
"""float32 training gradients against the float64 reference: a few float32 roundings apart."""
RTOL_SAME = 1e-6
"""gradscope against the very gradients it read (float32, summed by gradscope in float64)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> list[dict]:
    root = tmp_path_factory.mktemp("lightning-measure")
    ddp = (DDP["steps"], DDP["accumulate"], DDP["clip"])
    return run_ranks(lightning_jobs.measure_job, WORLD, root, free_port(), ddp, (FSDP["steps"],), deadline=DEADLINE_S)


# ---- the reference ---------------------------------------------------------------------


def global_batch(records: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every micro-batch of every rank in one optimizer step, in float64."""
    batches = [batch for record in records for batch in record["batches"]]
    assert len({len(x) for x, _ in batches}) == 1, "equal micro-batches: the mean of means is the global mean"
    return torch.cat([x for x, _ in batches]).double(), torch.cat([y for _, y in batches]).double()


def float64_reference(records: list[dict]) -> dict[str, dict]:
    """Per-row statistics of the float64 gradient of the unsharded model, with the weights the
    optimizer step started from, of the mean loss over the global batch."""
    body = lightning_jobs.Body().double()
    weights = records[0]["weights"]
    with torch.no_grad():
        for name, param in body.named_parameters():
            param.copy_(weights[f"net.{name}"].double())
    x, y = global_batch(records)
    nn.functional.mse_loss(body(x), y).backward()
    grads = {f"net.{name}": param.grad for name, param in body.named_parameters()}
    return reference_layers(grads, {name: name.rpartition(".")[0] for name in grads})


def stats_of(grads: dict[str, torch.Tensor]) -> dict[str, dict]:
    return reference_layers(grads, {name: name.rpartition(".")[0] for name in grads})


def assert_rows(result: dict, position: int, expected: dict[str, dict], rtol: float) -> None:
    """gradscope's row values at one step against reference statistics: counts exactly,
    norm and largest magnitude within ``rtol``."""
    series = result["series"]
    assert result["rows"] == list(LAYERS)
    for r, name in enumerate(result["rows"]):
        ref = expected[name]
        where = f"step {position}, {name}"
        assert series["present"][position, r], where
        assert series["numel"][position, r] == ref["numel"] == LAYERS[name], where
        assert series["zeros"][position, r] == ref["zeros"], where
        assert series["nans"][position, r] == ref["nans"] == 0, where
        norm, ref_norm = series["norm"][position, r], math.sqrt(ref["sumsq"])
        assert abs(norm - ref_norm) <= rtol * ref_norm, f"{where}: norm {norm!r} vs {ref_norm!r}"
        assert abs(series["max_abs"][position, r] - ref["max_abs"]) <= rtol * ref["max_abs"], where
    # The dead unit of 'inp' gives exact zeros (its weights' row, its bias, a column of 'hidden').
    assert expected["net.inp"]["zeros"] >= 6 + 1 and expected["net.hidden"]["zeros"] >= 5


def assert_same_on_both_ranks(results: list[dict]) -> None:
    first = results[0]
    for rank, result in enumerate(results[1:], start=1):
        assert result["rows"] == first["rows"] and result["steps"] == first["steps"], f"rank {rank}"
        for field, values in first["series"].items():
            np.testing.assert_array_equal(result["series"][field], values, err_msg=f"rank {rank}: {field}")


# ---- the tests -------------------------------------------------------------------------


def test_ddp_measures_the_averaged_gradient_before_clipping(measured):
    """DDPStrategy, each rank its own shard of the data, 2 micro-batches per step, clipping:
    every rank reports the float64 reference of the gradient of the mean loss over both
    ranks' micro-batches, before clipping, at every optimizer step, numbered as Lightning's."""
    results = [by_rank["ddp"] for by_rank in measured]
    steps = DDP["steps"]
    for rank, result in enumerate(results):
        assert result["errors"] == []
        assert result["topology"] == {"kind": "replicated", "world": WORLD, "rank": rank, "global_rank": rank}
        assert result["step_index"] == result["global_step"] == steps
        assert result["steps"] == list(range(steps))
        assert [record["global_step"] for record in result["recorded"]] == list(range(steps))
    assert_same_on_both_ranks(results)

    # Lightning's DistributedSampler: each rank a different shard, together the whole data set once.
    seen = [torch.cat([x for record in result["recorded"] for x, _ in record["batches"]]) for result in results]
    assert all(len(record["batches"]) == DDP["accumulate"] for result in results for record in result["recorded"])
    data = lightning_jobs.dataset(steps * DDP["accumulate"] * WORLD * lightning_jobs.PER_RANK).tensors[0]
    together = torch.cat(seen)
    assert len(together) == len(data)
    assert torch.equal(together[together[:, 0].argsort()], data[data[:, 0].argsort()])
    assert not set(map(tuple, seen[0].tolist())) & set(map(tuple, seen[1].tolist()))

    for step in range(steps):
        records = [result["recorded"][step] for result in results]
        for name, grad in records[0]["grads"].items():  # averaged: the same on every rank
            assert torch.equal(records[1]["grads"][name], grad), name
            assert torch.equal(records[1]["weights"][name], records[0]["weights"][name]), name
        reference = float64_reference(records)
        for result in results:
            assert_rows(result, step, stats_of(records[0]["grads"]), RTOL_SAME)
            assert_rows(result, step, reference, RTOL_FLOAT64)
        # Before clipping: the whole-model norm gradscope saw is the reference's, well above
        # the clipping threshold that the optimizer's gradients were then clipped to.
        total = math.sqrt(sum(np.square(results[0]["series"]["norm"][step])))
        ref_total = math.sqrt(sum(row["sumsq"] for row in reference.values()))
        assert abs(total - ref_total) <= RTOL_FLOAT64 * ref_total
        assert total > 5 * DDP["clip"]
        assert records[0]["clipped_norm"] == pytest.approx(DDP["clip"], rel=1e-4)

    # The run log is rank 0's alone (the only run directory), and replays into the same history.
    assert results[0]["writes_log"] and not results[1]["writes_log"]
    run_dir = Path(results[0]["run_dir"])
    assert [path.name for path in run_dir.parent.iterdir()] == [run_dir.name]
    logged = gradscope.load_run(results[0]["run_dir"]).history("norm")
    np.testing.assert_array_equal(logged.values, results[0]["series"]["norm"])


def test_fsdp2_model_parallel_strategy_measures_the_full_gradient(measured):
    """ModelParallelStrategy with FSDP2 ``fully_shard`` over a CPU 'data_parallel' mesh: the
    rows are whole layers (numel of the unsharded layer) and equal the float64 reference of
    the unsharded model on both ranks' batches."""
    results = [by_rank["fsdp"] for by_rank in measured]
    steps = FSDP["steps"]
    for rank, result in enumerate(results):
        assert result["errors"] == []
        assert result["sharded_params"] == result["param_names"], "every parameter a DTensor"
        assert result["topology"] == {"kind": "sharded", "world": WORLD, "rank": rank, "global_rank": rank}
        assert result["step_index"] == result["global_step"] == steps
        assert result["steps"] == list(range(steps))
    assert_same_on_both_ranks(results)
    for step in range(steps):
        records = [result["recorded"][step] for result in results]
        x0, x1 = (torch.cat([x for x, _ in record["batches"]]) for record in records)
        assert not torch.equal(x0, x1), "each rank its own shard of the data"
        reference = float64_reference(records)
        for result in results:
            assert_rows(result, step, stats_of(records[0]["grads"]), RTOL_SAME)
            assert_rows(result, step, reference, RTOL_FLOAT64)


def test_ddp_halt_on_nonfinite_stops_both_ranks_at_the_same_step(tmp_path):
    """A NaN in rank 1's batch at step 2 (NaN everywhere once DDP averages it): gradscope's
    consensus halts both ranks at the same ``mon.step``, so both leave ``fit`` with
    ``TrainingHalted`` at the same step, before its optimizer step; a rank left behind would
    wait in DDP's next all-reduce until the deadline."""
    max_steps, nan_step = 8, 2
    results = run_ranks(
        lightning_jobs.halt_job, WORLD, tmp_path, free_port(), max_steps, (1, nan_step), deadline=DEADLINE_S
    )
    stopped = {result["global_step"] for result in results}
    assert len(stopped) == 1, f"ranks stopped at different steps: {[r['global_step'] for r in results]}"
    (global_step,) = stopped
    # The halt is decided from statistics that reach the host after the step and is applied
    # by every rank one step after the decision: a step or two after the NaN (whose update
    # has then been applied: in DDP, halting keeps only the later updates out).
    assert nan_step < global_step < max_steps
    assert_same_on_both_ranks(results)
    for result in results:
        assert result["errors"] == []
        assert result["halted_at"] == global_step  # raised before the halting step's update
        assert result["step_index"] == global_step + 1  # the halting step was measured
        reason = result["stop_reason"]
        assert reason is not None and "halted" in reason and "nonfinite" in reason, reason
        assert f"since step {nan_step}" in reason and "on rank 1" in reason, reason
        nans = result["series"]["nans"]
        assert (nans[:nan_step] == 0).all() and (nans[nan_step] > 0).all()
