"""The built-in demo: a small model trained on synthetic data, healthy or with one fault.

``gradscope demo`` (and ``make demo``) trains :class:`DemoNet`, an MLP classifier of ten
blocks, on a synthetic task (inputs drawn from a normal distribution, labels from a fixed
random teacher network; nothing is downloaded) with Adam, under :func:`gradscope.watch`,
optionally with one of the faults gradscope is built to find:

``none``
    ReLU blocks with He initialisation: the report is healthy.
``vanishing``
    sigmoid blocks with PyTorch's default initialisation: each block shrinks the gradient
    about tenfold, so the layers nearest the input get ~1e-9 of the last layer's gradient
    and the model does not learn.
``exploding``
    from a third of the way in, ``blocks.4`` runs a custom activation whose backward
    multiplies the gradient by 1e5 (its forward is correct, so the loss looks normal): the
    gradient explodes from ``blocks.4`` down to the input.
``dead``
    ``blocks.3``'s bias starts at -50 behind its ReLU: the block never activates, gets no
    gradient, and passes none to the layers before it.
``nan``
    from halfway, ``blocks.4`` computes ``torch.where(x > 0, torch.sqrt(x), 0)``: the
    forward is finite, but the unused branch's gradient ``0 * NaN`` is NaN, in ``blocks.4``
    and every layer below it. The optimizer writes the NaN into those weights and the loss
    jumps up.
``fp16``
    the model in pure float16 (``model.half()``), trained without a GradScaler, its loss
    scaled by 1e-4 to give it the gradient sizes of a large model (~1e-6 rather than the
    demo's ~1e-2): every float16 gradient value is below float16's smallest normal number
    (6.1e-5), where it loses precision and, a few binades lower, flushes to zero. The model
    does not learn. (Adam's default ``eps``, 1e-8, is 0 in float16 and would make its first
    update 0/0: this fault uses ``eps=1e-4``, which float16 holds.)
``high-lr``
    a healthy model and Adam, but the learning rate warms up (linearly, over the first half
    of the run) to a peak of 5e-2, fifty times the demo's 1e-3: the loss falls, then climbs
    back as the rate grows, spikes, and the ReLU network collapses to a constant output
    (the loss of guessing, ~2.08). With ``act=True`` (``gradscope demo --act``) the
    learning-rate controller cuts the rate when the loss climbs back or the gradient spikes,
    and the network survives (it does not get back to where a good rate would have taken it:
    ``benchmarks/bench_actions.py``); early stopping names the best step to restore.
``forward-overflow``
    ``blocks.6`` computes its activation, softplus, by hand in float16 (``log1p(exp(x))``
    on ``x.half()``, as a low-precision kernel would): ``exp`` overflows to Inf once the
    block's pre-activations pass 11.1, which they do as training grows them (about step
    40). Forward statistics are on for this fault (``watch(..., forward=True)``), so the
    report names ``blocks.6`` as the module where the Inf was born, in the forward pass.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from gradscope.monitor.monitor import Monitor

FAULTS = ("none", "vanishing", "exploding", "dead", "nan", "fp16", "high-lr", "forward-overflow")

WIDTH = 64
DEPTH = 10
INPUTS = 32
CLASSES = 8
BATCH = 128
FAULTY_BLOCK = {"exploding": 4, "dead": 3, "nan": 4, "forward-overflow": 6}
HIGH_LR = 5e-2
"""The ``high-lr`` fault's peak learning rate (the demo trains at 1e-3)."""
FP16_LOSS_SCALE = 1e-4
"""The ``fp16`` fault's loss factor: the demo's gradients (~1e-2) become a large model's (~1e-6)."""


@dataclass(frozen=True)
class Expected:
    """What the health report should say about a fault: its finding kind and layer."""

    kind: str | None
    layer: str | None
    explanation: str


