"""``MLflowExporter``: gradscope's statistics as MLflow metrics.

Needs the ``mlflow`` extra (``pip install "gradscope-diagnostics[mlflow]"``).
"""

from __future__ import annotations

import re
import time

from gradscope.outputs.budget import check_budget
from gradscope.outputs.exporters.base import EXPORT_BUDGET, ScalarExporter

BATCH = 1000
"""Metrics per request (MLflow's limit for one ``log_batch``)."""

_NOT_ALLOWED = re.compile(r"[^\w\-. /:]")


def metric_key(name: str) -> str:
    """``name`` with every character MLflow refuses in a metric key replaced by ``_``."""
    return _NOT_ALLOWED.sub("_", name)


class MLflowExporter(ScalarExporter):
    """Logs a run's scalars to an MLflow run, in batches.

    The metrics are those of :class:`gradscope.exporters.TensorBoardExporter`'s scalars (the
    whole model's ``gradscope/grad_norm``... at every sampled step; at layer steps, as often as
    ``budget`` allows, ``grad_norm/<layer>``, ``grad_rms/<layer>``, ``grad_max_abs/<layer>``,
    ``grad_zero_frac/<layer>``, ``grad_nonfinite/<layer>``, ``update_ratio/<layer>``,
    ``loss``, resources and metrics), with characters MLflow does not allow in a key replaced
    by ``_``. They are sent with ``MlflowClient.log_batch`` (what ``mlflow.log_metrics``
    calls) at most every few seconds, up to 1000 per request, from gradscope's background
    thread. MLflow's active run is per thread, so the exporter takes the run active when it
    is created (or ``run_id``) and logs to it by id.

    Args:
        run_id: the MLflow run to log to; default: the active run (``mlflow.start_run()``).
        tracking_uri: default: MLflow's current tracking URI.
        budget: fraction of wall time the exporter may spend (see
            :class:`~gradscope.outputs.exporters.base.ScalarExporter`); None: every layer at
            every sampled step.
        prefix: put before every key, e.g. ``"gradscope/"``.

    Raises:
        ValueError: no ``run_id`` and no active MLflow run.
    """

    def __init__(
        self,
        run_id: str | None = None,
        *,
        tracking_uri: str | None = None,
        budget: float | None = EXPORT_BUDGET,
        prefix: str = "",
    ) -> None:
        try:
            import mlflow
            from mlflow.entities import Metric
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise ImportError("MLflowExporter needs MLflow: pip install 'gradscope-diagnostics[mlflow]'") from None
        self.budget = check_budget("MLflowExporter", budget)
        if run_id is None:
            active = mlflow.active_run()
            if active is None:
                raise ValueError(
                    "MLflowExporter: no active MLflow run; start one (with mlflow.start_run(): ...) or pass run_id="
                )
            run_id = active.info.run_id
        self.run_id = run_id
        self.client = MlflowClient(tracking_uri or mlflow.get_tracking_uri())
        self.prefix = prefix
        self._metric = Metric
        self._pending: list = []
        self._keys: dict[str, str] = {}

    def _key(self, name: str) -> str:
        key = self._keys.get(name)
        if key is None:
            key = self._keys[name] = metric_key(self.prefix + name)
        return key

    def write_scalars(self, step: int, values: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        self._pending.extend(self._metric(self._key(k), float(v), now, int(step)) for k, v in values.items())
        if len(self._pending) >= BATCH:
            self.flush()

    def flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[:BATCH], self._pending[BATCH:]
            self.client.log_batch(self.run_id, metrics=batch)
