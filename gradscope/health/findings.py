"""``Finding``: one problem a health check found, where, since when, and what to try."""

from __future__ import annotations

from dataclasses import dataclass, field

SEVERITIES = ("info", "warning", "critical")
"""From least to most severe. ``info`` findings do not change a report's status."""

KINDS = (
    "nonfinite",
    "rank_desync",
    "overflow",
    "underflow",
    "exploding",
    "vanishing",
    "dead",
    "expert_starvation",
    "stalled_updates",
    "plateau",
    "divergence",
    "overfitting",
    "underfitting",
    "fp8_range",
)

SUGGESTIONS = {
    "nonfinite": (
        "Rerun that step under torch.autograd.detect_anomaly() to name the exact operation; lower the "
        "learning rate and clip gradients if the weights themselves grew non-finite."
    ),
    "nonfinite_forward": (
        "The value was born in the forward pass, in the named module's own computation (its inputs and its "
        "submodules' outputs were finite): look there for overflow (float16 tops out at 65504: attention "
        "logits, exp, large activations), log of zero or a negative number, division by zero, and sqrt of a "
        "negative number. Keep that module in float32 (or use bfloat16), subtract the maximum before exp "
        "(softmax/logsumexp), add an epsilon to divisions and logs, and clamp its inputs."
    ),
    "nonfinite_backward": (
        "The forward pass was finite: the value was born in the backward pass, in the reported layer or "
        "between it and the loss (it is the first layer, in backward order, whose gradient went "
        "non-finite). Look for operations whose derivative is infinite where they are evaluated (sqrt or pow "
        "with exponent < 1 at 0, log at 0, acos/asin at +-1, norm of a zero vector, torch.where hiding a "
        "NaN branch), and for float16 gradients overflowing: use a GradScaler with float16, clip gradients, "
        "lower the learning rate."
    ),
    "nonfinite_optimizer": (
        "The optimizer step made the weights non-finite from finite gradients: in float16, Adam's eps "
        "(1e-8) is 0 and its second moment can underflow to 0, so the update divides by zero; keep an "
        "optimizer state and master weights in float32 (mixed precision: torch.autocast with a GradScaler), "
        "or raise eps (1e-4 in float16). Also check a learning rate large enough to overflow the weights' format."
    ),
    "rank_desync": (
        "DDP ranks hold different gradients after the all-reduce, so their weights drift apart. Look for "
        "parameters DDP does not synchronise (_ddp_params_and_buffers_to_ignore, parameters created after "
        "wrapping), gradient code that depends on the rank (clipping or scaling on one rank), no_sync() "
        "left on for the last micro-batch, and non-deterministic custom all-reduce hooks."
    ),
    "overflow": (
        "A GradScaler skipped steps whose scaled gradients overflowed. A few skips while it finds its "
        "scale are normal; if they keep happening, lower the initial scale (GradScaler(init_scale=...)) "
        "or the learning rate, and check for exploding gradients."
    ),
    "underflow": (
        "Gradients of a low-precision tensor are flushed to zero or sit below the format's smallest normal "
        "number, where they lose precision: with float16 use a GradScaler (torch.amp.GradScaler) or "
        "train in bfloat16 (float32's range); scale the loss up (a sum instead of a mean, or a constant "
        "factor with the learning rate divided by it); keep the affected layers in float32."
    ),
    "overflow_format": (
        "Values reach the top of their format's range (float16: 65504) and become Inf one step later: "
        "use bfloat16 or a GradScaler, keep this layer (or its softmax/exp) in float32, normalise its "
        "inputs, and lower the learning rate if the values keep growing."
    ),
    "exploding": (
        "Clip gradients (torch.nn.utils.clip_grad_norm_), lower the learning rate or add warm-up, check "
        "the loss scale and reduction (a sum over a large batch instead of a mean), and check "
        "initialisation (weights too large) and normalisation layers."
    ),
    "vanishing": (
        "Check initialisation (Kaiming for ReLU-like, Xavier for tanh) and activations (sigmoid/tanh "
        "saturate: prefer ReLU/GELU), add normalisation (LayerNorm/BatchNorm) or residual connections, "
        "and make sure the loss is not scaled down to nothing."
    ),
    "dead": (
        "Almost every gradient element is exactly zero: units that never activate (dead ReLUs) or a "
        "branch whose output does not reach the loss. Lower the learning rate, use LeakyReLU/GELU, check "
        "biases and initialisation (large negative biases), and check the layer is used in forward."
    ),
    "expert_starvation": (
        "The router sends no tokens to these experts, so they never learn (router collapse). Add or raise the "
        "load-balancing auxiliary loss (Switch/Mixtral style, e.g. router_aux_loss_coef), use capacity limits or "
        "noisy top-k routing, lower the learning rate of the router, check its initialisation (logits near zero "
        "at the start) and that the batch has enough tokens for every expert to be chosen."
    ),
    "stalled_updates_low": (
        "Each step barely changes these weights: the learning rate is too low for them, a scheduler has "
        "decayed it to nothing, or the optimizer does not hold these parameters. Raise the learning rate "
        "or check the scheduler and the optimizer's parameter groups."
    ),
    "stalled_updates_high": (
        "Each step changes these weights by a large fraction of their size: the learning rate is too "
        "high for them. Lower it, add warm-up, or give these layers their own parameter group."
    ),
    "plateau": (
        "No progress for a while: stop early at the best step (and keep its checkpoint), or lower the "
        "learning rate (ReduceLROnPlateau, a cosine schedule); if it plateaus high, the model may need "
        "more capacity or better data."
    ),
    "divergence": (
        "The loss is rising: lower the learning rate, add warm-up and gradient clipping, and check the "
        "data (a bad shard, label noise) and numerically risky operations."
    ),
    "overfitting": (
        "Validation gets worse while training improves: stop early at the best validation step, add "
        "regularisation (weight decay, dropout), augment or add data, or use a smaller model."
    ),
    "fp8_range": (
        "In FP8 (per-tensor amax scaling) this layer's gradient would lose the reported fraction to zero: its "
        "values span more binades than the format holds. Before training it in FP8, scale per block or per "
        "row instead of per tensor, keep it in bfloat16, or use E5M2 (wider range) for its gradients."
    ),
    "underfitting": (
        "The training loss is not going down: check the learning rate (too low or too high), the data "
        "and labels (targets shuffled against inputs?), that gradients reach the weights (see vanishing "
        "or dead findings), and the model's capacity."
    ),
}


