"""DDP (replicated gradients): what each rank had before the all-reduce, and whether the
replicas still agree after it.

After DDP's all-reduce every rank holds the same averaged gradient, so the statistics need
no collective. Two things do need to look across ranks, and share **one small all-reduce
per sampled step** (float64, summed; ``W`` ranks, ``P`` watched parameters)::

    [ sum_i |g_i|^2 | sum_i |g|^2 | ranks that failed | W non-finite flags | W model hashes | P sum h | P sum h^2 ]
                                                                         `------- check_consistency -------'

* gradscope's **communication hook** (:func:`allreduce_hook`, registered on the DDP model)
  averages the gradient buckets exactly as DDP's default hook does, and on sampled steps
  also measures each rank's own gradient before the all-reduce (``|g_i|^2``, one norm per
  bucket, on the device) and the averaged one after it. That gives the gradient noise
  scale (:mod:`gradscope.distributed.noise_scale`) and names the ranks whose own gradient held NaN/Inf
  (after averaging, every rank's gradient does).
* ``check_consistency``: a 16-bit hash ``h`` of every parameter's statistics row (bits of its
  sums, maximum and counts). Replicas agree on a parameter exactly when
  ``W * sum(h^2) == sum(h)^2`` (integers, exact in float64), and each rank's hash of the
  whole model, in its own slot, names the ranks that differ from the majority.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from gradscope.distributed.collectives import wait_all, works_done
from gradscope.stats import layout

HASH_BITS = 16
"""Bits of a parameter's hash: ``W * (2**16)**2`` stays exact in float64 up to 2**21 ranks."""

_LOCAL, _AVERAGED, _FAILED, _FLAGS = 0, 1, 2, 3  # offsets in the wire buffer

_HASHED_COLUMNS = (layout.NUMEL, layout.SUM, layout.SUMSQ, layout.MAX_ABS, layout.ZEROS, layout.NANS, layout.INFS)


def wire_numel(world: int, params: int, check_consistency: bool) -> int:
    """float64 values in one sampled step's buffer."""
    return _FLAGS + world + ((world + 2 * params) if check_consistency else 0)


def wire_bytes(world: int, params: int, check_consistency: bool) -> int:
    """Bytes all-reduced per sampled step."""
    return 8 * wire_numel(world, params, check_consistency)


def row_hashes(rows: torch.Tensor) -> torch.Tensor:
    """int64 ``(P,)`` hashes in ``[0, 2**HASH_BITS)`` of float64 ``(P, ROW_WIDTH)`` rows, on
    their device: equal rows give equal hashes; rows that differ in any bit of their sums,
    maximum or counts almost surely do not."""
    bits = rows[:, list(_HASHED_COLUMNS)].contiguous().view(torch.int64)
    mixed = torch.zeros(rows.shape[0], dtype=torch.int64, device=rows.device)
    for column in range(bits.shape[1]):
        value = bits[:, column]
        mixed = mixed ^ value ^ (value >> (7 + 5 * column)) ^ (value << (3 + 2 * column))
        mixed = mixed ^ (mixed >> 29)
    mixed = mixed ^ (mixed >> 32)
    mixed = mixed ^ (mixed >> 16)
    return mixed & ((1 << HASH_BITS) - 1)


