"""``GradscopeCallback`` for the Hugging Face ``Trainer``: ``Trainer(..., callbacks=[GradscopeCallback()])``.

Where the gradients are measured, and why there: during the backward pass of each optimizer
step's last micro-batch, in gradscope's ``mode="backward"``. The Trainer clips gradients
*before* its first callback event after backward (``on_pre_optimizer_step``), so measuring
at an event would see clipped gradients; the backward hooks see each gradient as soon as it
is final, before clipping. Which micro-batch is last is what Accelerate says
(``GradientState.sync_gradients``, set by the Trainer before each micro-batch; right also
for an epoch's shorter last window). Under ``fp16`` the gradients are scaled during backward:
gradscope reads Accelerate's GradScaler and measures the unscaled gradient in the same pass.

The training loss is the Trainer's own: the ``loss`` the model returns (a forward hook reads
it on the device, no sync), combined over the step's micro-batches as the Trainer combines it
for its logged ``loss``: summed when the Trainer handed the model ``num_items_in_batch`` (the
model then normalised its loss over the whole accumulated batch, as causal LMs do), averaged
otherwise (the Trainer divides each by the number of micro-batches). A Trainer that computes
its loss outside the model gives the logged ``loss`` as the metric ``train_loss`` instead.
``on_evaluate`` metrics (``eval_loss``...) go to ``mon.log``. Whole-model scalars (and with
``log_layers=True`` every layer's) join the Trainer's log dictionary at each logging step,
so every ``report_to`` tracker receives them. The run log and reports go under
``<output_dir>/gradscope/``.

Halting (``halt_on``): the Trainer calls ``on_pre_optimizer_step`` just before
``optimizer.step()`` and reads ``control`` only after the step, too late to keep the update
out of the weights. So a ``TrainingHalted`` from ``mon.step()`` is raised from that event,
after gradscope has closed its run (run log, report): ``train()`` ends with it, the update
never applied. Early stopping sets ``control.should_training_stop``.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

try:
    from accelerate.state import GradientState
    from transformers import TrainerCallback
    from transformers.trainer_callback import CallbackHandler
except ImportError:
    raise ImportError(
        "gradscope.integrations.transformers needs transformers and accelerate: "
        "pip install 'gradscope-diagnostics[transformers]'"
    ) from None

from gradscope.actions.early_stopping import EarlyStopping
from gradscope.actions.halting import TrainingHalted
from gradscope.integrations.session import SessionCallback, TrainerSession
from gradscope.stats.reporting import GradscopeWarning

__all__ = ["GradscopeCallback"]

NAME = "GradscopeCallback"


def _output_loss(output) -> torch.Tensor | None:
    """The ``loss`` of a model's output (``ModelOutput``, dict or tuple-with-attribute), if any."""
    loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
    return loss if isinstance(loss, torch.Tensor) and loss.numel() == 1 else None


def _calling_handler() -> CallbackHandler | None:
    """The Trainer's ``CallbackHandler`` that is calling the current event, found on the stack
    (the Trainer hands callbacks neither itself nor its handler)."""
    frame = sys._getframe(1)
    for _ in range(6):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if isinstance(owner, CallbackHandler):
            return owner
        frame = frame.f_back
    return None


