"""Acting on findings in a distributed run (real DDP, gloo, 2 processes): every rank halts,
stops and changes its learning rate at the same step, decided by one rank."""

from __future__ import annotations

from action_jobs import controller_job, halting_job
from multiprocess import run_ranks


def test_a_nan_halts_every_rank_at_the_same_step(tmp_path):
    results = run_ranks(halting_job, 2, tmp_path, 1, 6)
    halts = [r["halted"] for r in results]
    assert all(h is not None for h in halts), halts
    assert halts[0] == halts[1], halts  # same step, same finding: no rank left waiting in a collective
    assert halts[0]["kind"] == "nonfinite"
    # Rank 0 (the decider) sees the NaN at its own step or the next (DDP's collectives are
    # asynchronous), and every rank applies the decision one step after that.
    assert halts[0]["step"] in (7, 8)
    assert results[0]["errors"] == results[1]["errors"] == []


def test_one_rank_decides_and_every_rank_applies_it_at_the_same_step(tmp_path):
    steps = 40
    rank0, rank1 = run_ranks(controller_job, 2, tmp_path, 0, 20, steps)
    assert rank0["scales"] == rank1["scales"]
    assert rank0["scales"][20] == 1.0 and rank0["scales"][21] == 0.5  # decided at 20, applied from 21
    assert rank0["weights"] == rank1["weights"]  # replicas did not drift apart
    # Rank 0's validation loss worsens from its first evaluation (step 4): with patience 2 the
    # evaluation logged after step 14's mon.step() decides; it travels with step 15's exchange
    # and every rank applies it at step 16's.
    assert rank0["stops"] == rank1["stops"]
    assert rank0["stops"].index(True) == 16
    assert any("lr" in m and "loss_spike" in m for m in rank0["actions"]), rank0["actions"]
    assert rank0["errors"] == rank1["errors"] == []


def test_a_spike_on_a_rank_that_does_not_decide_is_not_acted_on(tmp_path):
    """Only the deciding rank's own loss is judged (documented): rank 1's spike changes nothing."""
    rank0, rank1 = run_ranks(controller_job, 2, tmp_path, 1, 20, 30)
    assert rank0["scales"] == rank1["scales"] == [1.0] * 30
    assert rank0["weights"] == rank1["weights"]
