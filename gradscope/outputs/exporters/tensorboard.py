"""``TensorBoardExporter``: gradscope's statistics as TensorBoard scalars and histograms.

Needs the ``tensorboard`` extra (``pip install "gradscope-diagnostics[tensorboard]"``).
"""

from __future__ import annotations

import os

import numpy as np

from gradscope.outputs.budget import check_budget
from gradscope.outputs.exporters.base import EXPORT_BUDGET, ScalarExporter
from gradscope.run import records
from gradscope.stats import layout


def log2_histogram(counts: np.ndarray, max_abs: float) -> dict | None:
    """A row's binade histogram as the arguments of ``SummaryWriter.add_histogram_raw``.

    The histogram is of ``log2 |g|`` over the finite non-zero elements: bucket ``i`` of
    gradscope's histogram, ``|g|`` in ``[2**e, 2**(e + 1))``, becomes the TensorBoard bucket
    ``(e, e + 1]`` of ``log2 |g|``. Buckets are kept from the first to the last non-empty one,
    after one empty bucket that marks where the first begins (TensorBoard buckets give only
    their upper limit). ``num`` and the counts are exact; ``max`` is ``log2(max_abs)`` (exact);
    ``min`` is the lower edge of the first non-empty binade; ``sum`` and ``sum_squares`` use
    each binade's midpoint ``e + 0.5``, so they are within 0.5 per element of the truth.

    Args:
        counts: ``(NUM_BINS,)`` bin counts (any numeric dtype).
        max_abs: the row's largest finite ``|g|``.

    Returns:
        The keyword arguments, or None when the histogram is empty (all zeros or non-finite).
    """
    counts = np.asarray(counts, dtype=np.float64)
    nonzero = np.flatnonzero(counts)
    if len(nonzero) == 0:
        return None
    first, last = int(nonzero[0]), int(nonzero[-1])
    edges = np.arange(layout.NUM_BINS + 1, dtype=np.float64) + layout.HIST_MIN_EXPONENT  # log2 of HIST_EDGES
    kept = counts[first : last + 1]
    lower = edges[first]
    top = float(np.log2(max_abs)) if max_abs > 0 else edges[last + 1]
    limits = edges[first + 1 : last + 2].copy()
    limits[-1] = max(limits[-1], top)  # the last bin also holds values beyond 2**16
    middle = edges[first : last + 1] + 0.5
    return {
        "min": float(lower),
        "max": min(max(top, lower), float(limits[-1])),
        "num": int(kept.sum()),
        "sum": float(kept @ middle),
        "sum_squares": float(kept @ middle**2),
        "bucket_limits": [float(lower), *limits.tolist()],
        "bucket_counts": [0, *(int(c) for c in kept)],
    }


class TensorBoardExporter(ScalarExporter):
    """Writes a run to TensorBoard event files.

    Scalars: the whole model's ``gradscope/grad_norm``, ``gradscope/grad_max_abs``,
    ``gradscope/grad_zero_frac``, ``gradscope/grad_nonfinite``,
    ``gradscope/layer_grad_norm_min`` and ``gradscope/layer_grad_norm_max`` at every sampled
    step; at layer steps (every sampled step, or as often as ``budget`` allows: see
    :class:`~gradscope.outputs.exporters.base.ScalarExporter`) one chart per layer, grouped by
    statistic: ``grad_norm/<layer>``,
    ``grad_rms/<layer>``, ``grad_max_abs/<layer>``, ``grad_zero_frac/<layer>``,
    ``grad_nonfinite/<layer>`` (when non-zero), ``update_ratio/<layer>`` (with
    ``track_updates``), ``loss``, ``step_time``, ``peak_memory``, ``energy`` and every metric.
    Histograms: ``grad_log2_abs/<layer>``, the distribution of ``log2 |g|`` built from
    gradscope's own binade histograms (see :func:`log2_histogram`), so no gradient is copied
    to the host for it.

    Args:
        log_dir: directory of the event files (ignored when ``writer`` is given).
        writer: an existing ``torch.utils.tensorboard.SummaryWriter`` to write into (it stays
            open at close; gradscope only flushes it).
        histogram_every: write histograms at one in this many of the layer steps that have
            them (0: never). The monitor computes histograms at one sampled step in
            ``watch(histogram_every=)`` (default 32) and where gradients trigger them; a
            histogram costs about 20 times a scalar on disk.
        budget: fraction of wall time the exporter may spend (``add_scalar`` costs about
            100 µs per value); None: every layer at every sampled step.
        prefix: put before every tag, e.g. ``"gradscope/"``.
    """

    def __init__(
        self,
        log_dir: str | os.PathLike | None = None,
        *,
        writer=None,
        histogram_every: int = 1,
        budget: float | None = EXPORT_BUDGET,
        prefix: str = "",
    ) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError(
                "TensorBoardExporter needs TensorBoard: pip install 'gradscope-diagnostics[tensorboard]'"
            ) from None
        if isinstance(histogram_every, bool) or not isinstance(histogram_every, int) or histogram_every < 0:
            raise ValueError(f"TensorBoardExporter: histogram_every must be an integer >= 0, got {histogram_every!r}")
        if writer is None and log_dir is None:
            raise ValueError("TensorBoardExporter: give a log_dir or a writer")
        self.budget = check_budget("TensorBoardExporter", budget)  # before a writer makes files
        self._owns_writer = writer is None
        self.writer = writer if writer is not None else SummaryWriter(log_dir=os.fspath(log_dir))
        self.histogram_every = histogram_every
        self.prefix = prefix
        self._sampled = 0

    def write_scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(self.prefix + tag, value, global_step=step)

    def write_histograms(self, record: records.Sampled) -> None:
        rows = np.flatnonzero(record.present & layout.histogram_known(record.rows))
        if not rows.size:  # light rows: no histogram at this step
            return
        self._sampled += 1
        if not self.histogram_every or (self._sampled - 1) % self.histogram_every:
            return
        for r in rows:
            hist = log2_histogram(record.rows[r, layout.HIST :], record.rows[r, layout.MAX_ABS])
            if hist is not None:
                tag = f"{self.prefix}grad_log2_abs/{self.info.rows[r]}"
                self.writer.add_histogram_raw(tag, global_step=record.step, **hist)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        if self._owns_writer:
            self.writer.close()
        else:
            self.writer.flush()
