"""How the monitor reports its own failures: never to training, always to the user, once.

A failure inside gradscope (a capture, a collective, the user's ``on_finding``) must not
stop or corrupt training. :class:`Failures`, a part of :class:`gradscope.Monitor`, records
it: a failure while a sampled step is measured voids that step (its measurements read as
absent, never as zeros) and is recorded as a :class:`~gradscope.run.records.Failed` record;
the message goes to ``mon.errors`` (the first :data:`MAX_ERRORS`) and one warning per kind
of failure is given, on the logging rank only.

It is given the sampling interval, whether this rank warns, and where a ``Failed`` record
goes (the monitor gives its run state and exporters); it owns the messages, the keys already
warned about and the void steps. Which step failed is the caller's to say: the monitor's
open step (:class:`~gradscope.monitor.schedule.OpenStep`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

from gradscope.run import records
from gradscope.stats.reporting import GradscopeWarning

MAX_ERRORS = 100
"""Messages kept in ``mon.errors``."""


class Failures:
    """A monitor's own failures and one-time warnings (module docstring).

    Args:
        every: the monitor's sampling interval (a failure at a sampled step voids it).
        is_logging_rank: whether warnings are given here (other ranks of a distributed
            run stay silent; their messages still go to :attr:`errors`).
        emit: called with the :class:`~gradscope.run.records.Failed` record of a failed step.

    Attributes:
        errors: messages of failures, oldest first (the first :data:`MAX_ERRORS`).
        warned: keys already warned about (one warning per key).
        failed_steps: sampled steps whose measurements are void, until they are recorded
            (:meth:`settle`).
    """

    def __init__(self, every: int, is_logging_rank: bool, emit: Callable[[records.Failed], None]) -> None:
        self.every = every
        self.is_logging_rank = is_logging_rank
        self._emit = emit
        self.errors: list[str] = []
        self.warned: set[str] = set()
        self.failed_steps: set[int] = set()

    def fail(self, step: int, error: BaseException) -> None:
        """A failure while measuring ``step`` (the open step): it is recorded as failed and,
        if sampled, void."""
        self._emit(records.Failed(step))
        if step % self.every == 0:
            self.failed_steps.add(step)
        self._keep(f"step {step}: {type(error).__name__}: {error}")
        self.warn_once(
            "failure",
            f"gradscope: monitoring failed at step {step} ({type(error).__name__}: {error}); "
            "training is not affected, the step is marked failed and later failures are listed in mon.errors",
        )

    def fail_elsewhere(self, step: int) -> None:
        """Another rank could not measure sampled ``step``: it is void here too (recorded as
        failed once; nothing to warn about on this rank)."""
        if step not in self.failed_steps:
            self._emit(records.Failed(step))
            self.failed_steps.add(step)

    def is_void(self, step: int) -> bool:
        """Whether sampled ``step``'s measurements are void (its results not yet recorded)."""
        return step in self.failed_steps

    def settle(self, step: int) -> bool:
        """Sampled ``step``'s results are being recorded: forget it; returns whether it is void."""
        if step in self.failed_steps:
            self.failed_steps.discard(step)
            return True
        return False

    def report_error(self, key: str, message: str) -> None:
        """A failure that voids no measurement (acting on findings, a user callback, a logger)."""
        self._keep(message)
        self.warn_once(key, message)

    def report_hook_errors(self, parts) -> None:
        """Report what the optimizer hooks of ``parts`` (update tracking, weight reading; None
        for a part that is off) met since the last call. Each part names its failure in
        ``FAILURE``: ``(key, what failed, what its step lacks)``. A hook's failure voids its own
        figures for that step, never a gradient statistic."""
        for part in parts:
            error = part.take_error() if part is not None else None
            if error is not None:
                key, what, lost = part.FAILURE
                self.report_error(
                    key, f"gradscope: {what} failed ({type(error).__name__}: {error}); that step has no {lost}"
                )

    def warn_once(self, key: str, message: str) -> None:
        """Warn with ``message`` the first time ``key`` is seen (on the logging rank only)."""
        if key not in self.warned:
            self.warned.add(key)
            if self.is_logging_rank:  # other ranks of a distributed run stay silent
                warnings.warn(message, GradscopeWarning, stacklevel=3)

    def _keep(self, message: str) -> None:
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(message)
