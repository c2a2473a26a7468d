"""Health checks: each module turns a :class:`~gradscope.health.view.RunView` into findings of one family.

One concept per module, so that adding a check touches one file: ``nonfinite`` (NaN/Inf,
GradScaler overflow), ``exploding``, ``vanishing``, ``dead``, ``update_ratio``
(stalled updates), ``rank_desync`` (DDP replicas that disagree) and ``loss`` (plateau,
divergence, over- and underfitting). Every check is a function ``detect(view, thresholds) -> list[Finding]``.
"""

from gradscope.health.checks import dead, exploding, loss, nonfinite, rank_desync, update_ratio, vanishing

CHECKS = (
    nonfinite.detect,
    rank_desync.detect,
    exploding.detect,
    vanishing.detect,
    dead.detect,
    update_ratio.detect,
    loss.detect,
)

__all__ = ["CHECKS"]
