"""The package's folders are the stages of the data flow, and imports only go downward.

stats -> distributed -> run -> health -> comparison -> outputs -> actions -> monitor -> integrations -> the
top (``gradscope`` itself, ``cli``, ``demo`` and the old import paths). A module may import gradscope modules
of its own stage or of stages before it, never of a later one: every import statement of
every module is read (those inside functions too), so a lazy import cannot hide an upward
dependency.
"""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = ("stats", "distributed", "run", "health", "comparison", "outputs", "actions", "monitor", "integrations", "top")


def module_name(path: Path) -> str:
    if path.is_relative_to(REPO / "kernels"):
        parts = ("gradscope", "kernels", *path.relative_to(REPO / "kernels").with_suffix("").parts)
    else:
        parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def stage_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] == "kernels":
        return "stats"  # the kernels compute statistics rows
    if len(parts) > 1 and parts[1] in STAGES:
        return parts[1]
    return "top"


def gradscope_imports(source: str) -> list[tuple[int, str]]:
    """(line, module) of every gradscope module a module's source imports, at any depth."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            # ``from gradscope.stats import layout`` imports the module gradscope.stats.layout
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return [(line, name) for line, name in found if name == "gradscope" or name.startswith("gradscope.")]


def upward_imports(module: str, source: str) -> list[str]:
    """The imports of ``module`` (given its source) that reach a later stage than its own."""
    here = STAGES.index(stage_of(module))
    return [
        f"line {line}: {name} ({stage_of(name)})"
        for line, name in gradscope_imports(source)
        if STAGES.index(stage_of(name)) > here
    ]


SOURCES = sorted([*(REPO / "gradscope").rglob("*.py"), *(REPO / "kernels").rglob("*.py")])


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_imports_only_go_down_the_data_flow(path):
    module = module_name(path)
    upward = upward_imports(module, path.read_text())
    assert not upward, f"{module} is in stage {stage_of(module)!r} and imports from later stages: {upward}"


def test_every_stage_is_a_package_and_the_check_sees_it():
    assert len(SOURCES) > 40
    for stage in STAGES[:-1]:
        assert (REPO / "gradscope" / stage / "__init__.py").is_file()
        members = [p for p in SOURCES if stage_of(module_name(p)) == stage]
        assert len(members) >= 3, stage


def test_the_check_catches_an_upward_import():
    """The rule is not vacuous: a lazy import of the monitor from a stats module is reported,
    an import of the stage below is not."""
    source = "from gradscope.stats import layout\n\n\ndef f():\n    from gradscope.monitor import watch\n"
    assert upward_imports("gradscope.stats.example", source) == [
        "line 5: gradscope.monitor (monitor)",
        "line 5: gradscope.monitor.watch (monitor)",
    ]
    assert upward_imports("gradscope.monitor.example", source) == []
    assert upward_imports("gradscope.kernels.example", "import gradscope\n") == ["line 1: gradscope (top)"]
