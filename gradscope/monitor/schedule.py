"""The open step: which optimisation step a monitor has open, and what its schedule says of it.

A monitor numbers its optimisation steps from 0 (a resumed run from its checkpoint's count)
and samples steps ``0, every, 2 * every, ...``; one sampled step in ``histogram_every``
computes every row's 64-bin histogram, the others light rows (:mod:`gradscope.stats.layout`).
:class:`OpenStep` holds that number for every part of the monitor that needs it — the
backward receiver (:mod:`gradscope.monitor.backward`) reads it in each hook call, failures
are charged to it — and only the monitor moves it, at the end of ``mon.step()`` or when a
checkpoint is loaded.
"""

from __future__ import annotations


class OpenStep:
    """The step a monitor has open (module docstring).

    Args:
        every: sample steps ``0, every, 2 * every, ...``.
        histogram_every: one sampled step in this many computes histograms.

    Attributes:
        index: the open step: ``mon.step()`` calls so far (plus a loaded checkpoint's count).
        sampled: whether the open step is sampled (read in every hook call: a plain attribute).
    """

    __slots__ = ("every", "histogram_every", "index", "sampled")

    def __init__(self, every: int, histogram_every: int) -> None:
        self.every = every
        self.histogram_every = histogram_every
        self.move_to(0)

    def is_sampled(self, step: int) -> bool:
        return step % self.every == 0

    def has_histograms(self, step: int) -> bool:
        """Whether sampled ``step`` computes every row's histogram."""
        return step % (self.every * self.histogram_every) == 0

    def move_to(self, step: int) -> None:
        """Open ``step`` (the monitor's: ``mon.step()`` and ``load_state_dict``)."""
        self.index = step
        self.sampled = step % self.every == 0

    def state_dict(self) -> dict:
        """What a checkpoint keeps of it: the step count (``{"step": n}``)."""
        return {"step": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.move_to(int(state["step"]))

    def __repr__(self) -> str:
        return f"<OpenStep {self.index}{' (sampled)' if self.sampled else ''}, every={self.every}>"
