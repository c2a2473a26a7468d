"""The monitor's side of acting on findings: its responder, and what it exposes to the loop.

:class:`Acting` is a part of :class:`gradscope.Monitor`. Built from the watch options, the
watched rows and their parameters, the thresholds and the run's state, it builds the
:class:`~gradscope.actions.responder.Responder` (when the options ask for any action), lets
it see each record as it reaches the host (:meth:`Acting.observe`), has it respond at the
end of each ``mon.step()`` (:meth:`Acting.respond`, which returns the
:class:`~gradscope.actions.halting.TrainingHalted` to raise) and reads out early stopping
and the learning-rate controller (``should_stop``, ``best_step``, ``lr_scale``...).

It is given two callables: ``publish``, where the records of its actions go (the monitor
gives its run state and exporters), and ``report_error`` (the monitor's
:class:`~gradscope.monitor.failures.Failures`), for its own failures, which never reach
training. The health report a halt carries is asked for at each :meth:`Acting.respond`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.distributed as dist

from gradscope.actions.halting import TrainingHalted
from gradscope.actions.responder import Responder
from gradscope.health.report import HealthReport
from gradscope.health.thresholds import Thresholds
from gradscope.health.view import view_of
from gradscope.monitor.options import WatchOptions
from gradscope.monitor.watched import WatchedParams
from gradscope.run import records
from gradscope.run.state import RunState


class Acting:
    """Acting on findings, for one monitor (module docstring).

    Build it before the update tracker (:mod:`gradscope.monitor.updates`): the responder's
    optimizer hooks must run first, so that tracked updates are the ones applied.

    Args:
        options: the watch options (``on_finding``, ``halt_on``, ``early_stopping``,
            ``adapt_lr``, ``optimizer``, ``log_rank``).
        watched: the watched parameters and their rows (per-layer learning-rate control).
        thresholds: the run's thresholds (what the responder judges with).
        run: the run's state, from which the responder's view is cut.
        publish: called with each action record (a halt, a stop, a rate change).
        report_error: ``(key, message)``: a failure of acting on findings (one warning per key).

    Attributes:
        responder: the :class:`~gradscope.actions.responder.Responder`, None when the
            options ask for no action (every read-out then has its neutral value).
    """

    def __init__(
        self,
        options: WatchOptions,
        watched: WatchedParams,
        thresholds: Thresholds,
        run: RunState,
        publish: Callable[[records.Record], None],
        report_error: Callable[[str, str], None],
    ) -> None:
        self._thresholds = thresholds
        self._run = run
        self._publish = publish
        self._report_error = report_error
        self.responder: Responder | None = None
        if not options.acts:
            return
        row_params = [[] for _ in watched.row_names]
        for param, row in zip(watched.params, watched.row_of, strict=True):
            row_params[int(row)].append(param)
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        decider = (options.log_rank or 0) if distributed else None
        self.responder = Responder(
            options.on_finding,
            options.halt_rule,
            options.early_stopping,
            options.adapt_lr,
            options.optimizer,
            watched.row_names,
            row_params,
            thresholds,
            report_error,
            decider,
        )

    @property
    def acts(self) -> bool:
        """Whether there is anything to act with (else the monitor need not call in)."""
        return self.responder is not None

    def observe(self, record: records.Record) -> None:
        """A record reached the host: the responder screens it; the actions it causes (an
        early stop) are published."""
        if self.responder is not None and not isinstance(record, records.Action):
            for action in self.responder.observe(record):
                self._publish(action)

    def respond(self, step: int, report_of: Callable[[], HealthReport]) -> TrainingHalted | None:
        """After ``mon.step()`` closed ``step``: judge if due and act, publishing the action
        records. Returns the run's ``TrainingHalted`` to raise, or None (a failure of the
        responder itself is reported, never raised). ``report_of``: the run's health report
        now (what a halt carries)."""
        if self.responder is None:
            return None
        try:
            actions, halt = self.responder.respond(step, lambda: view_of(self._run, self._thresholds), report_of)
            for action in actions:
                self._publish(action)
        except Exception as error:
            self._report_error("responder", f"gradscope: acting on findings failed ({type(error).__name__}: {error})")
            return None
        return halt

    def close(self) -> None:
        if self.responder is not None:
            self.responder.close()

    # ---- checkpoints --------------------------------------------------------------------

    def state_dict(self) -> dict:
        """What a checkpoint keeps: early stopping's best value and patience (and in a
        distributed run the decision every rank received), the learning-rate controller's
        scales; empty without them."""
        responder = self.responder
        if responder is None:
            return {}
        state = {}
        if responder.stopper is not None:
            state["early_stopping"] = responder.stopper.state_dict()
            state["shared_stop"] = responder.shared_stop
        if responder.lr is not None:
            state["lr"] = responder.lr.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (what this monitor does not act with is ignored)."""
        responder = self.responder
        if responder is None:
            return
        if responder.stopper is not None and "early_stopping" in state:
            responder.stopper.load_state_dict(state["early_stopping"])
            shared = state.get("shared_stop")
            responder.shared_stop = tuple(shared) if shared is not None else None
        if responder.lr is not None and "lr" in state:
            responder.lr.load_state_dict(state["lr"])

    # ---- read by the training loop ------------------------------------------------------

    def _early_stop(self) -> tuple[bool, int | None, float | None, str | None]:
        """(should stop, best step, best value, reason); in a distributed run, the deciding
        rank's, as every rank received it at the same step (gradscope.actions.consensus)."""
        responder = self.responder
        stopper = responder.stopper if responder is not None else None
        if stopper is None:
            return False, None, None, None
        if responder.consensus is None:
            return stopper.should_stop, stopper.best_step, stopper.best_value, stopper.reason
        if responder.shared_stop is None:
            return False, None, None, None
        best_step, best_value = responder.shared_stop
        decider = responder.consensus.decider
        reason = stopper.reason if responder.decides else f"early stopping decided by rank {decider}"
        return True, best_step, best_value, reason

    @property
    def should_stop(self) -> bool:
        """Early stopping: whether the watched metric has stopped improving (False without it).
        In a distributed run every rank turns True at the same step."""
        return self._early_stop()[0]

    @property
    def stop_reason(self) -> str | None:
        """Why :attr:`should_stop` turned True ("val_loss has not improved ... for 5 evaluations")."""
        return self._early_stop()[3]

    @property
    def best_step(self) -> int | None:
        """Early stopping: the step of the watched metric's best value (the checkpoint to keep)."""
        return self._early_stop()[1]

    @property
    def best_value(self) -> float | None:
        """Early stopping: the watched metric's best value so far."""
        return self._early_stop()[2]

    @property
    def halted(self) -> TrainingHalted | None:
        """The latest :class:`TrainingHalted` raised by ``mon.step()`` (None if none)."""
        return self.responder.halted if self.responder is not None else None

    @property
    def lr_scale(self) -> float:
        """The learning-rate controller's scale of the optimizer's rate (1.0 without it)."""
        controller = self.responder.lr if self.responder is not None else None
        return controller.scale if controller is not None else 1.0
