"""CI's constraints file (``.ci/constraints.txt``): the versions ``make test`` installs.

It must cover every dependency pyproject names, satisfy pyproject's own bounds (a raised
minimum with a stale lock fails here, not in a confusing install), leave torch to
``TORCH_PIN``, and, in the venv ``make test`` builds, be what is actually installed.
"""

import importlib.metadata
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib", reason="needs Python 3.11+")

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / ".ci" / "constraints.txt"
SELF = "gradscope-diagnostics"


def pins(text: str) -> dict[str, Version]:
    """``name -> version`` of a constraints file's ``name==version`` lines."""
    found = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep and name.strip() and version.strip(), f"not a name==version pin: {line!r}"
        found[canonicalize_name(name)] = Version(version)
    return found


def project_requirements() -> list[Requirement]:
    """Every requirement pyproject.toml declares (core and every extra), bar our own extras."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        lines += extra
    requirements = [Requirement(line) for line in lines]
    return [r for r in requirements if canonicalize_name(r.name) != SELF]


def test_pins_parse_and_reject_other_forms():
    assert pins("# header\nfoo==1.2\nBar_baz==0.3.post1  # why\n") == {
        "foo": Version("1.2"),
        "bar-baz": Version("0.3.post1"),
    }
    with pytest.raises(AssertionError, match="not a name==version pin"):
        pins("foo>=1\n")


def test_the_lock_covers_and_satisfies_every_declared_requirement():
    locked = pins(LOCK.read_text())
    assert "torch" not in locked, "torch is pinned by TORCH_PIN in the Makefile, not by the lock"
    assert SELF not in locked
    for requirement in project_requirements():
        name = canonicalize_name(requirement.name)
        if name == "torch" or (requirement.marker is not None and not requirement.marker.evaluate({"extra": "dev"})):
            continue
        assert name in locked, f"{requirement} is not pinned in {LOCK.name}: run make lock"
        assert requirement.specifier.contains(locked[name], prereleases=True), (
            f"{LOCK.name} pins {name}=={locked[name]}, outside pyproject's {requirement}: run make lock"
        )


def test_make_test_installed_what_the_lock_says():
    """In the venv ``make test`` builds (``.venv`` of this checkout), the installed versions
    are the lock's: the constraints were really applied."""
    if Path(sys.prefix).resolve() != (REPO / ".venv").resolve():
        pytest.skip("not the checkout's .venv (make test-latest, or another environment)")
    locked = pins(LOCK.read_text())
    installed = {canonicalize_name(d.metadata["Name"]): Version(d.version) for d in importlib.metadata.distributions()}
    differ = {
        name: (str(version), str(installed.get(name)))
        for name, version in locked.items()
        if installed.get(name) != version
    }
    assert not differ, f"installed versions differ from {LOCK.name} (locked, installed): {differ}"
