"""Test set-up shared by every test module.

Without CUDA, the Triton kernels are tested in Triton's CPU interpreter: TRITON_INTERPRET
must be set before ``gradscope.kernels`` is first imported, which is why it is set here, at
collection time. With CUDA (a GPU machine), the kernels are compiled and tested on the GPU.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tiers
import torch
from hypothesis import HealthCheck, settings

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

for _profile in tiers.EXAMPLE_SCALE:
    settings.register_profile(
        _profile,
        deadline=None,
        max_examples=tiers.examples(60, _profile),
        # Our function-scoped fixtures (monkeypatched constants, the kernel device) are the same
        # for every generated example, so sharing them across examples is intended.
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
        print_blob=True,
    )
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config) -> None:
    for marker, meaning in tiers.TIERS.items():
        config.addinivalue_line("markers", f"{marker}: {meaning}")


def pytest_collection_modifyitems(config, items) -> None:
    """Mark each test with its tiers (:mod:`tiers`); the distributed ones share one xdist
    group, so that under ``-n`` they run one at a time (each spawns several processes)."""
    for item in items:
        module = getattr(item, "module", None)
        found = tiers.tiers_of(Path(str(item.path)), vars(module) if module else {}, item.fixturenames, item.nodeid)
        for tier in sorted(found):
            item.add_marker(getattr(pytest.mark, tier))
        if "distributed" in found:
            item.add_marker(pytest.mark.xdist_group("distributed"))


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def kernel_device() -> str:
    """Where the Triton kernels run in this session: CUDA if compiled, CPU if interpreted."""
    from gradscope.stats import triton_backend

    if not triton_backend.triton_importable():
        pytest.skip("Triton is not installed")
    return "cpu" if triton_backend.kernels().is_interpreted() else "cuda"


@pytest.fixture
def one_thread():
    """The small models many tests train run fastest on one thread, above all on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    """gradscope's wheel, built (without its dependencies) from this checkout's sources."""
    repo = Path(__file__).resolve().parents[1]
    # Built from a copy of the sources: setuptools' build/ folder in a checkout can hold
    # modules that no longer exist, and they would end up in the wheel.
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(repo / name, source / name)
    for name in ("gradscope", "kernels"):
        shutil.copytree(repo / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(out)]
    done = subprocess.run([*command, str(source)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = out.glob("gradscope_diagnostics-*.whl")
    return path