class GradscopeCallback(SessionCallback, TrainerCallback):
    """gradscope in a Hugging Face ``Trainer`` (see the module docstring).

    Args:
        log_layers: also put every layer's scalars (``grad_norm/<layer>``...) in the logs;
            by default only the whole-model summary (``gradscope/grad_norm``...).
        report: at the end of training, print the health report and write it beside the run log.
        out_dir: where run logs and reports go (default ``<output_dir>/gradscope``).
        watch_options: options of :func:`gradscope.watch` (``every=``, ``halt_on=``,
            ``early_stopping=``, ``track_updates=``...) except ``mode``, ``scaler`` and
            ``accumulation_steps``, which come from the Trainer. ``early_stopping=True``
            watches ``eval_loss``.

    Attributes:
        monitor: the :class:`gradscope.Monitor` of the current (or last) training run.
        stop_reason: why gradscope stopped training, or None.

    Raises:
        gradscope.TrainingHalted: from ``trainer.train()``, when a finding named by ``halt_on``
            appears: at that step's ``on_pre_optimizer_step``, so its update is never applied.
    """

    def __init__(self, *, log_layers: bool = False, report: bool = True, out_dir=None, **watch_options) -> None:
        if watch_options.get("early_stopping") is True:
            watch_options["early_stopping"] = EarlyStopping(metric="eval_loss")
        self.session = TrainerSession(NAME, watch_options, log_layers, report, out_dir)
        self._loss_hook = None
        self._first = False
        self._model_loss = False
        self._loss_summed = False  # this step's losses are shares of its loss (num_items_in_batch)

    def _go_first(self) -> None:
        """Run first at every event, so that the scalars this callback adds to a log
        dictionary reach the ``report_to`` callbacks, which the Trainer puts before the user's."""
        handler = _calling_handler()
        if handler is not None and self in handler.callbacks and handler.callbacks[0] is not self:
            handler.callbacks.remove(self)
            handler.callbacks.insert(0, self)
        self._first = handler is not None

    def on_init_end(self, args, state, control, **kwargs):
        self._go_first()

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if not self._first:
            self._go_first()  # added with trainer.add_callback after the Trainer was built
        if getattr(args, "world_size", 1) > 1:
            warnings.warn(
                f"{NAME}: the Trainer hands callbacks the unwrapped model, so in this multi-process run "
                "gradscope measures each rank's own gradient, before the ranks average it",
                GradscopeWarning,
                stacklevel=2,
            )
        scaler = getattr(optimizer, "scaler", None)  # Accelerate's optimizer wrapper holds it
        optimizer = getattr(optimizer, "optimizer", optimizer)
        sync = GradientState()
        self.session.start(
            model,
            Path(args.output_dir or ".") / "gradscope",
            optimizer=optimizer,
            scaler=scaler,
            mode="backward",
            accumulation_steps=lambda: sync.sync_gradients,
        )
        if self._loss_hook is not None:
            self._loss_hook.remove()
        self._loss_hook = model.register_forward_hook(self._take_loss, with_kwargs=True)

    def _take_loss(self, module, args, kwargs, output) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        loss = _output_loss(output)
        if loss is not None:
            self._model_loss = True
            # The Trainer's rule (Trainer.training_step): a model handed num_items_in_batch
            # returns its share of the step's loss, which the Trainer adds up; otherwise the
            # Trainer divides each micro-batch's loss by their number.
            self._loss_summed = kwargs.get("num_items_in_batch") is not None
            self.session.add_loss(loss)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        summed, self._loss_summed = self._loss_summed, False
        try:
            stop = self.session.step(steps_done=state.global_step, summed=summed)
        except TrainingHalted:
            self._end(model, " (halted)")  # on_train_end will not come
            raise  # before optimizer.step(): train() ends with it, the update never applied
        if stop is not None:
            control.should_training_stop = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.monitor is None or logs is None or "loss" not in logs:
            return  # only the training logs carry gradient statistics
        if not self._model_loss:  # the loss is computed outside the model: take the logged one
            self.session.evaluated({"train_loss": logs["loss"]})
        got = self.session.scalars()
        if got is not None:
            logs.update(got[1])

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.monitor is not None and metrics and self.session.evaluated(metrics) is not None:
            control.should_training_stop = True

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._end(model)

    def _end(self, model, note: str = "") -> None:
        """Remove the loss hook; close the run, print and write the report."""
        if self._loss_hook is not None:
            self._loss_hook.remove()
            self._loss_hook = None
        self.session.finish(f"gradscope: {type(model).__name__ if model is not None else 'model'}{note}")