EXPECTED = {
    "none": Expected(None, None, "healthy training: no findings about gradients"),
    "vanishing": Expected("vanishing", "input", "gradients vanish toward the input, worst in 'input'"),
    "exploding": Expected(
        "exploding", "blocks.4.linear", "gradients explode from 'blocks.4.linear' (a custom op's faulty backward)"
    ),
    "dead": Expected(
        "dead", "blocks.3.linear", "'blocks.3.linear' is dead (bias -50 behind a ReLU); the layers before it starve"
    ),
    "nan": Expected("nonfinite", "blocks.4.linear", "NaN gradients start in 'blocks.4.linear' (the torch.where trap)"),
    "fp16": Expected(
        "underflow",
        "input",
        "pure float16 without a GradScaler: every gradient is below float16's smallest normal number, 'input' first",
    ),
    "high-lr": Expected(
        "divergence", None, "a learning rate 50x too high: the loss climbs back, diverges, and the ReLU network dies"
    ),
    "forward-overflow": Expected(
        "nonfinite",
        "blocks.6",
        "an Inf is born in the forward pass in 'blocks.6' (exp in float16 overflows as its pre-activations grow)",
    ),
}
"""For each fault, the finding the health report must contain and the layer it must name."""


class _FaultyBackwardReLU(torch.autograd.Function):
    """ReLU whose backward multiplies the gradient by ``factor``: a custom op's bug."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.factor = factor
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        return grad * (x > 0) * ctx.factor, None


class Block(nn.Module):
    """``activation(linear(x))`` with a switchable activation."""

    def __init__(self, width: int, activation: str) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        if self.activation == "relu":
            return torch.relu(x)
        if self.activation == "sigmoid":
            return torch.sigmoid(x)
        if self.activation == "faulty_backward":
            return _FaultyBackwardReLU.apply(x, 1e5)
        if self.activation == "where_sqrt":
            return torch.where(x > 0, torch.sqrt(x), 0.0)
        if self.activation == "softplus_half":
            return torch.log1p(torch.exp(x.half())).to(x.dtype)
        raise ValueError(f"unknown activation {self.activation!r}")


class DemoNet(nn.Module):
    """``input``, then ``DEPTH`` blocks ``blocks.0``, ``blocks.1``, ..., then ``head``: an MLP classifier."""

    def __init__(self, activation: str = "relu") -> None:
        super().__init__()
        self.input = nn.Linear(INPUTS, WIDTH)
        self.blocks = nn.ModuleList(Block(WIDTH, activation) for _ in range(DEPTH))
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def build(fault: str, device: str | torch.device = "cpu", seed: int = 0) -> DemoNet:
    """The demo model for ``fault``, initialised deterministically from ``seed``."""
    if fault not in FAULTS:
        raise ValueError(f"unknown fault {fault!r}; choose from {', '.join(FAULTS)}")
    torch.manual_seed(seed)
    model = DemoNet("sigmoid" if fault == "vanishing" else "relu")
    if fault != "vanishing":
        with torch.no_grad():
            for block in model.blocks:
                nn.init.kaiming_normal_(block.linear.weight, nonlinearity="relu")
    if fault == "dead":
        with torch.no_grad():
            model.blocks[FAULTY_BLOCK["dead"]].linear.bias.fill_(-50.0)
    if fault == "forward-overflow":
        model.blocks[FAULTY_BLOCK["forward-overflow"]].activation = "softplus_half"
    if fault == "fp16":
        model.half()
    return model.to(device)


class SyntheticTask:
    """Batches of a fixed random teacher's labels: ``x ~ N(0, 1)``, ``y = argmax(teacher(x))``.

    The teacher is a random 2-layer tanh network, so the task is learnable but not trivially
    (the loss keeps falling for hundreds of steps).
    """

    def __init__(self, device: str | torch.device = "cpu", seed: int = 1) -> None:
        self.device = torch.device(device)
        g = torch.Generator().manual_seed(seed)
        self._w1 = torch.randn(INPUTS, 2 * WIDTH, generator=g).to(self.device) / INPUTS**0.5
        self._w2 = torch.randn(2 * WIDTH, CLASSES, generator=g).to(self.device) / WIDTH**0.5
        self._generator = torch.Generator(device=self.device).manual_seed(seed + 1)

    def batch(self, size: int = BATCH) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(size, INPUTS, generator=self._generator, device=self.device)
        return x, (torch.tanh(x @ self._w1) @ self._w2).argmax(dim=1)


def run(
    fault: str = "none",
    steps: int = 300,
    *,
    device: str | torch.device = "cpu",
    log_dir: str | os.PathLike | None = None,
    exporters: Sequence = (),
    eval_every: int = 25,
    progress: Callable[[int, float], None] | None = None,
    act: bool = False,
) -> Monitor:
    """Train the demo model with ``fault`` for ``steps`` steps under :func:`gradscope.watch`.

    The monitor watches every layer with update tracking (and, for ``forward-overflow``,
    every module's outputs) and writes to ``log_dir`` and ``exporters`` if given. Every step
    reports its loss to ``mon.step``; every ``eval_every`` steps a held-out batch's loss and
    accuracy go to ``mon.log`` (``val_loss``, ``val_accuracy``). ``progress`` is called after
    each step with the step index and the loss tensor. The ``fp16`` fault trains in float16
    and reports its loss scaled by :data:`FP16_LOSS_SCALE` (the held-out loss is not scaled).

    ``act=True`` acts on the findings (:mod:`gradscope.actions`): the run halts at the first
    NaN/Inf (``halt_on="nonfinite"``; the :class:`~gradscope.TrainingHalted` is kept as
    ``mon.halted``), the learning-rate controller (:class:`~gradscope.AdaptiveLR`) watches
    for explosions, spikes, divergence and plateaus, and early stopping on ``val_loss``
    (patience 5 evaluations) ends the run when it stops improving.

    Returns:
        The closed monitor (its history and report stay readable).
    """
    from gradscope.actions import AdaptiveLR, EarlyStopping, TrainingHalted
    from gradscope.monitor.start import watch

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    model = build(fault, device)
    dtype = next(model.parameters()).dtype
    scale = FP16_LOSS_SCALE if fault == "fp16" else 1.0
    task = SyntheticTask(device)
    # Adam's default eps (1e-8) is 0 in float16: pure-float16 training needs one float16 holds.
    lr = HIGH_LR if fault == "high-lr" else 1e-3
    opt = torch.optim.Adam(model.parameters(), lr=lr, eps=1e-4 if dtype == torch.float16 else 1e-8)
    warmup = max(steps // 2, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) if fault == "high-lr" else 1.0
    )
    held_out = task.batch(1024)
    forward = fault == "forward-overflow"
    actions = {}
    if act:
        actions = {"halt_on": "nonfinite", "adapt_lr": AdaptiveLR(), "early_stopping": EarlyStopping()}
    options = {"track_updates": True, "log_dir": log_dir, "exporters": exporters, "forward": forward, **actions}
    with watch(model, optimizer=opt, **options) as mon:
        for step in range(steps):
            if fault == "exploding" and step == steps // 3:
                model.blocks[FAULTY_BLOCK["exploding"]].activation = "faulty_backward"
            if fault == "nan" and step == steps // 2:
                model.blocks[FAULTY_BLOCK["nan"]].activation = "where_sqrt"
            x, y = task.batch()
            loss = nn.functional.cross_entropy(model(x.to(dtype)).float(), y) * scale
            loss.backward()
            try:
                mon.step(loss=loss)
            except TrainingHalted:
                break  # before opt.step(): the bad gradients never reach the weights
            opt.step()
            opt.zero_grad(set_to_none=True)
            schedule.step()
            if (step + 1) % eval_every == 0 or step == steps - 1:
                with torch.no_grad():
                    logits = model(held_out[0].to(dtype)).float()
                    val_loss = nn.functional.cross_entropy(logits, held_out[1])
                    accuracy = (logits.argmax(dim=1) == held_out[1]).float().mean()
                mon.log(val_loss=val_loss, val_accuracy=accuracy)
            if progress is not None:
                progress(step, loss.detach())
            if mon.should_stop:
                break
    return mon
