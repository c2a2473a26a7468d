"""Checkpoints: what a resumed run needs of a :class:`gradscope.Monitor`, and its format.

A training checkpoint saves the model, the optimizer and the scheduler; a monitor adds its
step count (so step numbers continue: :class:`~gradscope.monitor.schedule.OpenStep`'s
state) and the state of its actions (early stopping's best value and patience, the
learning-rate controller's scales, so a rate the controller lowered stays lowered:
:class:`~gradscope.monitor.acting.Acting`'s state). Statistics are not part of it: the run
log holds them. ``Monitor.state_dict`` / ``load_state_dict`` put the parts' states together
and take them apart here; trainer integrations (:mod:`gradscope.integrations`) save and
restore them with their own state.
"""

from __future__ import annotations

VERSION = 1
"""Format of a monitor state: ``{"version": 1, "step": int, "actions": dict}``."""


def monitor_state(step: dict, actions: dict) -> dict:
    """A monitor's checkpoint state from its parts' states: the open step's
    (``{"step": n}``) and the actions' (a dict, empty without actions)."""
    return {"version": VERSION, **step, "actions": actions}


def parts_of(state: dict) -> tuple[dict, dict]:
    """``(step state, actions state)`` of a state :func:`monitor_state` made.

    Raises:
        ValueError: ``state`` is not a gradscope monitor state.
    """
    if not isinstance(state, dict) or state.get("version") != VERSION or "step" not in state:
        raise ValueError("Monitor.load_state_dict: not a gradscope monitor state (from Monitor.state_dict())")
    return {"step": state["step"]}, state.get("actions", {})
