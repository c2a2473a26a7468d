"""``WandbExporter``: gradscope's statistics in a Weights & Biases run.

Needs the ``wandb`` extra (``pip install "gradscope-diagnostics[wandb]"``); works in
``wandb.init(mode="offline")`` with no account and no network.
"""

from __future__ import annotations

import numpy as np

from gradscope.outputs.budget import check_budget
from gradscope.outputs.exporters.base import EXPORT_BUDGET, ScalarExporter
from gradscope.outputs.exporters.tensorboard import log2_histogram
from gradscope.run import records
from gradscope.stats import layout

STEP_METRIC = "gradscope/step"
"""The x-axis of every chart gradscope writes: the training step the values belong to."""

COUNTS = (("grad_zeros", layout.ZEROS), ("grad_nans", layout.NANS), ("grad_infs", layout.INFS))
"""Per-layer element counts written as scalars (W&B drops NaN and Inf from a histogram)."""


class WandbExporter(ScalarExporter):
    """Logs a run into a W&B run: per-layer scalars, counts and binade histograms.

    Charts are grouped by statistic (W&B makes a section of each name's first part). At every
    sampled step the whole model's ``gradscope/grad_norm``, ``gradscope/grad_max_abs``,
    ``gradscope/grad_zero_frac``, ``gradscope/grad_nonfinite``,
    ``gradscope/layer_grad_norm_min`` and ``gradscope/layer_grad_norm_max``; at layer steps
    (every sampled step, or as often as ``budget`` allows: see
    :class:`~gradscope.outputs.exporters.base.ScalarExporter`) ``grad_norm/<layer>``,
    ``grad_rms/<layer>``, ``grad_max_abs/<layer>``,
    ``grad_zero_frac/<layer>``, ``fp8_e4m3_zero/<layer>``, ``fp8_e5m2_zero/<layer>``,
    ``update_ratio/<layer>`` (with ``track_updates``), ``act_*/<module>`` (with
    ``forward=True``), and, since W&B histograms silently drop non-finite values, the exact
    counts ``grad_zeros/<layer>``, ``grad_nans/<layer>`` and ``grad_infs/<layer>`` as scalars
    at every layer step, 0 included. Scalars of the whole step (``loss``, ``step_time``,
    ``peak_memory``, ``energy``, ``lr_scale``, logged metrics) go under ``gradscope/``, so
    they never overwrite the user's own ``loss``.

    Histograms: ``grad_log2_abs/<layer>`` is the distribution of ``log2 |g|`` over the finite
    non-zero elements, one bin per binade (uniform bins in log2 space: bin ``[e, e + 1)``
    holds ``|g|`` in ``[2**e, 2**(e + 1))``), from gradscope's own histograms: no gradient
    is copied to the host for it. Counts are exact.

    Every value is logged with ``gradscope/step`` (the training step it belongs to) and every
    gradscope chart uses that as its x-axis (``define_metric``), so statistics that reach the
    host a step late on a GPU land on the right step, and gradscope never moves W&B's own
    ``_step`` under the user's ``wandb.log`` calls beyond one row per flushed step. Values are
    gathered per step and sent from gradscope's background thread every few seconds.

    Args:
        run: the W&B run to log into; default: the active one (``wandb.init()`` first).
        histogram_every: histograms at one in this many of the layer steps that have them
            (0: never); the monitor computes them at one sampled step in
            ``watch(histogram_every=)`` (default 32) and where gradients trigger them.
        budget: fraction of wall time the exporter may spend in this process (W&B's service
            process spends about as much again); None: every layer at every sampled step.
        prefix: put before every name (e.g. ``"model_a/"`` for two watched models in one run).

    Raises:
        ValueError: no ``run`` and no active W&B run.
    """

    def __init__(
        self, run=None, *, histogram_every: int = 1, budget: float | None = EXPORT_BUDGET, prefix: str = ""
    ) -> None:
        try:
            import wandb
        except ImportError:
            raise ImportError("WandbExporter needs wandb: pip install 'gradscope-diagnostics[wandb]'") from None
        if isinstance(histogram_every, bool) or not isinstance(histogram_every, int) or histogram_every < 0:
            raise ValueError(f"WandbExporter: histogram_every must be an integer >= 0, got {histogram_every!r}")
        self.budget = check_budget("WandbExporter", budget)
        if not isinstance(prefix, str):
            raise TypeError(f"WandbExporter: prefix must be a string, got {type(prefix).__name__}")
        if run is None:
            run = wandb.run
            if run is None:
                raise ValueError("WandbExporter: no active W&B run; call wandb.init(...) first or pass run=")
        self.run = run
        self.histogram_every = histogram_every
        self.prefix = prefix
        self._histogram = wandb.Histogram
        self._pending: dict[int, dict] = {}  # step -> values not yet sent
        self._sections: set[str] = set()
        self._sampled = 0
        self._whole_step = False

    def start(self, header: records.Header) -> None:
        super().start(header)
        self.run.define_metric(self.prefix + STEP_METRIC)

    def write(self, record: records.Record) -> None:
        self._whole_step = isinstance(record, (records.StepValues, records.Metrics))
        super().write(record)

    def _name(self, name: str) -> str:
        whole_step = self._whole_step or "/" not in name  # the loss, a metric: never the user's own
        return self.prefix + (f"gradscope/{name}" if whole_step else name)

    def _put(self, step: int, values: dict) -> None:
        if not values:
            return
        named = {self._name(k): v for k, v in values.items()}
        for name in named:
            section = name.rsplit("/", 1)[0]
            if section not in self._sections:  # each section's charts against gradscope's step
                self._sections.add(section)
                self.run.define_metric(f"{section}/*", step_metric=self.prefix + STEP_METRIC)
        self._pending.setdefault(int(step), {}).update(named)

    def write_scalars(self, step: int, values: dict[str, float]) -> None:
        self._put(step, values)

    def layer_scalars(self, record: records.Sampled) -> dict[str, float]:
        """The exporters' per-layer scalars plus the exact :data:`COUNTS`, 0 included."""
        values = super().layer_scalars(record)
        for r in np.flatnonzero(record.present):
            values.update({f"{name}/{self.info.rows[r]}": float(record.rows[r, column]) for name, column in COUNTS})
        return values

    def write_histograms(self, record: records.Sampled) -> None:
        present = np.flatnonzero(record.present & layout.histogram_known(record.rows))
        if not present.size:  # light rows: no histogram at this step
            return
        self._sampled += 1
        if not self.histogram_every or (self._sampled - 1) % self.histogram_every:
            return
        histograms = {}
        for r in present:
            hist = log2_histogram(record.rows[r, layout.HIST :], record.rows[r, layout.MAX_ABS])
            if hist is not None:  # TensorBoard's buckets give upper limits after one empty bucket
                edges, counts = hist["bucket_limits"], hist["bucket_counts"][1:]
                histograms[f"grad_log2_abs/{self.info.rows[r]}"] = self._histogram(np_histogram=(counts, edges))
        self._put(record.step, histograms)

    def flush(self) -> None:
        pending, self._pending = self._pending, {}
        for step in sorted(pending):
            self.run.log({**pending[step], self.prefix + STEP_METRIC: step})

    def close(self) -> None:
        self.flush()
