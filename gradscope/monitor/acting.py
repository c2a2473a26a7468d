"""The monitor's side of acting on findings: its responder, and what it exposes to the loop.

:class:`Acting` is a part of :class:`gradscope.Monitor`: it builds the
:class:`~gradscope.actions.responder.Responder` from the watch options, feeds it records,
has it respond at the end of each ``mon.step()`` (raising
:class:`~gradscope.actions.halting.TrainingHalted` when asked to), and reads out early
stopping and the learning-rate controller (``should_stop``, ``best_step``, ``lr_scale``...).
"""

from __future__ import annotations

import torch.distributed as dist

from gradscope.actions.halting import TrainingHalted
from gradscope.actions.responder import Responder
from gradscope.health.view import view_of
from gradscope.run import records


class Acting:
    """Acting on findings, for :class:`gradscope.Monitor` (see the module docstring)."""

    _responder: Responder | None = None

    def _start_acting(self) -> None:
        """Build the responder (before the update tracker: its optimizer hooks must run first,
        so that tracked updates are the ones applied)."""
        options = self.options
        if not options.acts:
            return
        params, row_of = self._watched.params, self._watched.row_of
        row_params = [[] for _ in self._watched.row_names]
        for param, row in zip(params, row_of, strict=True):
            row_params[int(row)].append(param)
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        decider = (options.log_rank or 0) if distributed else None
        self._responder = Responder(
            options.on_finding,
            options.halt_rule,
            options.early_stopping,
            options.adapt_lr,
            options.optimizer,
            self._watched.row_names,
            row_params,
            self.thresholds,
            self._report_error,
            decider,
        )

    def _observe(self, record: records.Record) -> None:
        if self._responder is not None and not isinstance(record, records.Action):
            for action in self._responder.observe(record):
                self._emit(action)

    def _act(self, step: int) -> None:
        """Respond after ``mon.step()`` closed ``step``; raises the run's ``TrainingHalted``
        (and nothing else: a failure of the responder itself is reported, never raised)."""
        try:
            with self._lock:
                actions, halt = self._responder.respond(
                    step, lambda: view_of(self._run, self.thresholds), lambda: self.report()
                )
                for action in actions:
                    self._emit(action)
        except Exception as error:
            self._report_error("responder", f"gradscope: acting on findings failed ({type(error).__name__}: {error})")
            return
        if halt is not None:
            raise halt

    # ---- checkpoints --------------------------------------------------------------------

    def _actions_state(self) -> dict:
        responder = self._responder
        if responder is None:
            return {}
        state = {}
        if responder.stopper is not None:
            state["early_stopping"] = responder.stopper.state_dict()
            state["shared_stop"] = responder.shared_stop
        if responder.lr is not None:
            state["lr"] = responder.lr.state_dict()
        return state

    def _load_actions_state(self, state: dict) -> None:
        responder = self._responder
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
        responder = self._responder
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
        return self._responder.halted if self._responder is not None else None

    @property
    def lr_scale(self) -> float:
        """The learning-rate controller's scale of the optimizer's rate (1.0 without it)."""
        controller = self._responder.lr if self._responder is not None else None
        return controller.scale if controller is not None else 1.0
