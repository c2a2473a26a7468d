"""The docs site builds with warnings as errors (``mkdocs build --strict``, as ``make docs``).

CI runs only ``make test``, so this is where a broken link or anchor, a page missing from the
navigation, or an API page naming something the docstrings no longer have fails CI.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

for tool in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
    pytest.importorskip(tool, reason=f"needs the docs extra (pip install -e '.[docs]'; [dev] has it): {tool}")


def test_mkdocs_build_strict(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's notice about its successor
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(REPO / "mkdocs.yml")]
    result = subprocess.run(
        [*command, "--site-dir", str(site)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    api = (site / "reference" / "monitor" / "index.html").read_text()
    assert "accumulation_steps" in api, "the API page holds watch()'s docstring"
    assert (site / "benchmarks" / "results" / "stats-cpu-2026-11-22.json").is_file()
    assert (site / "search" / "search_index.json").is_file()