class CommHookState:
    """What gradscope's DDP communication hook measures on a sampled step.

    Attributes:
        group, world: the DDP model's process group and its size.
        measuring: set by the monitor: the running backward belongs to a sampled step.
    """

    def __init__(self, group, world: int) -> None:
        self.group = group
        self.world = world
        self.measuring = False
        self._lock = threading.Lock()
        self._local: list[torch.Tensor] = []
        self._global: list[torch.Tensor] = []

    def _add(self, into: list, tensor: torch.Tensor) -> None:
        low = tensor.dtype in (torch.float16, torch.bfloat16)
        norm = torch.linalg.vector_norm(tensor, dtype=torch.float32 if low else None)
        with self._lock:  # "then" callbacks may run on the process group's threads
            into.append(norm.double().square())

    def take(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """This step's ``|g_i|^2`` (own gradient) and ``|g|^2`` (averaged), as 0-d float64
        device tensors (None when the hook measured nothing), and forget them."""
        with self._lock:
            local, averaged = self._local, self._global
            self._local, self._global = [], []
        if not local:
            return None, None
        return torch.stack(local).sum(), (torch.stack(averaged).sum() if averaged else None)


def allreduce_hook(state, bucket):
    """gradscope's DDP communication hook: DDP's default averaging (divide by the world
    size, all-reduce), plus, while ``state.measuring``, the bucket's squared norm before and
    after. Registered by ``watch(ddp_model)``; stays correct (plain averaging) after the
    monitor closes."""
    buffer = bucket.buffer()
    measuring = state.measuring
    if measuring:
        state._add(state._local, buffer)
    buffer.div_(state.world)
    future = dist.all_reduce(buffer, group=state.group, async_op=True).get_future()

    def averaged(fut):
        reduced = fut.value()[0]
        if measuring:
            state._add(state._global, reduced)
        return reduced

    return future.then(averaged)


def install_hook(model: torch.nn.parallel.DistributedDataParallel) -> tuple[CommHookState | None, str | None]:
    """gradscope's hook on ``model`` (reusing it if an earlier monitor installed it):
    ``(state, None)``, or ``(None, why not)`` when the model already has another hook."""
    for hook, state in getattr(model, "_comm_hooks", ()):
        if hook is allreduce_hook:
            return state, None
    if getattr(model, "_comm_hooks", None):
        return None, "the DDP model already has a communication hook"
    state = CommHookState(model.process_group, dist.get_world_size(model.process_group))
    try:
        model.register_comm_hook(state, allreduce_hook)
    except (RuntimeError, TypeError, ValueError) as error:  # e.g. a built-in hook registered earlier
        return None, f"cannot register a DDP communication hook ({error})"
    return state, None


@dataclass
class ReplicaResult:
    """One sampled step's view across the replicas.

    Attributes:
        small_sq: mean over ranks of each rank's own ``|g_i|^2`` (NaN without the hook).
        big_sq: ``|g|^2`` of the averaged gradient (NaN without the hook).
        failed: some rank could not take part properly (its check is void).
        nonfinite_ranks: ranks whose own gradient held NaN/Inf before averaging.
        desync_params: indices of parameters whose rows differ between ranks.
        desync_ranks: ranks whose model hash differs from the majority's (every rank that
            disagrees when there is no majority).
    """

    small_sq: float
    big_sq: float
    failed: bool
    nonfinite_ranks: tuple[int, ...]
    desync_params: tuple[int, ...]
    desync_ranks: tuple[int, ...]


class ReplicaCheck:
    """The per-step collective of a DDP monitor (module docstring).

    Args:
        group, rank, world: the DDP process group, this rank in it, its size.
        params: watched parameters (rows hashed by ``check_consistency``).
        check_consistency: hash rows to find ranks whose gradients differ.
        device: where the buffer is built (the gradients' device).
    """

    def __init__(self, group, rank: int, world: int, params: int, check_consistency: bool, device) -> None:
        self.group, self.rank, self.world, self.params = group, rank, world, params
        self.check_consistency = check_consistency
        self.device = torch.device(device)
        self.numel = wire_numel(world, params, check_consistency)
        self._in_flight: deque[tuple[int, torch.Tensor, list, object, bool]] = deque()

    def issue(
        self,
        step: int,
        local_sq: torch.Tensor | None,
        averaged_sq: torch.Tensor | None,
        rows: torch.Tensor | None,
        failed: bool,
    ) -> None:
        """Start the all-reduce of a sampled step: this rank's own ``|g_i|^2`` and the averaged
        ``|g|^2`` (0-d device tensors from the hook, or None) and its rows (float64
        ``(P, ROW_WIDTH)`` on ``device``, or None). Every rank must call this at every
        sampled step, even one that failed. Never synchronises the host on CUDA."""
        world, params = self.world, self.params
        wire = torch.zeros(self.numel, dtype=torch.float64, device=self.device)
        if failed or (self.check_consistency and rows is None):
            wire[_FAILED] = 1.0
        has_local = local_sq is not None
        if has_local:
            wire[_LOCAL] = local_sq
            wire[_FLAGS + self.rank] = (~torch.isfinite(local_sq)).double()
            if averaged_sq is not None:
                wire[_AVERAGED] = averaged_sq
        if self.check_consistency and rows is not None:
            hashes = row_hashes(rows).double()
            wire[_FLAGS + world + self.rank] = torch.remainder(hashes.sum(), 1 << HASH_BITS)
            start = _FLAGS + 2 * world
            wire[start : start + params] = hashes
            wire[start + params :] = hashes.square()
        work = dist.all_reduce(wire, dist.ReduceOp.SUM, group=self.group, async_op=True)
        event = None
        if self.device.type == "cuda":
            work.wait()  # ordered on the current stream; the host does not wait
            host = torch.empty(wire.shape, dtype=torch.float64, pin_memory=True)
            host.copy_(wire, non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            wire, works = host, []
        else:
            works = [work]
        self._in_flight.append((step, wire, works, event, has_local))

    def completed(self, block: bool = False) -> list[tuple[int, ReplicaResult]]:
        """Results of finished steps, oldest first; with ``block``, waits for them all."""
        done = []
        while self._in_flight:
            step, wire, works, event, has_local = self._in_flight[0]
            if block:
                if event is not None:
                    event.synchronize()
                wait_all(works)
            elif (event is not None and not event.query()) or not works_done(works):
                break
            self._in_flight.popleft()
            done.append((step, self.decode(wire.numpy(), has_local)))
        return done

    def close(self) -> None:
        self._in_flight.clear()

    def decode(self, wire: np.ndarray, has_local: bool) -> ReplicaResult:
        """The step's result from the reduced buffer (host float64)."""
        world, params = self.world, self.params
        failed = wire[_FAILED] > 0
        flags = wire[_FLAGS : _FLAGS + world]
        nonfinite = tuple(int(r) for r in np.flatnonzero(flags > 0)) if has_local else ()
        # A non-finite |g_i|^2 makes the sum non-finite; the flags still name the ranks.
        small_sq = float(wire[_LOCAL]) / world if has_local else float("nan")
        big_sq = float(wire[_AVERAGED]) / world if has_local else float("nan")
        desync_params: tuple[int, ...] = ()
        desync_ranks: tuple[int, ...] = ()
        if self.check_consistency and not failed:
            start = _FLAGS + 2 * world
            sums = wire[start : start + params]
            squares = wire[start + params :]
            spread = [world * int(q) - int(s) ** 2 for s, q in zip(sums, squares, strict=True)]
            desync_params = tuple(i for i, value in enumerate(spread) if value != 0)
            if desync_params:
                model_hashes = wire[_FLAGS + world : _FLAGS + 2 * world].astype(np.int64)
                values, counts = np.unique(model_hashes, return_counts=True)
                majority = values[np.argmax(counts)]
                if counts.max() * 2 > world:
                    desync_ranks = tuple(int(r) for r in np.flatnonzero(model_hashes != majority))
                else:
                    desync_ranks = tuple(range(world))
        return ReplicaResult(small_sq, big_sq, bool(failed), nonfinite, desync_params, desync_ranks)
