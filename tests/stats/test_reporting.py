"""Every warning gradscope gives is a ``GradscopeWarning`` (one category users can filter and
this test suite turns into errors unless a test expects them)."""

import ast
import warnings
from pathlib import Path

import pytest

import gradscope
from gradscope.stats.reporting import GradscopeWarning

REPO = Path(__file__).resolve().parents[2]


def warn_calls(source: str) -> list[ast.Call]:
    calls = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "warn":
            if isinstance(node.func.value, ast.Name) and node.func.value.id == "warnings":
                calls.append(node)
    return calls


def category_of(call: ast.Call) -> str | None:
    given = [k.value for k in call.keywords if k.arg == "category"] or call.args[1:2]
    return given[0].id if given and isinstance(given[0], ast.Name) else None


def test_every_warning_of_the_package_is_a_gradscope_warning():
    sources = sorted([*(REPO / "gradscope").rglob("*.py"), *(REPO / "kernels").rglob("*.py")])
    found = {}
    for path in sources:
        for call in warn_calls(path.read_text()):
            found[f"{path.relative_to(REPO)}:{call.lineno}"] = category_of(call)
    assert len(found) >= 8, found  # the check sees the package's warnings
    assert {site: category for site, category in found.items() if category != "GradscopeWarning"} == {}


def test_the_category_is_a_runtime_warning_exported_at_the_top():
    assert gradscope.GradscopeWarning is GradscopeWarning and issubclass(GradscopeWarning, RuntimeWarning)


def test_the_checker_catches_a_warning_without_the_category():
    (call,) = warn_calls("import warnings\nwarnings.warn('x', RuntimeWarning)\n")
    assert category_of(call) == "RuntimeWarning"
    (call,) = warn_calls("import warnings\nwarnings.warn('x')\n")
    assert category_of(call) is None


def test_an_unexpected_gradscope_warning_fails_a_test():
    """pyproject's filterwarnings turns GradscopeWarning into an error in this test suite."""
    with pytest.raises(GradscopeWarning):
        warnings.warn("gradscope: not expected", GradscopeWarning, stacklevel=1)
