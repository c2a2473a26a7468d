"""``Failures`` alone (``gradscope.monitor.failures``): a list as its emit target, no monitor.

A failure at a sampled step voids it and is recorded as ``Failed``; the message goes to
``errors`` (the first ``MAX_ERRORS``); one warning per key, on the logging rank only.
"""

import warnings

import pytest

from gradscope.monitor.failures import MAX_ERRORS, Failures
from gradscope.run import records
from gradscope.stats.reporting import GradscopeWarning


def failures(every: int = 2, is_logging_rank: bool = True) -> tuple[Failures, list]:
    emitted = []
    return Failures(every, is_logging_rank, emitted.append), emitted


def test_a_failure_at_a_sampled_step_voids_it_and_is_recorded():
    part, emitted = failures(every=2)
    with pytest.warns(GradscopeWarning, match=r"monitoring failed at step 4 \(RuntimeError: boom\)"):
        part.fail(4, RuntimeError("boom"))
    assert emitted == [records.Failed(4)]
    assert part.is_void(4) and not part.is_void(6)
    assert part.errors == ["step 4: RuntimeError: boom"]
    assert part.settle(4), "settling a void step says so"
    assert not part.is_void(4) and not part.settle(4), "and forgets it"


def test_a_failure_at_an_unsampled_step_is_recorded_but_voids_nothing():
    part, emitted = failures(every=2)
    with pytest.warns(GradscopeWarning):
        part.fail(3, ValueError("odd"))
    assert emitted == [records.Failed(3)]
    assert part.failed_steps == set()
    assert part.errors == ["step 3: ValueError: odd"]


def test_one_warning_per_key_every_message_kept():
    part, emitted = failures()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        part.fail(0, RuntimeError("first"))
        part.fail(2, RuntimeError("second"))
        part.report_error("responder", "acting failed once")
        part.report_error("responder", "acting failed twice")
        part.warn_once("order", "call mon.step() first")
        part.warn_once("order", "call mon.step() first")
    assert [str(w.message) for w in caught if issubclass(w.category, GradscopeWarning)] == [
        "gradscope: monitoring failed at step 0 (RuntimeError: first); training is not affected, "
        "the step is marked failed and later failures are listed in mon.errors",
        "acting failed once",
        "call mon.step() first",
    ]
    assert part.errors == [
        "step 0: RuntimeError: first",
        "step 2: RuntimeError: second",
        "acting failed once",
        "acting failed twice",
    ]
    assert part.warned == {"failure", "responder", "order"}
    assert emitted == [records.Failed(0), records.Failed(2)], "only failures while measuring are recorded"


def test_the_first_max_errors_are_kept():
    part, _ = failures(every=1)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        for step in range(MAX_ERRORS + 20):
            part.fail(step, RuntimeError(f"failure {step}"))
        part.report_error("late", "one more")
    assert len(part.errors) == MAX_ERRORS
    assert part.errors[0] == "step 0: RuntimeError: failure 0"
    assert part.errors[-1] == f"step {MAX_ERRORS - 1}: RuntimeError: failure {MAX_ERRORS - 1}"
    assert part.failed_steps == set(range(MAX_ERRORS + 20)), "every failed step is void, kept message or not"


def test_other_ranks_stay_silent_but_keep_their_errors():
    part, emitted = failures(is_logging_rank=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        part.fail(2, RuntimeError("quiet"))
        part.report_error("scalars", "could not read")
    assert part.errors == ["step 2: RuntimeError: quiet", "could not read"]
    assert emitted == [records.Failed(2)] and part.is_void(2)


def test_a_step_another_rank_could_not_measure_is_void_here_once():
    part, emitted = failures(every=1)
    part.fail_elsewhere(5)
    part.fail_elsewhere(5)
    assert emitted == [records.Failed(5)] and part.is_void(5)
    assert part.errors == [] and part.warned == set(), "nothing failed on this rank"
    with pytest.warns(GradscopeWarning):
        part.fail(7, RuntimeError("here"))
    part.fail_elsewhere(7)
    assert emitted == [records.Failed(5), records.Failed(7)], "a step void already is not recorded twice"
