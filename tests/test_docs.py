"""The examples in docstrings and the README quickstart run as written."""

import doctest
import re
from pathlib import Path

import pytest

import gradscope.stats.compute
import gradscope.stats.tensor_stats

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.parametrize("module", [gradscope.stats.tensor_stats, gradscope.stats.compute])
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0


def test_readme_quickstart_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # it writes runs/quickstart
    quickstart = README.read_text().split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", quickstart, flags=re.S)
    assert len(blocks) == 2, "the quickstart has a monitor example and a grad_stats example"
    marked = [line for line in blocks[0].splitlines() if re.search(r"# [1-9]\b", line)]
    assert len(marked) == 5, "five lines in the training loop, marked # 1 to # 5"
    monitored: dict = {}
    exec(compile(blocks[0], "README quickstart (watch)", "exec"), monitored)
    assert "gradscope health: HEALTHY" in capsys.readouterr().out
    assert monitored["norm"].shape == (100, 2)
    assert list(monitored["steps"]) == list(range(100))
    assert monitored["layers"] == ("0", "2")
    assert monitored["run"].report().to_dict() == monitored["mon"].report().to_dict()
    single: dict = {}
    exec(compile(blocks[1], "README quickstart (grad_stats)", "exec"), single)
    assert single["stats"].names == ("0.weight", "0.bias", "2.weight", "2.bias")
