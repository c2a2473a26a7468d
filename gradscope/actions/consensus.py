"""Acting together in a distributed run: one rank decides, every rank applies the decision at the same step.

Every rank's history holds the same gradient statistics, but not the same loss (each rank
trains on its own batches), and each rank's statistics reach its host at slightly different
moments. Ranks that judged on their own would halt, stop or change the learning rate at
different steps: a rank that left the loop hangs the others in the next collective, and
replicas whose learning rates differ drift apart. So in a distributed run one rank decides
(the monitor's ``log_rank``; rank 0 when every rank logs) and, at every ``mon.step()``, one
asynchronous broadcast of a small float64 vector — halt, stop, the learning-rate scale, the
best step and value of early stopping, and the per-layer scales — carries its latest
decision to every rank. The vector issued at step ``s`` is read and applied by every rank at
step ``s + 1`` (it has had a whole step to arrive: on CUDA the host waits on an event, not
on the device), so a distributed run acts one step later than a single process. A halt also
sends the deciding rank's finding (one blocking broadcast, once per run).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

HALT, STOP, SCALE, BEST_STEP, BEST_VALUE = range(5)
FIXED = 5
"""Entries before the per-layer scales."""


class Consensus:
    """The decision vector's exchange for one monitor (see the module docstring).

    Args:
        decider: the global rank that decides.
        rows: the monitor's rows (one per-layer scale each).
    """

    def __init__(self, decider: int, rows: int) -> None:
        self.decider = decider
        self.is_decider = dist.get_rank() == decider
        self.size = FIXED + rows
        cuda = dist.get_backend() == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        self._pending: tuple | None = None

    def exchange(self, proposal: np.ndarray | None) -> np.ndarray | None:
        """Issue this step's vector (the decider's ``proposal``; the others' is ignored) and
        return the one issued at the previous call (None at the first), the same on every rank."""
        previous = self._take()
        values = proposal if self.is_decider and proposal is not None else np.zeros(self.size)
        buffer = torch.as_tensor(np.asarray(values, dtype=np.float64)).to(self.device)
        work = dist.broadcast(buffer, src=self.decider, async_op=True)
        if self.device.type == "cuda":
            work.wait()  # the current stream waits for the broadcast; the host does not
            host = torch.empty(buffer.shape, dtype=buffer.dtype, pin_memory=True)
            host.copy_(buffer, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending = (None, host, event)
        else:
            self._pending = (work, buffer, None)
        return previous

    def _take(self) -> np.ndarray | None:
        if self._pending is None:
            return None
        work, host, event = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()  # recorded a whole step ago
        else:
            work.wait()
        return host.numpy().copy()

    def share_halt(self, payload: object) -> object:
        """Every rank: the decider's ``payload`` (its finding), by one blocking broadcast."""
        box = [payload if self.is_decider else None]
        dist.broadcast_object_list(box, src=self.decider)
        return box[0]

    def close(self) -> None:
        self._pending = None