@dataclass(frozen=True)
class Finding:
    """One problem found in a training run.

    Attributes:
        kind: one of :data:`KINDS`.
        severity: ``"info"``, ``"warning"`` or ``"critical"``.
        layer: the layer (row) concerned, or None for the loss, metrics or the whole model.
        step: the step the finding refers to (the latest step it holds, or the step of an event).
        since_step: the first step of the problem (equal to ``step`` for single events).
        message: what was found, with the numbers that matter.
        suggestion: what usually helps, specific to the kind.
        evidence: the numbers behind the verdict (plain JSON types).
        layers: every layer concerned (``layer`` is the one to look at first).
        cause: the earlier finding this one is a consequence of, as ``{"kind", "layer",
            "step"}`` (``step``: the root finding's ``since_step``), or None for a root cause.
            Set by :func:`gradscope.health.causes.link`.
    """

    kind: str
    severity: str
    layer: str | None
    step: int
    since_step: int
    message: str
    suggestion: str
    evidence: dict = field(default_factory=dict)
    layers: tuple[str, ...] = ()
    cause: dict | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown finding kind {self.kind!r}")
        if self.severity not in SEVERITIES:
            raise ValueError(f"unknown severity {self.severity!r}")
        if not self.layers and self.layer is not None:
            object.__setattr__(self, "layers", (self.layer,))

    @property
    def severity_level(self) -> int:
        """The severity's order: 0 for info, 1 for warning, 2 for critical. (Not a process rank:
        the rank a non-finite gradient came from is ``evidence["rank"]``.)"""
        return SEVERITIES.index(self.severity)

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "severity": self.severity,
            "layer": self.layer,
            "step": int(self.step),
            "since_step": int(self.since_step),
            "message": self.message,
            "suggestion": self.suggestion,
            "evidence": self.evidence,
            "layers": list(self.layers),
            "cause": dict(self.cause) if self.cause else None,
        }
