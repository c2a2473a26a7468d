"""Real multi-process ``torch.distributed`` runs for the tests: gloo on CPU, one process per
rank, spawned by the test and joined with a deadline (a hung collective fails the test
instead of hanging CI)."""

from __future__ import annotations

import datetime
import gc
import pickle
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

DEADLINE_S = 180
"""Seconds a spawned job may take before it is killed and the test fails."""


def _entry(rank: int, world: int, root: str, fn, args: tuple) -> None:
    torch.set_num_threads(1)  # ranks share this machine's cores
    out = Path(root)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{out / 'store'}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        result = fn(rank, world, out, *args)
        with open(out / f"result-{rank}.pkl", "wb") as file:
            pickle.dump(result, file)
        # Without this, a rank that tears its group down while another still talks to it
        # sometimes aborts at exit ("terminate called without an active exception").
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world: int, root: Path, *args, deadline: float = DEADLINE_S) -> list:
    """Run ``fn(rank, world, root, *args)`` on ``world`` spawned ranks; returns each rank's
    result (picklable). An exception on any rank fails the caller with its traceback."""
    root.mkdir(parents=True, exist_ok=True)
    context = mp.start_processes(
        _entry, args=(world, str(root), fn, args), nprocs=world, join=False, start_method="spawn"
    )
    end = time.monotonic() + deadline
    while not context.join(timeout=max(end - time.monotonic(), 0.1)):
        if time.monotonic() >= end:
            for process in context.processes:
                process.kill()
            raise AssertionError(f"{fn.__name__}: ranks still running after {deadline} s (a collective hung?)")
    results = []
    for rank in range(world):
        with open(root / f"result-{rank}.pkl", "rb") as file:
            results.append(pickle.load(file))
    return results
