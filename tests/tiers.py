"""The test suite's tiers: which tests are ``distributed``, ``interpreter``, ``integration`` or
``slow``, decided here once from where a test lives and what it uses (``conftest.py`` applies
it at collection), and how many examples a hypothesis test draws in each profile.

``make test`` runs every tier (CI keeps full coverage); ``make test-fast`` leaves the four
out and draws a fifth of the examples, for a quick loop while developing.
"""

from __future__ import annotations

import os
from pathlib import Path

TIERS = {
    "distributed": "spawns real torch.distributed ranks (gloo, several processes)",
    "interpreter": "runs the Triton kernels in Triton's CPU interpreter",
    "integration": "runs a real trainer, tracker or installer (Lightning, transformers, W&B, MLflow, pip)",
    "slow": "trains real models for many steps, or runs the demo and the benchmarks",
}
"""Each tier's marker and what it means (registered in ``conftest.py``)."""

_INTEGRATION_MODULES = {"test_core_install", "test_packaging", "test_kernels_location", "test_constraints"}
_SLOW_MODULES = {"test_demo", "test_benchmarks", "test_docs_site"}
_SLOW_PREFIXES = ("test_real_failures_",)

EXAMPLE_SCALE = {"ci": 1.0, "fast": 0.2}
"""Hypothesis examples drawn per profile, as a fraction of what a test asks for."""


def tiers_of(path: Path, module_globals: dict, fixturenames: list[str], nodeid: str) -> set[str]:
    """The tiers of one collected test (see the module docstring)."""
    parts, name = path.parts, path.stem
    found = set()
    if "distributed" in parts or "run_ranks" in module_globals:
        found.add("distributed")
    if "kernels" in parts or "kernel_device" in fixturenames or "triton" in nodeid.lower():
        found.add("interpreter")
    if "integrations" in parts or "exporters" in parts or name in _INTEGRATION_MODULES:
        found.add("integration")
    if name in _SLOW_MODULES or name.startswith(_SLOW_PREFIXES):
        found.add("slow")
    return found


def examples(asked: int, profile: str | None = None) -> int:
    """The number of hypothesis examples to draw for a test that asks for ``asked``, in
    ``profile`` (default: the running one, ``HYPOTHESIS_PROFILE``: ``ci`` unless set, ``fast``
    for ``make test-fast``); never fewer than 5."""
    scale = EXAMPLE_SCALE[profile or os.environ.get("HYPOTHESIS_PROFILE", "ci")]
    return max(5, round(asked * scale))
