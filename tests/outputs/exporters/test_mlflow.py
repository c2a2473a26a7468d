"""MLflow export, against a local file store, read back with MlflowClient."""

import numpy as np
import pytest
import torch

import gradscope

mlflow = pytest.importorskip("mlflow", reason="needs the mlflow extra")
from mlflow.tracking import MlflowClient  # noqa: E402
from models import TinyTransformer  # noqa: E402

from gradscope.outputs.exporters import MLflowExporter  # noqa: E402
from gradscope.outputs.exporters.mlflow import metric_key  # noqa: E402


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks to opt in to a file store
    uri = (tmp_path / "mlruns").as_uri()
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


def history(client, run_id, key):
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def test_scalars_reach_the_active_run(store):
    torch.manual_seed(0)
    model = TinyTransformer()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(3)
    with mlflow.start_run() as run:
        with gradscope.watch(
            model, every=2, optimizer=opt, track_updates=True, exporters=[MLflowExporter(budget=None)]
        ) as mon:
            for _ in range(7):
                x, y = torch.randn(8, 5, 32, generator=g), torch.randint(0, 4, (8,), generator=g)
                loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
                mon.step(loss=loss, accuracy=0.5)
                opt.step()
                opt.zero_grad()
    client = MlflowClient(store)
    run_id = run.info.run_id
    losses = history(client, run_id, "loss")
    assert list(losses) == list(range(7))
    assert list(losses.values()) == pytest.approx(mon.history("loss").values.tolist(), rel=1e-12)
    assert history(client, run_id, "accuracy") == dict.fromkeys(range(7), 0.5)
    keys = set(client.get_run(run_id).data.metrics)
    for field, prefix in [("norm", "grad_norm"), ("zero_frac", "grad_zero_frac"), ("update_ratio", "update_ratio")]:
        series = mon.history(field)
        for r, row in enumerate(mon.rows):
            assert f"{prefix}/{row}" in keys
            expected = {int(s): v for s, v in zip(series.steps, series.values[:, r], strict=True) if np.isfinite(v)}
            got = history(client, run_id, f"{prefix}/{row}")
            assert got.keys() == expected.keys()
            assert list(got.values()) == pytest.approx([expected[s] for s in got], rel=1e-12)


def test_batches_stay_within_mlflows_limit(store):
    sent = []
    model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(300)])
    with mlflow.start_run() as run:
        exporter = MLflowExporter(budget=None)
        log_batch = exporter.client.log_batch

        def recording_log_batch(run_id, metrics):  # passes every request through to MLflow
            sent.append(len(metrics))
            return log_batch(run_id, metrics=metrics)

        exporter.client.log_batch = recording_log_batch
        with gradscope.watch(model, exporters=[exporter]) as mon:
            for _ in range(2):
                loss = model(torch.randn(3, 4)).pow(2).mean()
                loss.backward()
                mon.step(loss=loss)
    assert max(sent) <= 1000 and sum(sent) >= 2 * 300 * 4
    assert len(MlflowClient(store).get_metric_history(run.info.run_id, "grad_norm/299")) == 2


def test_an_explicit_run_id_needs_no_active_run(store):
    client = MlflowClient(store)
    experiment = client.create_experiment("gradscope")
    run_id = client.create_run(experiment).info.run_id
    model = torch.nn.Linear(3, 1)
    with gradscope.watch(model, exporters=[MLflowExporter(run_id, prefix="gs/", budget=None)]) as mon:
        loss = model(torch.randn(2, 3)).sum()
        loss.backward()
        mon.step(loss=loss)
    assert set(client.get_run(run_id).data.metrics) >= {"gs/loss", "gs/grad_norm/_root_"}


def test_an_experiment_gets_a_run_of_its_own(store):
    """``experiment=``: a new run in that experiment (created), started with the monitor and
    finished at close(); no run exists before watch()."""
    client = MlflowClient(store)
    exporter = MLflowExporter(experiment="gradscope-own", budget=None)
    assert exporter.run_id is None and client.get_experiment_by_name("gradscope-own") is None
    model = torch.nn.Linear(3, 1)
    with gradscope.watch(model, exporters=[exporter]) as mon:
        for _ in range(2):
            loss = model(torch.randn(2, 3)).sum()
            loss.backward()
            mon.step(loss=loss)
    assert mon.errors == []
    run = client.get_run(exporter.run_id)
    assert run.info.experiment_id == client.get_experiment_by_name("gradscope-own").experiment_id
    assert run.info.status == "FINISHED" and mlflow.active_run() is None
    assert history(client, exporter.run_id, "loss").keys() == {0, 1}
    again = MLflowExporter(experiment="gradscope-own")  # the experiment exists now: reused
    with gradscope.watch(model, exporters=[again]) as mon:
        model(torch.randn(2, 3)).sum().backward()
        mon.step()
    assert again.run_id != exporter.run_id
    assert client.get_run(again.run_id).info.experiment_id == run.info.experiment_id
    with pytest.raises(ValueError, match="not both"):
        MLflowExporter("some-run", experiment="gradscope-own")


def test_no_active_run_is_a_clear_error(store):
    with pytest.raises(ValueError, match="no active MLflow run"):
        MLflowExporter()


def test_keys_keep_module_paths_and_lose_what_mlflow_refuses():
    assert metric_key("grad_norm/encoder.layers.0.self_attn") == "grad_norm/encoder.layers.0.self_attn"
    assert metric_key("grad_norm/(root)") == "grad_norm/_root_"
    assert metric_key("a<b>|c") == "a_b__c"


def test_a_bad_budget_is_refused(store):
    with pytest.raises(ValueError, match="MLflowExporter: budget must be a fraction"):
        MLflowExporter("some-run", budget=-1.0)
