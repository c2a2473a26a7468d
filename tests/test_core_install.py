"""A core install, with no Triton and no extras: what a CPU-only ``pip install`` gives.

The environment is a real virtual environment holding gradscope's wheel and exactly the
distributions its core requirements need (torch, numpy and theirs, taken from this test
environment by links, not copied), so ``import triton`` fails there as on a laptop. In it,
``import gradscope``, ``grad_stats``, ``watch``, the report, the run log and the CLI work, and
CUDA tensors meeting the missing Triton get an error that says how to install it.
"""

import importlib.metadata
import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

CORE_NAMES = {"torch", "numpy"}


def core_requirements(wheel: Path) -> list[Requirement]:
    """The wheel's requirements outside every extra, as a plain ``pip install`` resolves them."""
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = archive.read(name).decode()
    requirements = [
        Requirement(line.split(":", 1)[1]) for line in metadata.splitlines() if line.startswith("Requires-Dist:")
    ]
    return [r for r in requirements if r.marker is None or r.marker.evaluate({"extra": ""})]


def closure(requirements: list[Requirement]) -> dict[str, importlib.metadata.Distribution]:
    """The installed distributions that ``requirements`` need, recursively (no extras)."""
    found: dict[str, importlib.metadata.Distribution] = {}
    todo = list(requirements)
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        if name in found:
            continue
        found[name] = dist = importlib.metadata.distribution(requirement.name)
        for line in dist.requires or []:
            child = Requirement(line)
            if child.marker is None or child.marker.evaluate({"extra": ""}):
                todo.append(child)
    return found


def link_distributions(dists, folder: Path) -> None:
    """Link each distribution's top-level files and folders (its RECORD's) into ``folder``."""
    folder.mkdir()
    for dist in dists:
        tops = {Path(str(f)).parts[0] for f in dist.files or []}
        for top in sorted(tops - {"..", "__pycache__"}):
            source = Path(dist.locate_file(top))
            if source.exists() and not (folder / top).exists():
                (folder / top).symlink_to(source)


@pytest.fixture(scope="module")
def core_env(wheel, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("core-env")
    env = root / "venv"
    venv.create(env, with_pip=False)
    (site,) = env.glob("lib/python3*/site-packages")
    deps = closure(core_requirements(wheel))
    link_distributions(deps.values(), root / "deps")
    (site / "core-deps.pth").write_text(str(root / "deps") + "\n")
    python = env / "bin" / "python"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "--no-index",
            "--quiet",
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return env


def run_in(env: Path, *args, cwd: Path) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET", "GRADSCOPE_DEBUG")}
    return subprocess.run(
        list(args), cwd=cwd, env={**clean, "PYTHONNOUSERSITE": "1"}, capture_output=True, text=True, timeout=300
    )


def test_core_requirements_hold_no_triton(wheel):
    names = {canonicalize_name(r.name) for r in core_requirements(wheel)}
    assert names == CORE_NAMES
    # ...and neither do theirs, for the CPU torch installed here (a CUDA torch brings Triton itself).
    assert "triton" not in closure(core_requirements(wheel))


def test_the_triton_extra_asks_for_triton(wheel):
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = archive.read(name).decode()
    assert 'Requires-Dist: triton>=3.2; extra == "triton"' in metadata.splitlines()


SCRIPT = r"""
import importlib.util, sys
assert importlib.util.find_spec("triton") is None, "triton is importable here"
assert importlib.util.find_spec("numba") is None, "numba is importable here"
import numpy as np, torch, gradscope
from gradscope.stats import dispatch

values = torch.tensor([0.0, 3.0, -4.0, float("nan"), 0.5], dtype=torch.float32)
stats = gradscope.grad_stats([values])
assert int(stats.zeros[0]) == 1 and int(stats.nonfinite[0]) == 1, stats
assert float(stats.max_abs[0]) == 4.0, stats.max_abs

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
with gradscope.watch(model, log_dir="run") as mon:
    for _ in range(4):
        opt.zero_grad()
        loss = model(torch.randn(16, 4)).square().mean()
        loss.backward()
        mon.step(loss=loss)
        opt.step()
    # The first row is the first Linear: its weight's and bias's gradients together.
    expected = torch.cat([p.grad.double().flatten() for p in model[0].parameters()]).norm().item()
    latest = mon.stats()
    assert latest.names[0] == "0", latest.names
    got = float(latest.norm[0])
    assert abs(got - expected) <= 1e-6 * expected, (got, expected)
report = mon.report()
assert gradscope.load_run("run").report().to_dict() == report.to_dict()

for call in (lambda: dispatch.engine_for(torch.device("cuda", 0), "auto", "parameters", caller="watch"),
             lambda: gradscope.grad_stats([torch.ones(2)], backend="triton")):
    try:
        call()
    except ValueError as error:
        assert "Triton is not installed: pip install triton" in str(error), error
    else:
        raise AssertionError("no error without Triton")
assert "triton" not in sys.modules
print("ok")
"""


def test_import_statistics_monitor_report_and_run_log_without_triton(core_env, tmp_path):
    done = run_in(core_env, core_env / "bin" / "python", "-c", SCRIPT, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok"
    # The CLI reads the run back in the same environment.
    report = run_in(core_env, core_env / "bin" / "gradscope", "report", "run", cwd=tmp_path)
    assert report.returncode == 0, report.stderr[-3000:]
    assert "gradscope health:" in report.stdout
    version = run_in(core_env, core_env / "bin" / "gradscope", "--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("gradscope "), version.stderr
