"""How the monitor reports its own failures: never to training, always to the user, once.

A failure inside gradscope (a capture, a collective, the user's ``on_finding``) must not
stop or corrupt training. :class:`FailureReporting`, a part of :class:`gradscope.Monitor`,
records it: the step is marked failed when its measurements cannot be trusted (they read as
absent, never as zeros), the message goes to ``mon.errors`` (the first ``MAX_ERRORS``) and
one warning per kind of failure is given, on the logging rank only.
"""

from __future__ import annotations

import warnings

from gradscope.run import records
from gradscope.stats.reporting import GradscopeWarning

MAX_ERRORS = 100
"""Messages kept in ``mon.errors``."""


class FailureReporting:
    """Failures and one-time warnings, for :class:`gradscope.Monitor`."""

    def _fail(self, error: BaseException) -> None:
        """A failure while measuring the open step: the step is void."""
        step = self._step
        self._emit(records.Failed(step))
        if step % self.every == 0:
            self._failed_steps.add(step)
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(f"step {step}: {type(error).__name__}: {error}")
        self._warn_once(
            "failure",
            f"gradscope: monitoring failed at step {step} ({type(error).__name__}: {error}); "
            "training is not affected, the step is marked failed and later failures are listed in mon.errors",
        )

    def _report_error(self, key: str, message: str) -> None:
        """A failure that voids no measurement (acting on findings, a user callback)."""
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(message)
        self._warn_once(key, message)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            if self.is_logging_rank:  # other ranks of a distributed run stay silent
                warnings.warn(message, GradscopeWarning, stacklevel=3)
