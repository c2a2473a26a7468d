"""Old import path of :mod:`gradscope.outputs.exporters` (kept so that user code keeps working)."""

from gradscope.outputs.exporters import Exporter, ScalarExporter

__all__ = ["Exporter", "ScalarExporter"]  # and, on first use, TensorBoardExporter, MLflowExporter and WandbExporter


def __getattr__(name: str):
    # The optional extras are imported only when their exporter is asked for.
    if name in ("TensorBoardExporter", "MLflowExporter", "WandbExporter"):
        from gradscope.outputs import exporters

        return getattr(exporters, name)
    raise AttributeError(name)
