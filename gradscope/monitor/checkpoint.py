"""Checkpoints: the part of a :class:`gradscope.Monitor` that a resumed run needs.

A training checkpoint saves the model, the optimizer and the scheduler; a monitor adds its
step count (so step numbers continue), early stopping's best value and patience, and the
learning-rate controller's scales (a rate the controller lowered stays lowered). Statistics
are not part of it: the run log holds them. :class:`Checkpointing` is a part of the monitor;
trainer integrations (:mod:`gradscope.integrations`) save and restore it with their own state.
"""

from __future__ import annotations


class Checkpointing:
    """``state_dict`` / ``load_state_dict`` for :class:`gradscope.Monitor`."""

    def state_dict(self) -> dict:
        """What a training checkpoint should keep of the monitor, as plain Python values: the
        step count and the state of the actions (early stopping's best value and patience,
        the learning-rate controller's scales). Statistics are not in it: they are in the
        run log. Save it with the model's and optimizer's state; see :meth:`load_state_dict`."""
        with self._lock:
            return {"version": 1, "step": self._step, "actions": self._actions_state()}

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict` in a new monitor of the resumed run, before its first
        ``mon.step()``: step numbers continue where the checkpoint left them, early stopping
        keeps its best value and patience, and a scaled learning rate stays scaled.

        Raises:
            RuntimeError: the monitor has already stepped.
            ValueError: ``state`` is not a gradscope monitor state.
        """
        if not isinstance(state, dict) or state.get("version") != 1 or "step" not in state:
            raise ValueError("Monitor.load_state_dict: not a gradscope monitor state (from Monitor.state_dict())")
        with self._lock:
            if self._step != 0 or self._pending:
                raise RuntimeError("Monitor.load_state_dict: call it before the first mon.step()")
            self._step = int(state["step"])
            self._engines.histogram = self.histogram_step(self._step)
            self._load_actions_state(state.get("actions", {}))
            if self._ddp is not None:
                self._ddp.measuring = self._step % self.every == 0
            if self._forward is not None and self._step % self.every:
                self._forward.remove()
