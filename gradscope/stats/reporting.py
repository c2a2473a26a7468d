"""``GradscopeWarning``: the category of every warning gradscope gives.

gradscope never lets its own failure reach training: a kernel that fails, an exporter that
raises, a torn run log are reported with a warning (and in ``mon.errors``) while training goes
on; a monitor used out of order (``mon.step()`` after ``close()``, parameters added after
``watch()``) is told so once. They share one category, a ``RuntimeWarning``, so that a user can filter them as one
(``warnings.filterwarnings("ignore", category=gradscope.GradscopeWarning)``) and a test suite
can make them errors unless a test expects them (this project's does).
"""

from __future__ import annotations


class GradscopeWarning(RuntimeWarning):
    """A warning from gradscope: a failure it survived, data it lost, a call out of order."""
