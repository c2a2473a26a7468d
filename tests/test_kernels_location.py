"""The checkout's kernels/ folder is gradscope.kernels and never shadows Hugging Face's ``kernels``.

``transformers`` requires Hugging Face's ``kernels`` distribution (top-level import name
``kernels``). Run from the repository root (a REPL, ``python -c``, ``python -m pytest``) or
with the root on ``PYTHONPATH`` (our CLI and run-log tests, benchmark scripts), a fresh
interpreter must import transformers' kernel hub module, build a model and import our
``gradscope.kernels`` in the same process, whichever comes first.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gradscope import _kernels_location

REPO = Path(__file__).resolve().parents[1]

# Imports both in the given order, builds a transformers model, and checks that each name is
# the right distribution's: ``kernels`` from site-packages, ``gradscope.kernels`` the checkout's.
CHECK = """
import importlib, importlib.metadata, sys
from pathlib import Path
ORDER = {order!r}
for name in ORDER:
    importlib.import_module(name)
from transformers import GPT2Config, GPT2LMHeadModel
GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16))
import kernels, gradscope.kernels.launch
hub = importlib.metadata.distribution("kernels")
assert Path(kernels.__file__).resolve() == Path(hub.locate_file("kernels/__init__.py")).resolve(), kernels.__file__
assert hasattr(kernels, "get_kernel"), "not Hugging Face's kernels"
assert Path(gradscope.kernels.launch.__file__).resolve() == Path({launch!r}), gradscope.kernels.launch.__file__
print("ok", repr(sys.path[0]))
"""

ORDERS = [
    ("transformers.integrations.hub_kernels", "gradscope.kernels.launch"),
    ("gradscope.kernels.launch", "transformers.integrations.hub_kernels"),
]


def _check(order) -> str:
    return CHECK.format(order=list(order), launch=str(REPO / "kernels" / "launch.py"))


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    return {**env, **extra}


@pytest.fixture(scope="module", autouse=True)
def _needs_hub_kernels():
    pytest.importorskip("transformers")
    pytest.importorskip("kernels", reason="Hugging Face's kernels distribution is not installed")


@pytest.mark.parametrize("order", ORDERS, ids=["transformers-first", "gradscope-first"])
def test_python_c_in_the_repository_root(order):
    """``python -c`` puts the current folder (the root) first on sys.path."""
    run = subprocess.run(
        [sys.executable, "-c", _check(order)], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["ok", "''"]  # sys.path[0] == "": the root, first


def test_root_on_pythonpath_from_another_folder():
    """The root on PYTHONPATH, run from benchmarks/ (as the CLI tests and benchmark scripts do)."""
    run = subprocess.run(
        [sys.executable, "-c", _check(ORDERS[0])],
        cwd=REPO / "benchmarks",
        env=_env(PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]


def test_python_m_pytest_in_the_repository_root(tmp_path):
    """``python -m pytest`` run in the root (which it puts first on sys.path)."""
    test_file = tmp_path / "test_coexist.py"
    test_file.write_text("def test_coexist():\n" + "".join(f"    {line}\n" for line in _check(ORDERS[0]).splitlines()))
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path), str(test_file)],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "1 passed" in run.stdout


def test_the_checkout_folder_is_not_a_regular_package():
    """The mechanism: a folder without __init__.py loses to any regular ``kernels`` on sys.path."""
    assert not (REPO / "kernels" / "__init__.py").exists()
    assert _kernels_location.checkout_root(REPO / "gradscope") == REPO


def test_checkout_root_tells_a_checkout_from_an_installed_package(tmp_path):
    installed = tmp_path / "site" / "gradscope"
    (installed / "kernels").mkdir(parents=True)
    assert _kernels_location.checkout_root(installed) is None

    checkout = tmp_path / "clone"
    (checkout / "gradscope").mkdir(parents=True)
    (checkout / "kernels").mkdir()
    assert _kernels_location.checkout_root(checkout / "gradscope") is None  # no kernel sources there
    (checkout / "kernels" / "launch.py").write_text("")
    assert _kernels_location.checkout_root(checkout / "gradscope") == checkout


def test_the_finder_resolves_only_gradscope_kernels(tmp_path):
    (tmp_path / "kernels").mkdir()
    finder = _kernels_location.CheckoutKernelsFinder(tmp_path)
    spec = finder.find_spec("gradscope.kernels")
    assert spec is not None and list(spec.submodule_search_locations) == [str(tmp_path / "kernels")]
    assert finder.find_spec("kernels") is None
    assert finder.find_spec("gradscope.kernels.launch") is None  # found through the package's __path__
    assert finder == _kernels_location.CheckoutKernelsFinder(tmp_path)  # installed once per root
