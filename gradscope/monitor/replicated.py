"""DDP in the monitor: gradscope's communication hook, the noise scale and the replica check.

Under ``DistributedDataParallel`` every rank measures the averaged gradient itself (no
collective is needed for the statistics). What only a view across ranks can tell comes
from :mod:`gradscope.distributed.replicas`: the gradient noise scale and the ranks whose own
gradient held NaN/Inf (from gradscope's communication hook), and with
``check_consistency`` whether the replicas still agree. :class:`DdpExtras` wires them into
a monitor: it installs the hook, issues the one small all-reduce per sampled step and turns
its results into records.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from gradscope.distributed.noise_scale import NoiseScale
from gradscope.distributed.replicas import ReplicaCheck, ReplicaResult, install_hook
from gradscope.distributed.topology import Topology, find_ddp
from gradscope.monitor.engines import Engines
from gradscope.monitor.options import WatchOptions
from gradscope.run import records
from gradscope.stats.dispatch import is_host


class DdpExtras:
    """The cross-rank part of monitoring a DDP model (module docstring).

    Args:
        model: the model passed to ``watch`` (a DDP model, possibly compiled).
        topology: its ``"replicated"`` topology with more than one rank.
        options: the monitor's options (``comm_hook``, ``check_consistency``,
            ``batch_size``, ``noise_scale_decay``).
        params: watched parameters.
        device: where the gradients are (the check's buffer is built there).
        warn: ``warn(key, message)``, the monitor's warn-once.

    Attributes:
        active: False when there is nothing to do (no hook and no check): the monitor then
            leaves this object out.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        topology: Topology,
        options: WatchOptions,
        params: int,
        device: torch.device,
        warn: Callable[[str, str], None],
    ) -> None:
        self._hook = None
        self.noise: NoiseScale | None = None
        self.check: ReplicaCheck | None = None
        if options.comm_hook:
            self._hook, why = install_hook(find_ddp(model))
            if self._hook is None:
                warn(
                    "comm-hook",
                    f"gradscope: {why}; the gradient noise scale and the rank a non-finite gradient "
                    "came from are not measured (watch(..., comm_hook=False) silences this)",
                )
            else:
                self.noise = NoiseScale(topology.world, options.batch_size, options.noise_scale_decay)
        self.check_consistency = options.check_consistency
        if self._hook is not None or self.check_consistency:
            self.check = ReplicaCheck(
                topology.group, topology.rank, topology.world, params, self.check_consistency, device
            )
        self.active = self.check is not None
        self.measuring = True  # step 0 is sampled

    @classmethod
    def of(
        cls,
        model: torch.nn.Module,
        topology: Topology,
        options: WatchOptions,
        engines: Engines,
        params: int,
        warn: Callable[[str, str], None],
    ) -> DdpExtras | None:
        """A monitor's DDP extras, or None when there are none (not DDP, a single rank, or
        nothing to do). ``engines``: the monitor's captures; with ``check_consistency`` on a
        device, its rows of absent parameters are made zeros (the rows are hashed)."""
        if topology.kind != "replicated" or topology.world == 1:
            return None
        key = engines.first  # the only one when rows are hashed
        extras = cls(model, topology, options, params, torch.device("cpu") if is_host(key) else key, warn)
        if options.check_consistency and not is_host(key):
            engines.captures[key].zero_rows = True
        return extras if extras.active else None

    @property
    def measuring(self) -> bool:
        """Whether the communication hook measures the running backward (a sampled step)."""
        return self._hook is not None and self._hook.measuring

    @measuring.setter
    def measuring(self, value: bool) -> None:
        if self._hook is not None:
            self._hook.measuring = value

    def issue(self, step: int, device_rows: Callable[[], torch.Tensor] | None, failed: bool) -> Exception | None:
        """Start the sampled step's all-reduce (every rank, every sampled step, even a failed one).

        Args:
            step: the sampled step.
            device_rows: returns the step's per-parameter rows on the device (hashed when
                ``check_consistency``), or None when this rank measured nothing.
            failed: this rank could not measure the step.

        Returns:
            The error met while gathering this rank's contribution (the step is then void
            on every rank), or None.
        """
        rows = local_sq = averaged_sq = None
        error = None
        try:
            if self._hook is not None:
                local_sq, averaged_sq = self._hook.take()
            if self.check_consistency and device_rows is not None:
                rows = device_rows()
        except Exception as caught:
            error, failed = caught, True
        self.check.issue(step, local_sq, averaged_sq, rows, failed)
        return error

    def completed(self, block: bool) -> list[tuple[int, ReplicaResult]]:
        """Results of finished steps, oldest first."""
        return self.check.completed(block)

    def records(self, step: int, result: ReplicaResult, row_of: np.ndarray) -> list[records.Record]:
        """What a step's result says, as records: replicas that disagree, the noise scale."""
        out: list[records.Record] = []
        if result.desync_params:
            layers = sorted({int(row_of[i]) for i in result.desync_params})
            out.append(records.Desync(step, tuple(layers), result.desync_ranks))
        if self.noise is not None and not np.isnan(result.small_sq):
            value = self.noise.update(result.small_sq, result.big_sq)
            values = {"noise_scale": value, "grad_sq_small": result.small_sq, "grad_sq_big": result.big_sq}
            out.append(records.StepValues(step, values))
        return out

    def close(self) -> None:
        """Stop measuring (DDP keeps the hook, which goes on averaging) and drop what is in flight."""
        if self._hook is not None:
            self._hook.measuring = False
            self._hook.take()
        self.check.close()
