"""The suite's tiers (``tests/tiers.py``): what ``make test-fast`` leaves out, and how many
hypothesis examples each profile draws."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import tiers

TESTS = Path(__file__).resolve().parent


@pytest.mark.parametrize(
    ("path", "module", "fixtures", "nodeid", "expected"),
    [
        ("distributed/test_sharded.py", {}, [], "x", {"distributed"}),
        ("actions/test_distributed_actions.py", {"run_ranks": object()}, [], "x", {"distributed"}),
        ("kernels/test_grad_stats_kernel.py", {}, [], "x", {"interpreter"}),
        ("monitor/test_monitor.py", {}, ["kernel_device"], "x", {"interpreter"}),
        ("monitor/test_monitor.py", {}, [], "test_numbers[triton-step]", {"interpreter"}),
        ("integrations/test_lightning.py", {}, [], "x", {"integration"}),
        ("outputs/exporters/test_wandb.py", {}, [], "x", {"integration"}),
        ("test_packaging.py", {}, [], "x", {"integration"}),
        ("health/test_real_failures_moe.py", {}, [], "x", {"slow"}),
        ("test_demo.py", {}, [], "x", {"slow"}),
        ("monitor/test_monitor.py", {}, [], "test_numbers[numpy-step]", set()),
        ("stats/test_layout.py", {}, [], "x", set()),
    ],
)
def test_a_tests_tiers_follow_from_where_it_lives_and_what_it_uses(path, module, fixtures, nodeid, expected):
    assert tiers.tiers_of(TESTS / path, module, fixtures, nodeid) == expected


def test_examples_scale_with_the_profile(monkeypatch):
    monkeypatch.delenv("HYPOTHESIS_PROFILE", raising=False)
    assert tiers.examples(300) == 300
    monkeypatch.setenv("HYPOTHESIS_PROFILE", "fast")
    assert tiers.examples(300) == 60 and tiers.examples(10) == 5  # never fewer than 5


def test_the_fast_tier_leaves_out_every_marked_test_and_keeps_the_rest():
    """Collected for real: every test of the four tiers carries its marker, the fast selection
    holds none of them, and a plain unit test stays in it."""
    fast = "not distributed and not interpreter and not integration and not slow"

    def collected(*args: str) -> set[str]:
        out = subprocess.run(
            [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
            cwd=TESTS.parent,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return {line for line in out.splitlines() if "::" in line}

    subset = ["tests/distributed/test_replicas.py", "tests/stats/test_layout.py", "tests/test_demo.py"]
    every, kept = collected(*subset), collected(*subset, "-m", fast)
    assert kept and kept < every
    assert all(node.startswith("tests/stats/test_layout.py") for node in kept)
    assert {node for node in every if node.startswith("tests/stats/test_layout.py")} == kept
