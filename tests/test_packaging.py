"""The wheel ships kernels/ as gradscope.kernels, never as a top-level ``kernels``.

Hugging Face's ``kernels`` distribution (which ``transformers`` requires) owns the top-level
name: neither our wheel nor our checkout's ``kernels/`` folder may shadow it.
"""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_wheel_contents(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "gradscope/kernels/grad_stats.py" in names
    assert "gradscope/kernels/launch.py" in names
    # No __init__.py: the folder is a namespace portion, so in a checkout it never shadows a
    # regular ``kernels`` package (see gradscope/_kernels_location.py).
    assert not [n for n in names if n.endswith("kernels/__init__.py")]
    assert "gradscope/stats/numba_kernels.py" in names
    assert not [n for n in names if n.startswith("kernels/")], "a top-level kernels package would shadow PyPI's"
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/"))]
    sources = [p.relative_to(REPO).as_posix() for p in (REPO / "gradscope").rglob("*.py")]
    assert sorted(set(sources) - set(names)) == [], "modules of the source tree missing from the wheel"
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "gradscope = gradscope.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_wheel_carries_the_license(wheel):
    """The Apache-2.0 text ships in the wheel's metadata (PEP 639), named by its METADATA."""
    archive = zipfile.ZipFile(wheel)
    (license_file,) = [n for n in archive.namelist() if n.endswith(".dist-info/licenses/LICENSE")]
    assert archive.read(license_file) == (REPO / "LICENSE").read_bytes()
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "APPENDIX" in text
    (metadata,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
    headers = archive.read(metadata).decode().split("\n\n", 1)[0].splitlines()
    assert "License-Expression: Apache-2.0" in headers
    assert "License-File: LICENSE" in headers


def test_installed_wheel_imports_and_runs(wheel, tmp_path):
    """Install the wheel alone into a folder and use it from a directory outside the repo."""
    target = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    script = (
        # The optional extras are made unimportable (torch may import some of them itself):
        # the core, the exporters' interface, the CLI module and the run log work without them.
        "import sys, importlib.abc, torch\n"
        "EXTRAS = {'tensorboard', 'mlflow', 'matplotlib', 'tqdm', 'selenium'}\n"
        "already = {m for m in sys.modules if m.split('.')[0] in EXTRAS}\n"
        "class Blocker(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] in EXTRAS:\n"
        "            raise ModuleNotFoundError(f'blocked optional extra {name}')\n"
        "sys.meta_path.insert(0, Blocker())\n"
        "import importlib.util, gradscope, gradscope.kernels, gradscope.exporters, gradscope.cli\n"
        f"assert gradscope.__file__.startswith({str(target)!r}), gradscope.__file__\n"
        "import gradscope.kernels.launch\n"
        f"assert list(gradscope.kernels.__path__) == [{str(target / 'gradscope' / 'kernels')!r}]\n"
        f"assert gradscope.kernels.launch.__file__.startswith({str(target)!r}), gradscope.kernels.launch.__file__\n"
        "print(int(gradscope.grad_stats([torch.tensor([0.0, 3.0, -4.0])]).zeros[0]))\n"
        "model = torch.nn.Linear(3, 1)\n"
        "with gradscope.watch(model, log_dir='run') as mon:\n"
        "    loss = model(torch.randn(2, 3)).sum(); loss.backward(); mon.step(loss=loss)\n"
        "assert gradscope.load_run('run').report().to_dict() == mon.report().to_dict()\n"
        "assert {m for m in sys.modules if m.split('.')[0] in EXTRAS} == already\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    env.pop("TRITON_INTERPRET", None)
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "1"
    # What the wheel put at the top level: our package and its metadata, no ``kernels``.
    assert sorted(p.name for p in target.iterdir() if not p.name.endswith(".dist-info")) == ["bin", "gradscope"]


def test_development_install_maps_kernels_into_the_package():
    """In this checkout's editable install, gradscope.kernels is the repository's kernels/."""
    import gradscope.kernels

    if not Path(gradscope.__file__).resolve().is_relative_to(REPO):
        pytest.skip("gradscope is not installed from this checkout")
    import gradscope.kernels.launch

    assert Path(gradscope.kernels.launch.__file__).resolve().parent == REPO / "kernels"
