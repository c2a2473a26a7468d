"""``TrainerSession``: a monitor's life inside a trainer, whatever the trainer.

The trainer callbacks (:mod:`gradscope.integrations.lightning`,
:mod:`gradscope.integrations.transformers`) only translate their trainer's events; what
happens at each event is here, once:

* **start**: :func:`gradscope.watch` the model with the user's options plus what only the
  trainer knows (its optimizer, its GradScaler, when a backward pass is an optimizer step's
  last), the run log in a new directory under the trainer's output directory, and the state
  of a resumed run (:meth:`gradscope.Monitor.load_state_dict`);
* **each optimizer step** (after the step's last backward pass, before ``optimizer.step()``):
  ``mon.step(loss)``; a ``TrainingHalted`` is recorded (:attr:`TrainerSession.stop_reason`)
  and raised on, so that the callback ends the trainer's run before the optimizer applies
  the step: the update that carried the NaN (``halt_on``) never reaches the weights;
* **evaluation**: every finite scalar metric into ``mon.log``;
* **logging**: the newest sampled step that has reached the host, as a few whole-model
  scalars (:func:`gradscope.outputs.exporters.base.summary_scalars`) or, on request, every
  layer's (:func:`~gradscope.outputs.exporters.base.layer_scalars`), read without waiting;
* **end**: close the monitor; print the health report and write it (text and visual) beside
  the run log.

A failure of gradscope's own is reported once (``mon.errors`` and one warning) and never
stops training.
"""

from __future__ import annotations

import datetime
import logging
import math
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from gradscope.actions.halting import TrainingHalted
from gradscope.monitor.monitor import Monitor
from gradscope.monitor.options import OPTION_NAMES
from gradscope.monitor.start import watch
from gradscope.outputs import report_files
from gradscope.outputs.exporters.base import SUMMARY_PREFIX, layer_scalars, summary_scalars
from gradscope.run.history import BUILT_IN_FIELDS
from gradscope.stats.reporting import GradscopeWarning

log = logging.getLogger("gradscope")

SET_BY_TRAINER = ("mode", "scaler", "accumulation_steps")
"""Watch options a trainer callback sets itself (the trainer knows them; a user's would be wrong)."""

NOT_METRICS = ("_runtime", "_samples_per_second", "_steps_per_second")
"""Endings of evaluation values that measure the evaluation itself, not the model."""

PREFIX = SUMMARY_PREFIX
"""Before every whole-model scalar a callback logs (per-layer ones are ``<statistic>/<layer>``)."""


def check_watch_options(owner: str, options: Mapping) -> dict:
    """The user's watch options for a callback, checked by name (values are checked by
    :func:`gradscope.watch` when the trainer starts)."""
    for name in options:
        if name in SET_BY_TRAINER:
            raise ValueError(f"{owner}: {name}= is set from the trainer's own settings; leave it out")
        if name not in OPTION_NAMES:
            raise TypeError(f"{owner}: unknown option {name!r} (the options of gradscope.watch are accepted)")
    return dict(options)


