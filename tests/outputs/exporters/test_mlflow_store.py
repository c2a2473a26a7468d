"""MLflow as a new user meets it: the docs' MLflow snippet run by a fresh process, in an
empty directory, with no MLflow settings (no ``MLFLOW_*`` variables), against the MLflow
installed here. Where MLflow 3's default store (``sqlite:///mlflow.db``) can be opened (SQLAlchemy
and Alembic installed, as the full ``mlflow`` package has them) the snippet logs there; where it
cannot (``mlflow-skinny`` alone) it fails at once with gradscope's error naming the fix, having
written no store anywhere."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mlflow", reason="needs the mlflow extra")

EXPORTERS = Path(__file__).resolve().parents[3] / "docs" / "guides" / "exporters.md"

SQL_STORE = all(importlib.util.find_spec(name) is not None for name in ("sqlalchemy", "alembic"))
"""Whether this environment can open MLflow's SQL stores (mlflow-skinny alone cannot)."""

PRELUDE = """
import json
import mlflow
import torch
import gradscope

torch.manual_seed(0)
model = torch.nn.Linear(4, 2)
"""

TRAIN = """
for _ in range(3):
    loss = model(torch.randn(8, 4)).square().mean()
    loss.backward()
    mon.step(loss=loss)
    model.zero_grad()
mon.close()
client = mlflow.MlflowClient()
runs = [run for e in client.search_experiments() for run in client.search_runs([e.experiment_id])]
print(json.dumps({
    "tracking_uri": mlflow.get_tracking_uri(),
    "runs": [
        {"status": run.info.status, "loss": sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss"))}
        for run in runs
    ],
    "errors": list(mon.errors),
}))
"""


def docs_snippet() -> str:
    """The first Python block of the exporters guide that makes an ``MLflowExporter``."""
    section = EXPORTERS.read_text()
    blocks = [block for block in re.findall(r"```python\n(.*?)```", section, flags=re.S) if "MLflowExporter(" in block]
    assert blocks, "the exporters guide shows how to export to MLflow"
    return blocks[0]


def run_as_a_new_user(tmp_path: Path, body: str) -> tuple[subprocess.CompletedProcess, Path, Path]:
    """Run ``body`` in a new process: an empty working directory, its own home, and none of
    this process's environment but ``PATH`` and ``PYTHONPATH`` (so no ``MLFLOW_*`` settings,
    and the packages this process sees)."""
    fresh, home = tmp_path / "fresh", tmp_path / "home"
    fresh.mkdir()
    home.mkdir()
    script = tmp_path / "snippet.py"
    script.write_text(body)
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(home)}
    if "PYTHONPATH" in os.environ:
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    done = subprocess.run(
        [sys.executable, str(script)], cwd=fresh, env=env, capture_output=True, text=True, timeout=300
    )
    return done, fresh, home


def test_the_docs_snippet_works_or_names_the_fix(tmp_path):
    snippet = docs_snippet()
    done, fresh, home = run_as_a_new_user(tmp_path, PRELUDE + snippet + TRAIN)
    written = sorted(str(p.relative_to(fresh)) for p in fresh.rglob("*"))
    if SQL_STORE:
        assert done.returncode == 0, done.stderr
        out = json.loads(done.stdout.strip().splitlines()[-1])
        assert out["tracking_uri"] == f"sqlite:///{fresh / 'mlflow.db'}", "MLflow 3's default store"
        assert out["errors"] == []
        assert [(run["status"], run["loss"]) for run in out["runs"]] == [("FINISHED", [0, 1, 2])]
        assert "mlflow.db" in written and all(p == "mlflow.db" or p.startswith("mlruns") for p in written), written
        return
    assert done.returncode != 0
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("ImportError: MLflowExporter: MLflow's tracking URI is 'sqlite:///"), done.stderr
    assert "MLflow 3's default" in error and "mlflow-skinny" in error
    assert "pip install sqlalchemy alembic" in error and "pip install mlflow" in error
    assert "MLFLOW_TRACKING_URI=http" in error
    assert written == [], "nothing written in the working directory"
    # nor a store in the home directory (`import mlflow` itself writes ~/.config/mlflow/telemetry.json)
    assert not [p for p in home.rglob("*") if p.name in ("mlflow.db", "mlruns")]


@pytest.mark.skipif(SQL_STORE, reason="MLflow can open its default SQL store here")
def test_an_explicit_tracking_uri_is_checked_too(tmp_path):
    """A SQL tracking URI given to the exporter (not MLflow's default) fails the same way, and
    says that the URI was given to it."""
    body = PRELUDE + (
        "from gradscope.exporters import MLflowExporter\n"
        "MLflowExporter(experiment='x', tracking_uri='postgresql://host/db')\n"
    )
    done, fresh, _ = run_as_a_new_user(tmp_path, body)
    error = done.stderr.strip().splitlines()[-1]
    assert done.returncode != 0 and "'postgresql://host/db' (given as tracking_uri=)" in error, done.stderr
    assert "MLflow 3's default" not in error and not any(fresh.iterdir())


def test_a_refused_file_store_is_named_before_anything_is_written(tmp_path):
    """MLflow 3 refuses its file store (maintenance mode) unless MLFLOW_ALLOW_FILE_STORE is set:
    the exporter says so when it is made, not later on gradscope's thread."""
    uri = (tmp_path / "fresh" / "mlruns").as_uri()
    body = PRELUDE + (
        "from gradscope.exporters import MLflowExporter\n"
        f"mlflow.set_tracking_uri({uri!r})\n"
        "MLflowExporter(experiment='x')\n"
    )
    done, fresh, _ = run_as_a_new_user(tmp_path, body)
    from mlflow import environment_variables

    if not hasattr(environment_variables, "MLFLOW_ALLOW_FILE_STORE"):
        assert done.returncode == 0, done.stderr  # an MLflow that still serves its file store
        return
    error = done.stderr.strip().splitlines()[-1]
    assert done.returncode != 0 and error.startswith("RuntimeError: MLflowExporter: MLflow's tracking URI is"), error
    assert "MLFLOW_ALLOW_FILE_STORE=true" in error and "sqlite:///" in error
    assert not any(fresh.iterdir())


@pytest.mark.parametrize("missing", [("sqlalchemy", "alembic"), ("alembic",)])
def test_a_sql_store_without_sqlalchemy_names_the_fix(monkeypatch, missing):
    """Where the packages are installed (the mlflow extra brings them), the skinny-only case is
    checked by hiding them from the store check's lookup: the error names what is missing and
    every fix."""
    from gradscope.outputs.exporters import mlflow as exporter

    real = importlib.util.find_spec
    monkeypatch.setattr(
        exporter.importlib.util, "find_spec", lambda name, *a: None if name in missing else real(name, *a)
    )
    with pytest.raises(ImportError) as raised:
        exporter.check_store("sqlite:///mlflow.db", "MLflow 3's default: none is set")
    message = str(raised.value)
    assert f"without {' and '.join(missing)}" in message and "MLflow 3's default" in message
    assert "pip install sqlalchemy alembic" in message and "MLFLOW_TRACKING_URI=http" in message
    exporter.check_store("http://localhost:5000", "given")  # a tracking server is MLflow's to reach
