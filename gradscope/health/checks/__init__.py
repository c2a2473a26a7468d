"""Health checks: each module turns a :class:`~gradscope.health.view.RunView` into findings of one family.

One concept per module, so that adding a check touches one file: ``nonfinite`` (NaN/Inf,
GradScaler overflow), ``number_format`` (underflow and overflow of float16/bfloat16),
``fp8`` (FP8 readiness), ``exploding``, ``vanishing``, ``dead``, ``expert_starvation``
(experts of a mixture of experts that get no gradient), ``update_ratio`` (stalled updates),
``rank_desync`` (DDP replicas that disagree) and ``loss`` (plateau, divergence, over- and
underfitting). Every check is a function ``detect(view, thresholds) -> list[Finding]``.
"""

from gradscope.health.checks import (
    dead,
    expert_starvation,
    exploding,
    fp8,
    loss,
    nonfinite,
    number_format,
    rank_desync,
    update_ratio,
    vanishing,
)

CHECKS = (
    nonfinite.detect,
    rank_desync.detect,
    number_format.detect,
    exploding.detect,
    vanishing.detect,
    dead.detect,
    expert_starvation.detect,
    update_ratio.detect,
    loss.detect,
    fp8.detect,
)

__all__ = ["CHECKS"]
