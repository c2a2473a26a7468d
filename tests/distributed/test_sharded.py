"""Sharded gradients (FSDP2 ``fully_shard``, DTensor) under real multi-process gloo groups."""

from __future__ import annotations

import numpy as np
import pytest
import torch.distributed as dist
from multiprocess import run_ranks

import gradscope
from gradscope.distributed import sharded, topology
from gradscope.stats import layout

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed")


def _same_across_ranks(results: list[dict], key) -> None:
    first = results[0][key]
    for rank, result in enumerate(results[1:], start=1):
        ours, theirs = result[key], first
        assert ours["report"]["findings"] == theirs["report"]["findings"], f"rank {rank} reports otherwise"
        assert ours["report"]["layers"] == theirs["report"]["layers"], f"rank {rank} reports otherwise"
        np.testing.assert_array_equal(ours["norm"], theirs["norm"])  # NaN (absent) in the same places


def test_fsdp2_two_ranks_match_the_full_gradient_in_every_mode(tmp_path):
    """Both modes, NumPy and the Triton kernel (interpreted): rows equal the statistics of the
    all-gathered gradient (counts, max, histograms exactly) and the unsharded model's; a
    NaN put into one output unit of 'hidden' (by every rank's backward) is reported in that
    layer, without a rank: only rank 1's shard holds that unit, but the NaN came from every rank."""
    scenarios = (("backward", "numpy"), ("step", "numpy"), ("backward", "triton"))
    results = run_ranks(distributed_jobs().fsdp_job, 2, tmp_path, scenarios, 4, None)
    for scenario in scenarios:
        _same_across_ranks(results, scenario)
        report = results[0][scenario]["report"]
        nonfinite = next(f for f in report["findings"] if f["kind"] == "nonfinite")
        # 'hidden' has 5 output rows: rank 0 holds rows 0-2, rank 1 rows 3-4 (the NaN is in row 4).
        assert nonfinite["layer"] == "hidden" and nonfinite["step"] == 4
        assert "rank" not in nonfinite["evidence"] and "ranks_affected" not in nonfinite["evidence"]
        assert "on rank" not in nonfinite["message"] and "cannot be known under sharding" in nonfinite["message"]
        assert results[0][scenario]["topology"] == {"kind": "sharded", "world": 2, "rank": 0, "global_rank": 0}
        # Rank 0 logs; rank 1 is silent; the log replays into the same report.
        assert results[0][scenario]["writes_log"] and not results[1][scenario]["writes_log"]
        replayed = gradscope.load_run(results[0][scenario]["log_dir"]).report()
        assert replayed.to_dict()["findings"] == report["findings"]


def test_fsdp2_four_ranks_and_a_rank_that_fails(tmp_path):
    """Four ranks (one of which holds no row of 'hidden' at all); gradscope failing on rank 2
    at step 2 voids that step on every rank, and neither hangs nor stops training."""
    scenarios = (("backward", "numpy"), ("step", "numpy"))
    results = run_ranks(distributed_jobs().fsdp_job, 4, tmp_path, scenarios, 4, (2, 2))
    for scenario in scenarios:
        _same_across_ranks(results, scenario)
        report = results[0][scenario]["report"]
        nonfinite = next(f for f in report["findings"] if f["kind"] == "nonfinite")
        # 5 rows over 4 ranks: 2, 2, 1, 0 rows; row 4 lands on rank 2, which is not where it came from.
        assert nonfinite["layer"] == "hidden" and "rank" not in nonfinite["evidence"]
        assert len(results[2][scenario]["errors"]) == 1 and "injected" in results[2][scenario]["errors"][0]
        assert results[0][scenario]["errors"] == []


def test_wire_buffer_sizes():
    """Each column crosses the wire once, in the collective its declared combine rule names,
    plus one value per step that says whether a rank failed."""
    assert sharded.SUM_WIDTH == len(layout.SUM_COLUMNS)
    assert sharded.MAX_WIDTH == len(layout.MAX_COLUMNS)
    assert sharded.wire_bytes(100) == 8 * (100 * layout.ROW_WIDTH + 1)


def test_without_a_process_group_a_model_is_single():
    import torch

    model = torch.nn.Linear(3, 2)
    topo = topology.topology(model, tuple(model.parameters()), ("weight", "bias"))
    assert topo.kind == "single" and topo.world == 1


def distributed_jobs():
    import distributed_jobs

    return distributed_jobs


def test_fsdp2_never_names_the_rank_a_nan_landed_on(tmp_path):
    """A NaN in rank 1's batch: rank 1's loss and unsharded gradients go NaN, and the
    reduce-scatter puts NaN into every rank's shard, rank 0's included. The shards say where
    the NaN landed, not whose batch it came from: the gradient finding names no rank and says
    why and what would name it; forward statistics (each rank's own activations) name rank 1."""
    results = run_ranks(distributed_jobs().fsdp_nan_batch_job, 2, tmp_path, 1, 2)
    for rank, result in enumerate(results):
        for forward, report in result.items():
            nonfinite = [f for f in report["findings"] if f["kind"] == "nonfinite"]
            assert nonfinite, (rank, forward)
            for finding in nonfinite:
                assert finding["evidence"].get("rank") in (None, 1), (rank, forward, finding)
                assert "rank 0" not in finding["message"], (rank, forward, finding["message"])
            gradient = next(f for f in nonfinite if f["evidence"].get("layers"))
            assert gradient["step"] == 2 and "rank" not in gradient["evidence"]
            if not forward:
                assert "cannot be known under sharding" in gradient["message"]
                assert "watch(..., forward=True)" in gradient["message"]
                continue
            root = nonfinite[0]
            assert root["evidence"]["pass"] == "forward" and root["evidence"]["where"] == "inputs"
            assert root["evidence"]["rank"] == 1 and "(on rank 1)" in root["message"]
            assert gradient["cause"] == {"kind": "nonfinite", "layer": root["layer"], "step": 2}
