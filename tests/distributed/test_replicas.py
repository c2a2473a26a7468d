"""DDP (replicated gradients) under real multi-process gloo groups: statistics of the averaged
gradient, the logging rank, the rank a NaN came from, and replicas that disagree."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
from multiprocess import run_ranks

import gradscope
from gradscope.distributed import replicas

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed")


def _jobs():
    import distributed_jobs

    return distributed_jobs


@pytest.mark.parametrize("mode", ["backward", "step"])
def test_ddp_two_ranks(tmp_path, mode):
    results = run_ranks(_jobs().ddp_job, 2, tmp_path, mode, 1, 4)
    first, second = results

    # Gradient findings and layers are the same on every rank; the loss is each rank's own
    # (rank 1's was NaN at step 4, rank 0's was not), and so is what it proves: on rank 1 the
    # NaN loss is the root (born in its forward pass) and the NaN gradients its consequence;
    # rank 0's finite loss says nothing about rank 1's forward pass, so the pass is unknown there.
    def same_problem(f):
        return {k: v for k, v in f.items() if k not in ("message", "cause", "suggestion", "evidence")} | {
            "evidence": {k: v for k, v in f["evidence"].items() if k != "pass"}
        }

    gradient_findings = [[f for f in r["report"]["findings"] if f["layer"] is not None] for r in results]
    assert [same_problem(f) for f in gradient_findings[0]] == [same_problem(f) for f in gradient_findings[1]] != []
    assert gradient_findings[0][0]["evidence"]["pass"] == "unknown" and gradient_findings[0][0]["cause"] is None
    assert "each rank sees only its own loss" in gradient_findings[0][0]["message"]
    assert gradient_findings[1][0]["cause"] == {"kind": "nonfinite", "layer": None, "step": 4}
    assert first["report"]["layers"] == second["report"]["layers"]
    loss_findings = [[f for f in r["report"]["findings"] if f["layer"] is None] for r in results]
    assert loss_findings[0] == [] and len(loss_findings[1]) == 1
    assert loss_findings[1][0]["message"].startswith("the loss is nan at step 4: the NaN/Inf was born in the forward")
    kinds = [f["kind"] for f in first["report"]["findings"]]
    assert "rank_desync" not in kinds, "replicas of a correct DDP run agree"
    nonfinite = next(f for f in first["report"]["findings"] if f["kind"] == "nonfinite" and f["layer"])
    assert nonfinite["step"] == 4
    assert nonfinite["evidence"]["rank"] == 1 and nonfinite["evidence"]["ranks_affected"] == 1
    # Rank 0 logs and warns; rank 1 is silent.
    assert first["writes_log"] and not second["writes_log"]
    assert any("after close()" in w for w in first["warnings"])
    assert second["warnings"] == []
    replayed = gradscope.load_run(first["log_dir"]).report()
    assert replayed.to_dict()["findings"] == first["report"]["findings"]
    # The noise scale is recorded at every sampled step (NaN-free until the NaN step).
    assert first["noise_steps"] == list(range(6))
    assert all(np.isfinite(first["noise"][:4]))


def test_replicas_that_disagree_are_named(tmp_path):
    """Two ranks whose 'hidden.bias' is not synchronised: no majority, both are named."""
    (first, second) = run_ranks(_jobs().desync_job, 2, tmp_path, None)
    desync = [f for f in first["report"]["findings"] if f["kind"] == "rank_desync"]
    assert len(desync) == 1 and desync[0]["severity"] == "critical"
    assert desync[0]["layers"] == ["hidden"] and desync[0]["evidence"]["ranks"] == [0, 1]
    assert desync[0]["since_step"] == 0 and desync[0]["evidence"]["sampled_steps_affected"] == 3
    assert second["report"]["findings"] == first["report"]["findings"]


def test_the_odd_rank_out_of_four_is_named(tmp_path):
    results = run_ranks(_jobs().desync_job, 4, tmp_path, 2)
    desync = next(f for f in results[0]["report"]["findings"] if f["kind"] == "rank_desync")
    assert desync["evidence"]["ranks"] == [2] and desync["layers"] == ["hidden"]
    assert "with the majority" in desync["message"]


def test_hashes_are_equal_for_equal_rows_and_differ_for_a_one_ulp_change():
    rows = torch.randn(50, gradscope.layout.ROW_WIDTH, dtype=torch.float64)
    same = replicas.row_hashes(rows.clone())
    assert torch.equal(same, replicas.row_hashes(rows))
    assert int(same.min()) >= 0 and int(same.max()) < 2**replicas.HASH_BITS
    changed = rows.clone()
    changed[:, gradscope.layout.SUMSQ] = torch.nextafter(changed[:, gradscope.layout.SUMSQ], torch.tensor(np.inf))
    differ = replicas.row_hashes(changed) != same
    assert int(differ.sum()) >= 49  # a 16-bit hash may collide, about once in 65536


def test_decode_names_ranks_against_the_majority():
    check = replicas.ReplicaCheck(None, 0, 4, 3, True, "cpu")
    hashes = np.array([[5, 7, 9], [5, 7, 9], [5, 8, 9], [5, 7, 9]], dtype=np.float64)  # rank 2, param 1
    wire = np.zeros(check.numel)
    wire[0] = 4 * 2.0  # |g_i|^2 summed over ranks
    wire[1] = 4 * 1.0  # |g|^2, the same on every rank
    wire[3 + 2] = 1.0  # rank 2's own gradient was not finite
    wire[3 + 4 : 3 + 8] = hashes.sum(axis=1) % 2**16
    wire[3 + 8 : 3 + 11] = hashes.sum(axis=0)
    wire[3 + 11 :] = (hashes**2).sum(axis=0)
    result = check.decode(wire, has_local=True)
    assert result.desync_params == (1,) and result.desync_ranks == (2,)
    assert result.nonfinite_ranks == (2,)
    assert result.small_sq == 2.0 and result.big_sq == 1.0 and not result.failed


def test_check_consistency_needs_ddp():
    with pytest.raises(ValueError, match="check_consistency=True needs a DistributedDataParallel model"):
        gradscope.watch(torch.nn.Linear(2, 2), check_consistency=True)


def test_log_rank_is_checked():
    with pytest.raises(ValueError, match="log_rank must be None or a rank in \\[0, 1\\)"):
        gradscope.watch(torch.nn.Linear(2, 2), log_rank=3)


def test_the_comm_hook_is_installed_once_and_a_model_with_another_hook_is_refused_by_name(tmp_path):
    """``install_hook`` on real DDP models (one gloo process): gradscope's hook is installed
    once and reused by a later monitor; a model that already has the user's own Python hook, or
    a built-in C++ hook that DDP refuses to replace, gets ``(None, why)`` naming it, which the
    monitor turns into its ``comm-hook`` warning (training goes on without the hook)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ours = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))
        state, why = replicas.install_hook(ours)
        assert isinstance(state, replicas.CommHookState) and why is None
        assert replicas.install_hook(ours) == (state, None)  # a second monitor reuses it

        theirs = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))
        theirs.register_comm_hook(None, default_hooks.allreduce_hook)
        assert replicas.install_hook(theirs) == (None, "the DDP model already has a communication hook")

        builtin = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))
        builtin._register_builtin_comm_hook(dist.BuiltinCommHookType.ALLREDUCE)
        state, why = replicas.install_hook(builtin)
        assert state is None and why.startswith("cannot register a DDP communication hook (")
    finally:
        dist.destroy_process_group()


def test_compression_under_ddp_is_the_same_on_every_rank(tmp_path):
    first, second = run_ranks(_jobs().compression_job, 2, tmp_path)
    assert first["errors"] == second["errors"] == []
    assert first["section"] == second["section"] and first["section"]["readings"] == 4
    got = {layer["name"]: layer["saliency"] for layer in first["section"]["layers"]}
    assert got.keys() == first["expected"].keys()
    for name, value in first["expected"].items():  # float32 products and sums, whose terms cancel
        assert got[name] == pytest.approx(value, abs=1e-6 * first["scale"])
    assert "compression=True is not supported with sharded (DTensor) parameters" in first["refused"]
