"""``WeightState``: what a run keeps of its weight readings (``watch(..., compression=True)``).

Two things, whatever the length of the run, in memory independent of it:

* the newest reading's per-tensor statistics rows (quantization readiness is a question
  about the weights one would ship: the latest ones);
* each row's (layer's) accumulated first-order Taylor saliency ``Σ_steps |Σ g·w|`` (the sum
  inside over the layer's tensors, the absolute value per step, as Molchanov et al. 2019
  accumulate a group's importance over minibatches) and its elementwise second-order
  counterpart ``Σ_steps Σ (g·w)²`` (the empirical-Fisher, Optimal Brain Damage estimate of
  what zeroing the elements costs), with the number of readings behind them.
"""

from __future__ import annotations

import numpy as np

from gradscope.run import records


class WeightState:
    """Weight readings of a run, folded (module docstring).

    Args:
        n_rows: the run's report rows.

    Attributes:
        step: the newest reading's step (-1 before any).
        rows: float64 ``(T, ROW_WIDTH)``, the newest reading's per-tensor rows.
        row_of: int64 ``(T,)``, each tensor's report row.
        ndim: int64 ``(T,)``, each tensor's number of dimensions.
        saliency: float64 ``(R,)``, ``Σ_steps |Σ g·w|`` per row over the readings so far.
        fisher: float64 ``(R,)``, ``Σ_steps Σ (g·w)²`` per row over the same readings.
        readings: how many readings ``saliency`` sums.
    """

    def __init__(self, n_rows: int) -> None:
        self.n_rows = n_rows
        self.step = -1
        self.rows = np.zeros((0, 0))
        self.row_of = self.ndim = np.zeros(0, dtype=np.int64)
        self.saliency = np.zeros(n_rows)
        self.fisher = np.zeros(n_rows)
        self.readings = 0

    def add(self, record: records.Weights) -> None:
        """Fold in one reading. A reading whose Taylor terms are not finite (a NaN
        gradient) updates the newest rows but adds nothing to the saliencies."""
        if record.step >= self.step:
            self.step, self.rows, self.row_of, self.ndim = record.step, record.rows, record.row_of, record.ndim
        per_row = np.bincount(record.row_of, weights=record.grad_dot_weight, minlength=self.n_rows)
        squares = np.bincount(record.row_of, weights=record.grad_weight_sq, minlength=self.n_rows)
        if np.isfinite(per_row).all() and np.isfinite(squares).all():
            self.saliency += np.abs(per_row)
            self.fisher += squares
            self.readings += 1
