"""GradscopeCallback's scalars through Lightning's loggers: CSV, TensorBoard, W&B, MLflow.

At Lightning's own logging cadence (the steps where it logs the module's ``train_loss``), the
whole-model summary by default and every layer with ``log_layers=True``; values compared with
the monitor's history and with float64 references the module records (:mod:`lightning_models`).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("lightning", reason="needs the lightning extra")

import lightning.pytorch as L
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning_models import loader, logged_at, make_trainer, module_class, read_csv_rows, reference

from gradscope.integrations.lightning import GradscopeCallback

torch.set_num_threads(1)

TRAIN, BATCH, VAL = 28, 4, 16  # 7 training batches per epoch


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    """Two epochs of 7 steps in full precision, logged to CSV and TensorBoard every 2 steps."""
    root = tmp_path_factory.mktemp("loggers")
    module = module_class(L)()
    callback = GradscopeCallback()
    loggers = [CSVLogger(root, name="csv"), TensorBoardLogger(root, name="tb")]
    trainer = make_trainer(L, root, [callback], max_epochs=2, logger=loggers, log_every_n_steps=2)
    trainer.fit(module, loader(TRAIN, BATCH), loader(VAL, 8, seed=1))
    rows = read_csv_rows(root / "csv" / "version_0" / "metrics.csv")
    return SimpleNamespace(root=root, module=module, callback=callback, trainer=trainer, rows=rows)


def test_csv_rows_follow_lightnings_logging_cadence(logged_run):
    grad_norm = logged_at(logged_run.rows, "gradscope/grad_norm")
    train_loss = logged_at(logged_run.rows, "train_loss")
    assert logged_run.trainer.global_step == 14
    assert sorted(train_loss) == [1, 3, 5, 7, 9, 11, 13]
    assert sorted(grad_norm) == sorted(train_loss)


def test_csv_values_equal_the_monitors_history(logged_run):
    mon, module, rows = logged_run.callback.monitor, logged_run.module, logged_run.rows
    steps = sorted(logged_at(rows, "gradscope/grad_norm"))
    norms = reference(module.grads, mon.rows, "norm")[steps]
    total = np.sqrt((norms**2).sum(axis=1))
    sumsq = mon.history("sumsq").values[steps]
    np.testing.assert_allclose(np.sqrt(sumsq.sum(axis=1)), total, rtol=1e-6)

    def column(name):
        logged = logged_at(rows, name)
        return np.array([logged[s] for s in steps])

    np.testing.assert_allclose(column("gradscope/grad_norm"), total, rtol=1e-6)
    np.testing.assert_allclose(column("gradscope/grad_max_abs"), mon.history("max_abs").values[steps].max(axis=1))
    np.testing.assert_allclose(column("gradscope/layer_grad_norm_min"), norms.min(axis=1), rtol=1e-6)
    np.testing.assert_allclose(column("gradscope/layer_grad_norm_max"), norms.max(axis=1), rtol=1e-6)
    zeros = reference(module.grads, mon.rows, "zeros")[steps].sum(axis=1)
    np.testing.assert_allclose(column("gradscope/grad_zero_frac"), zeros / sum(p.numel() for p in module.parameters()))
    np.testing.assert_array_equal(column("gradscope/grad_nonfinite"), 0.0)
    assert not [name for name in rows[0] if name.startswith("grad_norm/")]  # no per-layer columns by default


def test_tensorboard_has_the_summary_scalars(logged_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (directory,) = (logged_run.root / "tb").glob("version_*")
    events = EventAccumulator(str(directory))
    events.Reload()
    assert "gradscope/grad_norm" in events.Tags()["scalars"]
    logged = {e.step: e.value for e in events.Scalars("gradscope/grad_norm")}
    csv_logged = logged_at(logged_run.rows, "gradscope/grad_norm")
    assert sorted(logged) == sorted(csv_logged)
    np.testing.assert_allclose([logged[s] for s in sorted(logged)], [csv_logged[s] for s in sorted(logged)], rtol=1e-6)


def test_wandb_and_mlflow_loggers_receive_the_same_scalars(tmp_path, monkeypatch):
    """Lightning's W&B (offline) and MLflow (file store) loggers get the summary at the steps
    and with the values the CSV logger gets: the callback goes through ``trainer.loggers``."""
    pytest.importorskip("wandb", reason="needs the wandb extra")
    pytest.importorskip("mlflow", reason="needs the mlflow extra")
    import wandb_records
    from lightning.pytorch.loggers import MLFlowLogger, WandbLogger
    from mlflow.tracking import MlflowClient

    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks to opt in to a file store
    module = module_class(L)()
    callback = GradscopeCallback(report=False, log_dir=None)
    uri = (tmp_path / "mlruns").as_uri()
    loggers = [
        CSVLogger(tmp_path, name="csv"),
        # mode="offline" for wandb.init too: Lightning's offline=True sets WANDB_MODE, which W&B
        # reads only when its process-wide settings are first made (an earlier test may have)
        WandbLogger(save_dir=str(tmp_path), offline=True, project="t", mode="offline"),
        MLFlowLogger(experiment_name="t", tracking_uri=uri),
    ]
    trainer = make_trainer(L, tmp_path, [callback], max_epochs=1, logger=loggers, log_every_n_steps=2)
    trainer.fit(module, loader(TRAIN, BATCH), loader(VAL, 8, seed=1))
    loggers[1].experiment.finish()
    import wandb

    wandb.teardown()  # W&B keeps the settings of its first run for the process: not for later tests
    csv_rows = read_csv_rows(tmp_path / "csv" / "version_0" / "metrics.csv")
    expected = logged_at(csv_rows, "gradscope/grad_norm")
    assert sorted(expected) == sorted(logged_at(csv_rows, "train_loss")) == [1, 3, 5]  # Lightning's cadence

    history = MlflowClient(uri).get_metric_history(loggers[2].run_id, "gradscope/grad_norm")
    assert {m.step: m.value for m in history} == pytest.approx(expected, rel=1e-6)

    rows = wandb_records.read(tmp_path).rows
    logged = {row["trainer/global_step"]: row["gradscope/grad_norm"] for row in rows if "gradscope/grad_norm" in row}
    assert logged == pytest.approx(expected, rel=1e-6)


def test_log_layers_adds_per_layer_columns(tmp_path):
    module = module_class(L)()
    callback = GradscopeCallback(log_layers=True, report=False)
    logger = CSVLogger(tmp_path, name="csv")
    trainer = make_trainer(L, tmp_path, [callback], max_epochs=1, logger=logger, log_every_n_steps=2)
    trainer.fit(module, loader(TRAIN, BATCH), loader(VAL, 8, seed=1))
    rows = read_csv_rows(tmp_path / "csv" / "version_0" / "metrics.csv")
    mon = callback.monitor
    norms = reference(module.grads, mon.rows, "norm")
    for j, layer in enumerate(mon.rows):
        logged = logged_at(rows, f"grad_norm/{layer}")
        assert sorted(logged) == [1, 3, 5]
        np.testing.assert_allclose([logged[s] for s in (1, 3, 5)], norms[[1, 3, 5], j], rtol=1e-6)
        assert logged_at(rows, f"grad_max_abs/{layer}")
