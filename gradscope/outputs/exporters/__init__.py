"""Exporters: where a run's records go besides the monitor's memory.

An exporter receives every record on the monitor's background thread (never the training
thread), in order: :meth:`Exporter.start` with the run's header, :meth:`Exporter.write` for
each record, :meth:`Exporter.flush` every few seconds and :meth:`Exporter.close` at the end.
Attach any number in one line: ``watch(model, exporters=[TensorBoardExporter("tb"), ...])``.
The run log (``watch(log_dir=...)``) is itself an exporter. TensorBoard, MLflow and W&B need their
optional extras (``pip install ".[tensorboard]"``, ``".[mlflow]"``, ``".[wandb]"``) and are
imported only here.
"""

from gradscope.outputs.exporters.base import Exporter, ScalarExporter

__all__ = ["Exporter", "MLflowExporter", "ScalarExporter", "TensorBoardExporter", "WandbExporter"]


def __getattr__(name: str):
    if name == "TensorBoardExporter":
        from gradscope.outputs.exporters.tensorboard import TensorBoardExporter

        return TensorBoardExporter
    if name == "WandbExporter":
        from gradscope.outputs.exporters.wandb import WandbExporter

        return WandbExporter
    if name == "MLflowExporter":
        from gradscope.outputs.exporters.mlflow import MLflowExporter

        return MLflowExporter
    raise AttributeError(name)
