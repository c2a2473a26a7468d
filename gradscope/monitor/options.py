"""``WatchOptions``: every option of :func:`gradscope.watch`, validated once, in one place.

``watch(model, **options)`` builds one frozen ``WatchOptions`` from its arguments; the
monitor and its parts read their settings from it. The meaning of each option is documented
on :func:`gradscope.watch`; the checks here name the offending argument.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field, fields

import torch
import torch.distributed as dist

from gradscope.actions.adaptive_lr import AdaptiveLR, check_optimizer
from gradscope.actions.early_stopping import EarlyStopping
from gradscope.actions.halting import HaltRule
from gradscope.health.thresholds import Thresholds
from gradscope.monitor.watched import GRANULARITIES, NameSource, ParamSelector
from gradscope.outputs.exporters.base import Exporter
from gradscope.outputs.runlog import RunLog
from gradscope.run.budget import HISTORY_MIB
from gradscope.stats.dispatch import BACKENDS

MODES = ("backward", "step")
"""When gradients are measured: as each becomes final during backward, or all at ``mon.step()``."""


HISTOGRAM_EVERY = 32
"""Default of ``watch(histogram_every=)``: the 64-bin histogram at one sampled step in 32.

Chosen so that the histogram's amortised cost stays within 1.15x the light statistics' alone
(README, "Histograms on a cadence"): on this project's CPU machines a light row costs about
half a full one (numba 0.47-0.51x, 2026-12-07), so one step in 32 costs 1.03x the light rows;
on the one GPU measured (H200, Triton 3.6) the full kernel took 3.84x the read floor, and a
light kernel at best at the floor then needs one step in 19 or more for 1.15x: 32 leaves room
for a light kernel slower than the floor. Format findings still see a histogram of every
layer at least every 32 sampled steps, and at once where NaN/Inf, tiny or huge values appear.
"""


def _positive_int(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"watch: {name} must be a positive integer, got {value!r}")


def checked_tags(tags) -> dict:
    """``watch(tags=...)`` as a plain dict (None: no tags); raises naming the bad key: tags are
    stored in the run log's header (JSON), so keys are non-empty strings and values JSON
    scalars (str, int, float, bool or None; floats finite)."""
    if tags is None:
        return {}
    if not isinstance(tags, Mapping):
        raise TypeError(f"watch: tags must be a dict of names to values, got {type(tags).__name__}")
    for key, value in tags.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"watch: tags: every key must be a non-empty string, got {key!r}")
        if not (value is None or isinstance(value, (str, bool, int, float))) or (
            isinstance(value, float) and not math.isfinite(value)
        ):
            raise TypeError(
                f"watch: tags[{key!r}] must be a JSON scalar (str, int, finite float, bool or None), "
                f"got {type(value).__name__} {value!r}"
            )
    return {key: (float(v) if isinstance(v, float) else v) for key, v in tags.items()}


@dataclass(frozen=True)
class WatchOptions:
    """The options of one monitor (see :func:`gradscope.watch` for their meaning).

    The first seven (``every`` to ``history``) may be given positionally, in this order, as
    ``watch`` has always accepted them after the model; the rest by keyword only.
    """

    every: int = 1
    mode: str = "backward"
    accumulation_steps: int | Callable[[], bool] = 1
    optimizer: torch.optim.Optimizer | None = None
    scaler: object = None
    track_updates: bool = False
    history: int = 10_000
    _: KW_ONLY
    granularity: str = "layer"
    params: ParamSelector = None
    names: NameSource = None
    backend: str = "auto"
    hist_history: int = 1_000
    history_mib: int = HISTORY_MIB
    histogram_every: int = HISTOGRAM_EVERY
    thresholds: Thresholds | None = None
    log_dir: str | os.PathLike | None = None
    exporters: Sequence[Exporter] = field(default=())
    log_rank: int | None = 0
    check_consistency: bool = False
    comm_hook: bool = True
    batch_size: int | None = None
    noise_scale_decay: float = 0.95
    forward: bool = False
    on_finding: Callable | None = None
    halt_on: str | Sequence[str] | None = None
    early_stopping: EarlyStopping | bool | None = None
    adapt_lr: AdaptiveLR | bool | None = None
    compression: bool = False
    tags: Mapping[str, str | int | float | bool | None] | None = None

    def __post_init__(self) -> None:
        for name in ("every", "history", "hist_history", "history_mib", "histogram_every"):
            _positive_int(getattr(self, name), name)
        if not callable(self.accumulation_steps):
            _positive_int(self.accumulation_steps, "accumulation_steps")
        if self.mode not in MODES:
            raise ValueError(f"watch: mode must be one of {MODES}, got {self.mode!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"watch: granularity must be 'layer' or 'parameter', got {self.granularity!r}")
        names = self.names
        if not (names is None or isinstance(names, (torch.nn.Module, Mapping)) or callable(names)):
            raise TypeError(
                "watch: names= takes the model the parameters belong to, or a mapping or function from "
                f"parameter names to names, got {type(names).__name__}"
            )
        if names is not None and self.forward:
            raise ValueError("watch: names= and forward=True together are not supported yet")
        if self.backend not in BACKENDS:
            raise ValueError(f"watch: backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.optimizer is not None and not isinstance(self.optimizer, torch.optim.Optimizer):
            raise TypeError(f"watch: optimizer must be a torch.optim.Optimizer, got {type(self.optimizer).__name__}")
        if not isinstance(self.compression, bool):
            raise TypeError(f"watch: compression must be True or False, got {self.compression!r}")
        for option in ("track_updates", "compression"):
            if getattr(self, option) and self.optimizer is None:
                raise ValueError(f"watch: {option}=True needs optimizer= (it reads the weights around its step)")
        if self.scaler is not None and not hasattr(self.scaler, "is_enabled"):
            raise TypeError(f"watch: scaler must be a torch.amp.GradScaler, got {type(self.scaler).__name__}")
        if self.thresholds is None:
            object.__setattr__(self, "thresholds", Thresholds())
        elif not isinstance(self.thresholds, Thresholds):
            raise TypeError(f"watch: thresholds must be a gradscope.Thresholds, got {type(self.thresholds).__name__}")
        if isinstance(self.exporters, (str, bytes)) or not isinstance(self.exporters, Iterable):
            raise TypeError(f"watch: exporters must be a list of Exporter objects, got {type(self.exporters).__name__}")
        exporters = tuple(self.exporters)
        for exporter in exporters:
            if not isinstance(exporter, Exporter):
                raise TypeError(
                    f"watch: exporters must be gradscope.exporters.Exporter objects, got {type(exporter).__name__}"
                )
        object.__setattr__(self, "exporters", exporters)
        if not isinstance(self.forward, bool):
            raise TypeError(f"watch: forward must be True or False, got {self.forward!r}")
        if self.batch_size is not None:
            _positive_int(self.batch_size, "batch_size")
        decay = self.noise_scale_decay
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay < 1:
            raise ValueError(f"watch: noise_scale_decay must be in [0, 1), got {decay!r}")
        object.__setattr__(self, "tags", checked_tags(self.tags))
        self._check_actions()
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        rank = self.log_rank
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world):
            raise ValueError(f"watch: log_rank must be None or a rank in [0, {world}), got {rank!r}")

    def _check_actions(self) -> None:
        if self.on_finding is not None and not callable(self.on_finding):
            raise TypeError(
                f"watch: on_finding must be a function of one Finding, got {type(self.on_finding).__name__}"
            )
        rule = HaltRule.parse(self.halt_on)
        object.__setattr__(
            self,
            "halt_on",
            None if rule is None else tuple(sorted(rule.kinds)) + ((rule.min_severity,) if rule.min_severity else ()),
        )
        for name, kind in (("early_stopping", EarlyStopping), ("adapt_lr", AdaptiveLR)):
            value = getattr(self, name)
            if value is True:
                object.__setattr__(self, name, kind())
            elif value is False:
                object.__setattr__(self, name, None)
            elif value is not None and not isinstance(value, kind):
                raise TypeError(f"watch: {name} must be a gradscope.{kind.__name__}, True or None, got {value!r}")
        if self.adapt_lr is not None:
            if self.optimizer is None:
                raise ValueError("watch: adapt_lr needs optimizer= (the optimizer whose learning rate it changes)")
            check_optimizer(self.optimizer)
            if self.adapt_lr.per_layer and not self.track_updates:
                raise ValueError(
                    "watch: AdaptiveLR(per_layer=True) acts on update/weight ratios: it needs track_updates=True"
                )

    @property
    def halt_rule(self) -> HaltRule | None:
        """``halt_on`` as a rule (None: never halt)."""
        return HaltRule.parse(self.halt_on)

    @property
    def acts(self) -> bool:
        """Whether any action on findings is asked for."""
        return any(x is not None for x in (self.on_finding, self.halt_on, self.early_stopping, self.adapt_lr))

    def for_pipeline_stage(self, mode_given: bool) -> WatchOptions:
        """These options for a pipeline stage (:mod:`gradscope.distributed.pipeline`): measured
        in ``mode="step"``, the one point where the schedule's gradients are final.

        Args:
            mode_given: whether the user chose ``mode`` (a stage's may only be ``"step"``).

        Raises:
            ValueError: ``mode="backward"``, ``accumulation_steps``, or an option a stage does
                not support yet (actions on findings, forward statistics).
        """
        if mode_given and self.mode != "step":
            raise ValueError(
                "watch: a pipeline stage is measured in mode='step': its gradients are final only when "
                "schedule.step() returns (one backward per microbatch, then scaled); leave mode out"
            )
        if callable(self.accumulation_steps) or self.accumulation_steps != 1:
            raise ValueError(
                "watch: accumulation_steps does not apply to a pipeline stage: the schedule accumulates its "
                "microbatches, and the stage is measured from .grad at mon.step(); call mon.step() once per "
                "optimizer step"
            )
        if self.acts:
            raise ValueError(
                "watch: on_finding, halt_on, early_stopping and adapt_lr are not supported with pipeline stages "
                "yet (each stage's monitor sees only its own layers)"
            )
        if self.forward:
            raise ValueError("watch: forward=True is not supported with pipeline stages yet")
        return dataclasses.replace(self, mode="step")

    def destinations(self, topology, stage=None) -> list[Exporter]:
        """The run log (``log_dir``; under ``rank-NNNNN`` when every rank of a distributed run
        logs; for a pipeline ``stage``, a :class:`~gradscope.distributed.pipeline.PipelinePlace`,
        under its :attr:`~gradscope.distributed.pipeline.PipelinePlace.log_folder`) and the
        exporters, in the order records reach them."""
        exporters, log_dir = list(self.exporters), self.log_dir
        if log_dir is not None:
            if stage is not None:
                log_dir = os.path.join(log_dir, stage.log_folder)
            elif self.log_rank is None and topology.world > 1:
                log_dir = os.path.join(log_dir, f"rank-{topology.global_rank:05d}")
            exporters.insert(0, RunLog(log_dir))
        return exporters


OPTION_NAMES = tuple(f.name for f in fields(WatchOptions))
"""Every option's name, in order."""
