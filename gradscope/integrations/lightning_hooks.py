"""What gradscope's Lightning callback does at each of Lightning's hooks, for either namespace.

:class:`LightningHooks` holds the behaviour; :mod:`gradscope.integrations.lightning` and
:mod:`gradscope.integrations.pytorch_lightning` combine it with the ``Callback`` base class
of ``lightning.pytorch`` and of ``pytorch_lightning`` (a Trainer accepts only its own
namespace's callbacks). Nothing here imports Lightning.

Where the gradients are measured, and why there: at ``on_before_optimizer_step`` of the
first optimizer, in gradscope's ``mode="step"``, once per optimizer step. Lightning calls
that hook after the last backward pass of the step (so accumulation, including a shorter
last window of an epoch, needs no counting), after the precision plugin has unscaled the
gradients of an ordinary optimizer and *before* it clips them. A fused optimizer's gradients
are still scaled there (Lightning leaves unscaling to its ``step``): gradscope reads the
GradScaler's state and unscales in the same pass when, and only when, the gradients are
still scaled. Either way the numbers are of the unscaled, unclipped gradient.

Halting (``halt_on``): the hook is also the last moment before ``optimizer.step()`` applies
the update (Lightning calls it from the optimizer's closure, or just before the GradScaler's
step). A ``TrainingHalted`` from ``mon.step()`` is raised from it: the update is never
applied, Lightning ends ``fit`` (its ``on_exception`` hooks run: gradscope closes the run
log and writes the report there) and ``fit`` raises the ``TrainingHalted``, with its
``finding`` and ``report``. Setting ``trainer.should_stop`` instead would stop only after the
batch, once the optimizer had written the NaN into the weights. Early stopping is graceful
(``trainer.should_stop``): nothing in its step is wrong.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gradscope.actions.halting import TrainingHalted
from gradscope.integrations.session import SessionCallback, TrainerSession
from gradscope.monitor.scaler import scale_tensor

NAME = "GradscopeCallback"


def _validation_metrics(trainer) -> dict:
    """The metrics logged during the validation that just ended (Lightning's callback metrics
    also hold the training ones); all callback metrics if that cannot be told."""
    metrics = dict(trainer.callback_metrics)
    loop = getattr(trainer.fit_loop.epoch_loop, "val_loop", None)
    results = getattr(loop, "_results", None)  # private: no public list of what validation logged
    try:
        names = {result.meta.name for result in results.values()}
    except AttributeError:  # no results object, or one of another shape: not told
        return metrics
    return {k: v for k, v in metrics.items() if k in names or k.removesuffix("_epoch") in names}


class LightningHooks(SessionCallback):
    """gradscope in a Lightning ``Trainer``: ``Trainer(callbacks=[GradscopeCallback()])``.

    Args:
        log_layers: also log every layer's scalars (``grad_norm/<layer>``...) through the
            trainer's loggers; by default only the whole-model summary (``gradscope/...``,
            see :func:`gradscope.outputs.exporters.base.summary_scalars`).
        report: at the end of ``fit``, print the health report and write it (``report.txt``,
            and ``report.html`` with matplotlib) beside the run log.
        out_dir: where the run log and reports go (default: ``<trainer.log_dir>/gradscope``,
            one ``run-<date>-<time>`` directory per fit).
        watch_options: any option of :func:`gradscope.watch` (``every=``, ``halt_on=``,
            ``early_stopping=``, ``adapt_lr=``, ``track_updates=``, ``forward=``,
            ``exporters=``...), except ``mode``, ``scaler`` and ``accumulation_steps``, which
            come from the trainer. ``log_dir=None`` writes no run log.

    Attributes:
        monitor: the :class:`gradscope.Monitor` of the current (or last) fit; None before.
        stop_reason: why gradscope stopped training (``halt_on`` or early stopping), or None.

    Raises:
        gradscope.TrainingHalted: from ``trainer.fit``, when a finding named by ``halt_on``
            appears: at that step's ``on_before_optimizer_step``, so its update is never applied.
    """

    def __init__(self, *, log_layers: bool = False, report: bool = True, out_dir=None, **watch_options) -> None:
        super().__init__()
        self.session = TrainerSession(NAME, watch_options, log_layers, report, out_dir)
        self._optimizer = None
        self._scaler = None
        self._stepped = False

    @property
    def state_key(self) -> str:
        return NAME

    # ---- fit ----------------------------------------------------------------------------

    def on_fit_start(self, trainer, pl_module) -> None:
        self._optimizer = trainer.optimizers[0] if trainer.optimizers else None
        self._scaler = getattr(trainer.precision_plugin, "scaler", None)
        out = Path(trainer.log_dir or trainer.default_root_dir) / "gradscope"
        # strategy.model: DDP's wrapper when there is one (gradscope then reads the averaged
        # gradients and its topology), else the LightningModule (FSDP2 shards it in place).
        self.session.start(trainer.strategy.model, out, optimizer=self._optimizer, scaler=self._scaler, mode="step")

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        # Under a GradScaler the loss arrives scaled; in automatic optimization, divided by
        # accumulate_grad_batches (undone at the step).
        scale = scale_tensor(self._scaler)
        if scale is not None and isinstance(loss, torch.Tensor):
            loss = loss.detach().float() / scale.to(loss.device)
        self.session.add_loss(loss)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.monitor is None or (self._optimizer is not None and optimizer is not self._optimizer):
            return  # several optimizers (manual optimization): one gradscope step per step of the first
        per_pass = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
        self._stepped = True
        try:
            stop = self.session.step(steps_done=trainer.global_step, loss_scale=per_pass)
        except TrainingHalted:
            self._log_scalars(trainer)  # the halting step's, as Lightning logs a stopping step
            raise  # before optimizer.step(): Lightning ends fit (on_exception closes the session)
        if stop is not None:
            trainer.should_stop = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.monitor is None or not self._stepped:
            return
        self._stepped = False
        if self.session.check_stop() is not None:
            trainer.should_stop = True
        every = trainer.log_every_n_steps
        # Lightning logs this batch's metrics when its count of stepped batches, counting
        # this one, is a multiple of log_every_n_steps (global_step counts it already).
        if not every or (trainer.global_step % every and not trainer.should_stop):
            return
        self._log_scalars(trainer)

    def _log_scalars(self, trainer) -> None:
        """The newest sampled step's scalars, through every logger of the trainer."""
        if not trainer.loggers:
            return
        got = self.session.scalars()
        if got is not None:
            step, values = got
            for logger in trainer.loggers:
                logger.log_metrics(values, step=step)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.monitor is None or trainer.sanity_checking:
            return
        if self.session.evaluated(_validation_metrics(trainer)) is not None:
            trainer.should_stop = True

    def on_fit_end(self, trainer, pl_module) -> None:
        self.session.finish(f"gradscope: {type(pl_module).__name__}")

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.session.finish(f"gradscope: {type(pl_module).__name__} (stopped by {type(exception).__name__})")

    # ---- checkpoints ----------------------------------------------------------------------

    def state_dict(self) -> dict:
        return self.session.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.session.load_state_dict(state_dict)
