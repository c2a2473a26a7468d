"""Waiting on asynchronous collectives without blocking the training thread needlessly."""

from __future__ import annotations


def works_done(works: list) -> bool:
    """Whether every collective in ``works`` has completed (without waiting)."""
    return all(work.is_completed() for work in works)


def wait_all(works: list) -> None:
    """Wait for every collective in ``works``."""
    for work in works:
        work.wait()
