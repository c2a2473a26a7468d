"""What compare() accepts: run-log paths and loaded runs, with clear errors for anything else."""

from pathlib import Path

import pytest
from compared_runs import logged_run

import gradscope
from gradscope import RunLogError

OLD_LOG = Path(__file__).resolve().parent.parent / "outputs" / "data" / "run-e76eb21"  # schema 2, no tags


def test_paths_and_loaded_runs_are_labelled_by_their_directory(tmp_path):
    a = logged_run(tmp_path / "a", steps=3)
    cmp = gradscope.compare(a, gradscope.load_run(a))
    assert cmp.labels == (f"{a}#0", f"{a}#1")  # the same run twice: told apart by position
    assert cmp.divergence is None


def test_bad_inputs_are_clear_errors(tmp_path):
    a = logged_run(tmp_path / "a", steps=3)
    with pytest.raises(ValueError, match="no runs given"):
        gradscope.compare()
    with pytest.raises(TypeError, match="run 1 is a dict: pass a run-log directory"):
        gradscope.compare(a, {"loss": 1.0})
    with pytest.raises(FileNotFoundError, match="no run log at"):
        gradscope.compare(a, tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunLogError, match="no gradscope run log here"):
        gradscope.compare(a, tmp_path / "empty")
    with pytest.raises(ValueError, match="rtol must be a finite number >= 0"):
        gradscope.compare(a, rtol=float("nan"))


def test_an_old_log_without_tags_compares_and_groups_apart(tmp_path):
    new = logged_run(tmp_path / "new", steps=3, tags={"fold": 1})
    cmp = gradscope.compare(new, OLD_LOG, by="fold")
    assert cmp.runs[1].tags == {}
    assert [key for key, _ in cmp.groups] == [1, None]  # the run without the tag: a group of its own
    assert "loss [(no fold)]" in str(cmp)
    with pytest.raises(ValueError, match="the runs have no tags"):
        gradscope.compare(OLD_LOG, by="fold")
