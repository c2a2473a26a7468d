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
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no Python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README quickstart", "exec"), namespace)
    stats = namespace["stats"]
    assert len(stats) == 4
    assert stats.names == ("0.weight", "0.bias", "2.weight", "2.bias")
