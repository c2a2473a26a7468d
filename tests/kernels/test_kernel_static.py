"""The kernel as compiled for NVIDIA GPUs, without a GPU (``benchmarks/kernel_static.py``).

Every variant the launcher launches (light, full and gated kernel x dtype x GradScaler x
alignment, with its real tile sizes and options) is compiled for sm_90 under two Tritons:
the one installed here and Triton 3.6, what the GPU machines run (``make`` sets it up in
``.venv-triton36`` beside ``.venv``; without it those tests skip and say so). The machine
code is held to the budgets: registers, no spills, no warp shuffles in the fast loop, and
the light kernel's instructions per element. The interpreter cannot catch any of this, nor
compile-time errors.

Each Triton compiles all its variants once per session, in two processes.
"""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

REGISTER_BUDGET = {True: 128, False: 255}
"""Registers per thread, by 16-byte alignment: aligned variants (every real gradient) fit
four 4-warp programs per SM (64 KB of 4-byte registers each); misaligned ones stay within
the hardware's 255. No variant may spill."""

LIGHT_INSTRUCTIONS_PER_ELEMENT = {"bfloat16": 12.5, "float16": 12.5, "float32": 17.0}
"""SASS instructions per element in the light kernel's fast loop, aligned, with or without
a GradScaler scale (sm_90): about 10-11.5 measured under both Tritons; the full kernel's
histogram costs 17 (3.9) to 44 (3.6)."""


def _kernel_static():
    spec = importlib.util.spec_from_file_location("kernel_static", ROOT / "benchmarks" / "kernel_static.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def triton36_python() -> Path:
    """The interpreter of the Triton 3.6 venv beside this one (``.venv`` -> ``.venv-triton36``)."""
    prefix = Path(sys.prefix)
    return prefix.with_name(prefix.name + "-triton36") / "bin" / "python"


def _variants() -> list[dict]:
    """Every sm_90 variant; on sm_100 (Blackwell) the aligned 16/32-bit ones."""
    static = _kernel_static()
    blackwell = [v for v in static.variants([100]) if v["aligned"] and v["dtype"] in ("bfloat16", "float32")]
    return static.variants([90]) + blackwell


def _key(variant: dict) -> tuple:
    return tuple(variant[name] for name in ("kernel", "dtype", "arch", "scale", "aligned"))


@pytest.fixture(scope="session", params=["installed", "triton3.6"])
def static_report(request, tmp_path_factory) -> dict[tuple, dict]:
    """The static report of every variant, compiled by one Triton, by variant key."""
    pytest.importorskip("triton.backends.nvidia")
    static = _kernel_static()
    try:
        static.cuobjdump()
    except SystemExit:
        pytest.skip("Triton ships no cuobjdump here")
    python = Path(sys.executable)
    if request.param == "triton3.6":
        python = triton36_python()
        if not python.exists():
            pytest.skip(f"no Triton 3.6 venv at {python.parent.parent} (make sets it up: `make test`)")
    chosen = _variants()
    report = static.analyse_all(chosen, str(python), tmp_path_factory.mktemp(f"static-{request.param}"), jobs=2)
    if request.param == "triton3.6":
        versions = {r["triton"] for r in report if "triton" in r}
        assert all(v.startswith("3.6.") for v in versions), f"the 3.6 venv runs Triton {versions}"
    return {_key(r): r for r in report}


@pytest.mark.parametrize("variant", _variants(), ids=lambda v: "-".join(map(str, _key(v))))
def test_every_launched_variant_compiles_within_the_register_budget(static_report, variant):
    """Each variant lowers to machine code within the register budget and without spills,
    and the one-tensor launch is not specialised into a constant (it must compile the same
    kernel). The aligned 16/32-bit variants also compile for sm_100 within the same budget
    (the fast-loop reading of the SASS is sm_90's only)."""
    report = static_report[_key(variant)]
    assert "error" not in report, report.get("error")
    assert report["spills"] == 0, report
    assert 0 < report["registers"] <= REGISTER_BUDGET[variant["aligned"]], report
    assert "num_tensors" in report["do_not_specialize"]  # a one-tensor launch compiles the same kernel
    assert report["final_steps_262m"] <= 32, report


@pytest.mark.parametrize(
    "variant", [v for v in _variants() if v["arch"] == 90], ids=lambda v: "-".join(map(str, _key(v)))
)
def test_fast_loop_moves_no_values_between_threads(static_report, variant):
    """Each lane reduces its own elements: the fast loop has no warp shuffles (under Triton
    3.6 a 3-D tile once put a lane's rows on four threads, 40 shuffles per step), holds
    the tile's loads (16-byte ones when aligned: 32 bytes or more per thread) and, in the
    light kernel, no barrier (nothing is shared)."""
    report = static_report[_key(variant)]
    assert "error" not in report, report.get("error")
    assert report["loop_instructions"] > 0, "no fast loop found in the SASS"
    assert report["loop_shuffles"] == 0, report
    assert report["loop_loads"] >= 1, report
    if variant["aligned"]:
        assert report["load_bytes_per_thread"] >= 32, report
    if variant["kernel"] == "light":
        assert report["loop_barriers"] == 0, report


@pytest.mark.parametrize(
    "variant",
    [v for v in _variants() if v["arch"] == 90 and v["kernel"] == "light" and v["aligned"] and v["dtype"] != "float64"],
    ids=lambda v: "-".join(map(str, _key(v))),
)
def test_light_kernel_instructions_per_element(static_report, variant):
    """The light kernel's fast loop, aligned, stays within its instruction budget."""
    report = static_report[_key(variant)]
    assert "error" not in report, report.get("error")
    budget = LIGHT_INSTRUCTIONS_PER_ELEMENT[variant["dtype"]]
    assert report["instructions_per_element"] <= budget, report
