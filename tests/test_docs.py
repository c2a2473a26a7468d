"""The examples in docstrings and the README quickstart run as written."""

import doctest
import re
from pathlib import Path

import pytest

import gradscope.statistics
import gradscope.tensor_stats

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.parametrize("module", [gradscope.tensor_stats, gradscope.statistics])
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0


def test_readme_quickstart_runs():
    quickstart = README.read_text().split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", quickstart, flags=re.S)
    assert len(blocks) == 2, "the quickstart has a monitor example and a grad_stats example"
    monitored: dict = {}
    exec(compile(blocks[0], "README quickstart (watch)", "exec"), monitored)
    assert monitored["norm"].shape == (100, 2)
    assert list(monitored["steps"]) == list(range(100))
    assert monitored["layers"] == ("0", "2")
    single: dict = {}
    exec(compile(blocks[1], "README quickstart (grad_stats)", "exec"), single)
    assert single["stats"].names == ("0.weight", "0.bias", "2.weight", "2.bias")
