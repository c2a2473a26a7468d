"""``MLflowExporter``: gradscope's statistics as MLflow metrics.

Needs the ``mlflow`` extra (``pip install "gradscope-diagnostics[mlflow]"``).

**Where MLflow writes.** With no tracking URI set (``MLFLOW_TRACKING_URI``,
``mlflow.set_tracking_uri``), MLflow 3 uses ``sqlite:///mlflow.db`` in the working directory
(its ``./mlruns`` file store only where that directory already holds runs). ``mlflow-skinny``
is a client: it has no SQL store unless SQLAlchemy and Alembic are installed (the full
``mlflow`` package has them), and MLflow 3 refuses its file store (maintenance mode) unless
``MLFLOW_ALLOW_FILE_STORE=true``. The exporter checks which store its tracking URI names when
it is made, and where MLflow could not open it says so at once, with the fix, before
anything is written — not later on gradscope's background thread. It never picks a store of
its own.
"""

from __future__ import annotations

import importlib.util
import re
import time
from urllib.parse import urlparse

from gradscope.outputs.budget import check_budget
from gradscope.outputs.exporters.base import EXPORT_BUDGET, ScalarExporter
from gradscope.run import records

BATCH = 1000
"""Metrics per request (MLflow's limit for one ``log_batch``)."""

_NOT_ALLOWED = re.compile(r"[^\w\-. /:]")

_SQL_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
"""URI schemes of MLflow's SQL stores (``dialect+driver://`` included)."""

_SERVER = (
    "MLFLOW_TRACKING_URI=http://<host>:5000 (or mlflow.set_tracking_uri(...), or MLflowExporter(tracking_uri=...))"
)


def metric_key(name: str) -> str:
    """``name`` with every character MLflow refuses in a metric key replaced by ``_``."""
    return _NOT_ALLOWED.sub("_", name)


def check_store(uri: str, origin: str) -> None:
    """Raise, naming the fix, when MLflow could not open the tracking store ``uri`` names.

    Only looks (no store is opened, nothing is written): a SQL store needs SQLAlchemy and
    Alembic, which ``mlflow-skinny`` does not install; MLflow 3 refuses its file store unless
    ``MLFLOW_ALLOW_FILE_STORE`` is set. Other stores (a tracking server, Databricks) are
    left to MLflow.

    Args:
        uri: the tracking URI, resolved (``mlflow.get_tracking_uri()`` or the exporter's own).
        origin: where it came from, for the message (e.g. "MLflow 3's default").

    Raises:
        ImportError: a SQL store without SQLAlchemy or Alembic.
        RuntimeError: a file store that MLflow refuses.
    """
    scheme = urlparse(uri).scheme.split("+", 1)[0].lower()
    if scheme in _SQL_SCHEMES:
        missing = [name for name in ("sqlalchemy", "alembic") if importlib.util.find_spec(name) is None]
        if missing:
            raise ImportError(
                f"MLflowExporter: MLflow's tracking URI is '{uri}' ({origin}), a SQL store, which MLflow cannot "
                f"open without {' and '.join(missing)} (mlflow-skinny does not install them). Either install "
                "them (pip install sqlalchemy alembic), or the full MLflow (pip install mlflow, which also runs "
                f"'mlflow ui' to see the runs), or log to an MLflow tracking server: {_SERVER}"
            )
    elif scheme in ("", "file"):
        try:
            from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE
        except ImportError:  # an MLflow that still serves its file store
            return
        if not MLFLOW_ALLOW_FILE_STORE.get():
            raise RuntimeError(
                f"MLflowExporter: MLflow's tracking URI is '{uri}' ({origin}), MLflow's file store, which "
                "MLflow 3 keeps in maintenance mode and refuses unless MLFLOW_ALLOW_FILE_STORE=true is set. "
                "Use its default SQL store instead (sqlite:///mlflow.db, the default where no tracking URI is "
                "set and ./mlruns holds no runs; mlflow-skinny needs pip install sqlalchemy alembic for it; "
                f"'mlflow migrate-filestore' moves old runs), or an MLflow tracking server: {_SERVER}; or set "
                "MLFLOW_ALLOW_FILE_STORE=true to keep the file store"
            )


def _origin(mlflow, tracking_uri: str | None) -> str:
    """Where the exporter's tracking URI came from, in words."""
    if tracking_uri is not None:
        return "given as tracking_uri="
    is_set = getattr(mlflow, "is_tracking_uri_set", None)
    if is_set is not None and not is_set():
        return "MLflow 3's default: none is set"
    return "set by MLFLOW_TRACKING_URI or mlflow.set_tracking_uri"


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
    is created (or ``run_id``) and logs to it by id; or, with ``experiment``, starts a run of
    its own when the monitor starts (on the logging rank only) and ends it at ``mon.close()``.

    The tracking URI is resolved when the exporter is made (a relative default such as
    ``sqlite:///mlflow.db`` is then in the working directory of that moment), and a store MLflow
    could not open is an error then (module docstring).

    Args:
        run_id: the MLflow run to log to; default: the active run (``mlflow.start_run()``).
        experiment: instead of an existing run, start a new one in the MLflow experiment of
            this name (created if missing); its id is ``run_id`` once the monitor has started.
        tracking_uri: default: MLflow's current tracking URI.
        budget: fraction of wall time the exporter may spend (see
            :class:`~gradscope.outputs.exporters.base.ScalarExporter`); None: every layer at
            every sampled step.
        prefix: put before every key, e.g. ``"gradscope/"``.

    Raises:
        ValueError: no ``run_id``, no ``experiment`` and no active MLflow run; or both
            ``run_id`` and ``experiment``.
        ImportError: the tracking URI names a SQL store (MLflow 3's default) and SQLAlchemy
            or Alembic is missing (``mlflow-skinny`` alone).
        RuntimeError: the tracking URI names MLflow's file store, which MLflow refuses.
    """

    def __init__(
        self,
        run_id: str | None = None,
        *,
        experiment: str | None = None,
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
        if run_id is not None and experiment is not None:
            raise ValueError("MLflowExporter: pass run_id= (an existing run) or experiment= (a new run), not both")
        self.tracking_uri = tracking_uri or mlflow.get_tracking_uri()
        check_store(self.tracking_uri, _origin(mlflow, tracking_uri))
        if run_id is None and experiment is None:
            active = mlflow.active_run()
            if active is None:
                raise ValueError(
                    "MLflowExporter: no active MLflow run; start one (with mlflow.start_run(): ...), pass run_id=, "
                    "or pass experiment= to start a new run"
                )
            run_id = active.info.run_id
        self.run_id = run_id
        self.experiment = experiment
        self.client = MlflowClient(self.tracking_uri)
        self.prefix = prefix
        self._metric = Metric
        self._pending: list = []
        self._keys: dict[str, str] = {}
        self._own_run = False

    def start(self, header: records.Header) -> None:
        super().start(header)
        if self.run_id is None:
            self.run_id = self.client.create_run(self._experiment_id()).info.run_id
            self._own_run = True

    def _experiment_id(self) -> str:
        """The id of the experiment named ``experiment``, created if missing."""
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(self.experiment)
        except MlflowException:  # another process may have created it meanwhile
            found = self.client.get_experiment_by_name(self.experiment)
            if found is None:
                raise
            return found.experiment_id

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

    def close(self) -> None:
        self.flush()
        if self._own_run:
            self.client.set_terminated(self.run_id)
