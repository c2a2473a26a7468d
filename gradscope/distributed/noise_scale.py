"""The simple gradient noise scale ``B_simple`` (McCandlish et al., 2018, appendix A).

``B_simple = tr(Sigma) / |G|^2``: the trace of the per-example gradient covariance over the
squared norm of the true gradient. It is the batch size (in examples) around which larger
batches stop paying for themselves ("critical batch size").

A gradient averaged over ``B`` examples has ``E|G_B|^2 = |G|^2 + tr(Sigma) / B``. With two
batch sizes ``b`` and ``B > b`` measured on the same step, the unbiased estimators are::

    |G|^2     ~  (B |G_B|^2 - b |G_b|^2) / (B - b)
    tr(Sigma) ~  (|G_b|^2 - |G_B|^2) / (1/b - 1/B)

Under DDP with ``W`` ranks of ``b`` examples each, ``|G_b|^2`` is each rank's own gradient
before the all-reduce (averaged over ranks, which lowers its variance) and ``|G_B|^2`` the
all-reduced gradient with ``B = W b``. Single steps are noisy (either estimate may even be
negative), so both are smoothed with the same exponential moving average and
``B_simple = EMA(tr Sigma) / EMA(|G|^2)``; the EMAs' start-up bias cancels in the ratio.
"""

from __future__ import annotations

import math


def estimate(small_sq: float, big_sq: float, small_batch: float, big_batch: float) -> tuple[float, float]:
    """Unbiased ``(|G|^2, tr(Sigma))`` from squared gradient norms at two batch sizes.

    Args:
        small_sq: ``|G_b|^2``, squared norm of a gradient averaged over ``small_batch`` examples.
        big_sq: ``|G_B|^2``, the same over ``big_batch`` examples.
        small_batch, big_batch: ``b < B`` (any unit; ``tr(Sigma)`` is per that unit).
    """
    if not 0 < small_batch < big_batch:
        raise ValueError(f"need 0 < small_batch < big_batch, got {small_batch} and {big_batch}")
    grad_sq = (big_batch * big_sq - small_batch * small_sq) / (big_batch - small_batch)
    trace = (small_sq - big_sq) / (1.0 / small_batch - 1.0 / big_batch)
    return grad_sq, trace


class NoiseScale:
    """``B_simple`` from a stream of steps, smoothed by an exponential moving average.

    Args:
        world: ranks whose gradients are averaged (the big batch is ``world`` small ones).
        batch_size: examples per rank per step; None expresses ``B_simple`` in per-rank
            batches instead of examples.
        decay: EMA decay per sampled step (0.95: about the last 20 steps weigh most).
    """

    def __init__(self, world: int, batch_size: int | None = None, decay: float = 0.95) -> None:
        if world < 2:
            raise ValueError("the gradient noise scale needs at least 2 ranks")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"noise scale decay must be in [0, 1), got {decay}")
        self.world = world
        self.batch = float(batch_size) if batch_size else 1.0
        self.decay = decay
        self._grad_sq = 0.0
        self._trace = 0.0
        self._steps = 0

    def update(self, small_sq: float, big_sq: float) -> float:
        """Add one step's ``|G_b|^2`` (mean over ranks) and ``|G_B|^2``; returns ``B_simple``
        (NaN while undefined: non-finite norms are skipped, a non-positive ``|G|^2`` EMA
        has no meaningful ratio)."""
        if math.isfinite(small_sq) and math.isfinite(big_sq):
            grad_sq, trace = estimate(small_sq, big_sq, self.batch, self.batch * self.world)
            self._grad_sq = self.decay * self._grad_sq + (1 - self.decay) * grad_sq
            self._trace = self.decay * self._trace + (1 - self.decay) * trace
            self._steps += 1
        return self.value

    @property
    def value(self) -> float:
        if self._steps == 0 or self._grad_sq <= 0:
            return math.nan
        return self._trace / self._grad_sq