def new_run_dir(parent: Path) -> Path:
    """A new directory name for a run log under ``parent``: ``run-<date>-<time>[-n]``."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    candidate, n = parent / f"run-{stamp}", 1
    while candidate.exists():
        n += 1
        candidate = parent / f"run-{stamp}-{n}"
    return candidate


def finite_scalars(metrics: Mapping) -> dict[str, float]:
    """The entries of ``metrics`` that are finite numbers or one-element tensors, as floats
    (a trainer's metric dictionaries also hold strings, lists, epochs...)."""
    out = {}
    for name, value in metrics.items():
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                continue
            value = value.detach().item()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[str(name)] = float(value)
    return out


class TrainerSession:
    """One monitor over one ``fit``/``train`` call (see the module docstring).

    Args:
        owner: the callback's name, for messages.
        watch_options: the user's options of :func:`gradscope.watch`.
        log_layers: log every layer's scalars to the trainer's loggers (default: a summary).
        report: print the health report at the end and write it beside the run log.
        out_dir: where run logs and reports go (default: chosen by the callback).
    """

    def __init__(
        self, owner: str, watch_options: Mapping, log_layers: bool = False, report: bool = True, out_dir=None
    ) -> None:
        self.owner = owner
        self.watch_options = check_watch_options(owner, watch_options)
        if not isinstance(log_layers, bool) or not isinstance(report, bool):
            raise TypeError(f"{owner}: log_layers and report must be True or False")
        self.log_layers, self.report = log_layers, report
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.monitor: Monitor | None = None
        self.run_dir: Path | None = None
        self.stop_reason: str | None = None
        self.files: list[Path] = []
        self._resume: dict | None = None
        self._logged_step = -1
        self._finished = False
        self._begun = False  # the first step is numbered (begin_at)
        self._loss_sum: torch.Tensor | None = None  # this step's losses so far (add_loss)
        self._losses = 0

    # ---- start ----------------------------------------------------------------------------

    def start(
        self,
        model: torch.nn.Module,
        out_dir: Path,
        *,
        optimizer=None,
        scaler=None,
        mode: str = "step",
        accumulation_steps: int | Callable[[], bool] = 1,
    ) -> Monitor:
        """Watch ``model`` for this run (a monitor of an earlier run is closed first)."""
        if self.monitor is not None:
            self.monitor.close()
        options = dict(self.watch_options)
        if optimizer is not None and "optimizer" not in options:
            options["optimizer"] = optimizer
        if "log_dir" not in options:
            self.run_dir = new_run_dir(self.out_dir or Path(out_dir))
            options["log_dir"] = self.run_dir
        else:
            self.run_dir = Path(options["log_dir"]) if options["log_dir"] is not None else None
        self.stop_reason, self.files, self._logged_step, self._finished = None, [], -1, False
        self._begun, self._loss_sum, self._losses = False, None, 0
        self.monitor = watch(model, mode=mode, scaler=scaler, accumulation_steps=accumulation_steps, **options)
        return self.monitor

    def begin_at(self, step: int) -> None:
        """Number the first step ``step`` (the trainer's count of optimizer steps so far, as
        after a resume), with the actions' state of the checkpoint the run resumed from."""
        self._begun = True
        state = dict(self._resume) if self._resume else {"version": 1, "actions": {}}
        self._resume = None
        if step or state.get("actions"):
            self.monitor.load_state_dict({**state, "step": int(step)})

    # ---- during the run -------------------------------------------------------------------

    def add_loss(self, loss: torch.Tensor) -> None:
        """One backward pass's loss (a one-element tensor, kept on its device: no sync); the
        step's loss is their mean (see :meth:`step`)."""
        if self.monitor is None or not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            return
        value = loss.detach().reshape(()).float()
        self._loss_sum = value if self._loss_sum is None else self._loss_sum + value
        self._losses += 1

    def step(
        self, loss=None, *, steps_done: int | None = None, loss_scale: float = 1.0, summed: bool = False
    ) -> str | None:
        """Close one optimizer step; returns why training should stop after it (early
        stopping; None: go on).

        Args:
            loss: the step's loss; default: the mean of the losses given to :meth:`add_loss`
                since the last step, times ``loss_scale`` (a trainer that divided each pass's
                loss by the number of passes undoes it so); with ``summed``, their sum.
            steps_done: the trainer's count of optimizer steps before this one; the first
                step of the run is numbered so (:meth:`begin_at`).
            loss_scale: see ``loss``.
            summed: each loss given to :meth:`add_loss` is already its pass's share of the
                step's loss (a Hugging Face model given ``num_items_in_batch`` normalises its
                loss over the whole accumulated batch): the step's loss is their sum.

        Raises:
            gradscope.TrainingHalted: ``halt_on`` matched (:attr:`stop_reason` says so): the
                caller ends the run before ``optimizer.step()``.
        """
        if self.monitor is None:
            return None
        if not self._begun and steps_done is not None:
            self.begin_at(steps_done)
        if loss is None and self._loss_sum is not None:
            loss = self._loss_sum * (loss_scale if summed else loss_scale / self._losses)
        self._loss_sum, self._losses = None, 0
        try:
            self.monitor.step(loss=loss)
        except TrainingHalted as halted:
            self._stop(f"gradscope halted training: {halted}")
            raise
        return self.check_stop()

    def evaluated(self, metrics: Mapping) -> str | None:
        """Hand an evaluation's metrics to the monitor; returns why training should stop now."""
        if self.monitor is None:
            return None
        values = {
            name: value
            for name, value in finite_scalars(metrics).items()
            if name not in BUILT_IN_FIELDS and name not in ("step", "epoch") and not name.endswith(NOT_METRICS)
        }
        if values:
            self.monitor.log(**values)
        return self.check_stop()

    def check_stop(self) -> str | None:
        """Why training should stop (halted, or early stopping), the first time it is asked."""
        mon = self.monitor
        if mon is not None and self.stop_reason is None and mon.should_stop:
            best = f"; best step {mon.best_step} ({mon.best_value:.6g})" if mon.best_step is not None else ""
            self._stop(f"gradscope early stopping: {mon.stop_reason}{best}")
        return self.stop_reason

    def _stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
            if self.monitor is None or self.monitor.is_logging_rank:
                log.warning("%s: stopping training: %s", self.owner, reason)

    def scalars(self) -> tuple[int, dict[str, float]] | None:
        """The newest sampled step that reached the host since the last call, and its scalars
        (``gradscope/grad_norm``...; with ``log_layers``, also ``grad_norm/<layer>``...);
        None when there is nothing new. Never waits for the device."""
        mon = self.monitor
        if mon is None:
            return None
        try:
            latest = mon.latest()
            if latest is None or latest[0] <= self._logged_step:
                return None
            step, rows, present = latest
            self._logged_step = step
            values = {PREFIX + k: v for k, v in summary_scalars(rows, present).items()}
            if mon.options.adapt_lr is not None:
                values[PREFIX + "lr_scale"] = mon.lr_scale
            if self.log_layers:
                values.update(layer_scalars(rows, present, mon.rows))
            return step, values
        except Exception as error:
            mon._failures.report_error("scalars", f"gradscope: could not read the statistics for the loggers ({error})")
            return None

    # ---- checkpoints ----------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The monitor's checkpoint state (:meth:`gradscope.Monitor.state_dict`), or what was
        loaded and not yet applied."""
        if self.monitor is not None:
            return {"monitor": self.monitor.state_dict()}
        return {"monitor": self._resume} if self._resume is not None else {}

    def load_state_dict(self, state: Mapping) -> None:
        """Keep a checkpoint's state for the next :meth:`start` (a trainer restores callbacks
        before the run begins)."""
        self._resume = state.get("monitor")

    # ---- end ------------------------------------------------------------------------------

    def finish(self, title: str) -> list[Path]:
        """Close the monitor; print the report and write the report files (logging rank)."""
        mon = self.monitor
        if mon is None or self._finished:
            return self.files
        self._finished = True
        mon.close()
        if not (self.report and mon.is_logging_rank):
            return self.files
        try:
            report = mon.report()
            print(report)
            directory = self.run_dir or self.out_dir
            if directory is not None:
                self.files = report_files.write_reports(mon, report, directory, title)
                print(f"{self.owner}: run log and reports in {directory}")
        except Exception as error:
            warnings.warn(f"{self.owner}: could not write the health report ({error})", GradscopeWarning, stacklevel=2)
        return self.files


class SessionCallback:
    """What every gradscope trainer callback exposes of its :class:`TrainerSession`."""

    session: TrainerSession

    @property
    def monitor(self) -> Monitor | None:
        """The :class:`gradscope.Monitor` of the current (or last) run; None before the first."""
        return self.session.monitor

    @property
    def stop_reason(self) -> str | None:
        """Why gradscope stopped training (``halt_on`` or early stopping), or None."""
        return self.session.stop_reason
