"""A corpus of real numerical failures: float16 underflow and overflow, log(0), 0/0 and sqrt'(0).

Each failure arises from training a small real model (nothing edits a gradient or injects a
NaN), and each has a healthy twin, the same model fixed the usual way, which must stay quiet.
Every failure test checks the finding's kind, the layer or module it names, the pass a NaN/Inf
was born in, and its step against the step the training loop itself saw go wrong. The
learning dynamics (a learning rate too high, vanishing, dead units, FP8 range) are in
``test_real_failures_training.py``.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from training_runs import train

from gradscope.health.findings import SUGGESTIONS
from gradscope.monitor.options import HISTOGRAM_EVERY


def first_nonfinite(losses) -> int:
    return next(step for step, loss in enumerate(losses) if not math.isfinite(loss))


def only(report, kind):
    found = [f for f in report.findings if f.kind == kind]
    assert len(found) == 1, str(report)
    return found[0]


def roots(report, kind):
    """The findings of ``kind`` that are not consequences of another finding of ``kind`` (the
    cause-linking of other kinds is not what these tests are about)."""
    return [f for f in report.findings if f.kind == kind and (f.cause is None or f.cause["kind"] != kind)]


def consequences(report, root):
    return [f for f in report.findings if f.cause == {"kind": root.kind, "layer": root.layer, "step": root.since_step}]


# --------------------------------------------------------------------------------------
# 1. float16 without a GradScaler: gradients below float16's smallest normal, or flushed
# --------------------------------------------------------------------------------------


def tanh_mlp(dtype, depth=6, width=32):
    torch.manual_seed(0)
    layers = OrderedDict()
    for i in range(depth):
        layers[f"linear{i}"] = nn.Linear(16 if i == 0 else width, width)
        layers[f"tanh{i}"] = nn.Tanh()
    layers["head"] = nn.Linear(width, 1)
    return nn.Sequential(layers).to(dtype)


def train_tanh_mlp(dtype, loss_scale, steps=20):
    """SGD on a regression whose mean-square loss is scaled by ``loss_scale`` (a small loss, as
    a loss weight or a mean over many elements makes it); the loss itself is float32."""
    model = tanh_mlp(dtype)
    g = torch.Generator().manual_seed(1)

    def loss_at(step):
        x = torch.randn(64, 16, generator=g)
        return F.mse_loss(model(x.to(dtype)).float(), torch.tanh(x[:, :1])) * loss_scale

    return train(model, torch.optim.SGD(model.parameters(), lr=1e-2), steps, loss_at)[0]


def test_float16_gradients_of_a_small_loss_are_subnormal_not_dead():
    report = train_tanh_mlp(torch.float16, 1e-4)
    finding = only(report, "underflow")
    fractions = finding.evidence["below_normal_fraction"]
    assert set(finding.layers) == set(fractions) == {row.name for row in report.layers}, str(report)
    assert fractions[finding.layer] == max(fractions.values())  # the worst layer is named first
    assert finding.evidence["pass"] == "backward" and finding.evidence["dtype"] == "float16"
    # underflowing at the newest histogram's step (default cadence; 20 steps), and it says so
    newest = 19 // HISTOGRAM_EVERY * HISTOGRAM_EVERY
    assert finding.step == finding.since_step == newest
    assert set(finding.evidence["hist_step"].values()) == {newest}
    assert not [f for f in report.findings if f.kind in ("dead", "vanishing")], str(report)


def test_float16_gradients_of_a_smaller_loss_flush_to_zero_and_are_not_called_dead():
    """At 1e-6 the loss's gradient is subnormal at the model's output already: 'head' keeps a few
    subnormal values and every layer below it gets exact zeros, from the first step."""
    report = train_tanh_mlp(torch.float16, 1e-6)
    subnormal, flushed = [f for f in report.findings if f.kind == "underflow"]
    assert subnormal.layer == "head" and subnormal.cause is None, str(report)
    assert flushed.evidence["rule"] == "flushed"
    assert flushed.layers == tuple(f"linear{i}" for i in range(6))
    assert flushed.since_step == 0 and flushed.step == 19
    assert flushed.cause == {"kind": "underflow", "layer": "head", "step": subnormal.since_step}
    assert not [f for f in report.findings if f.kind == "dead"], str(report)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_same_small_loss_in_float32_or_bfloat16_is_healthy(dtype):
    report = train_tanh_mlp(dtype, 1e-4)
    assert report.status == "healthy" and not report.findings, str(report)


# --------------------------------------------------------------------------------------
# 2. float16 forward overflow: a hand-written softmax whose exp overflows as attention sharpens
# --------------------------------------------------------------------------------------

with torch.autocast("cpu", dtype=torch.float16):
    CPU_FLOAT16_AUTOCAST = (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float16


class Attention(nn.Module):
    """Single-head self-attention, scaled by 1/sqrt(d). ``safe=False``: softmax written by hand
    as ``exp(s) / sum(exp(s))``, which overflows in float16 once a logit passes ln(65504) = 11.09;
    ``safe=True``: ``torch.softmax``, which subtracts the maximum first."""

    def __init__(self, width: int, safe: bool) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)
        self.safe = safe
        self.overflows = []  # per call: did exp(logits) overflow? (the test's own record)

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        self.overflows.append(bool(torch.isinf(torch.exp(logits.detach())).any()))
        if self.safe:
            weights = torch.softmax(logits, dim=-1)
        else:
            weights = torch.exp(logits)
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights @ v


class Retriever(nn.Module):
    def __init__(self, safe: bool, width: int = 32) -> None:
        super().__init__()
        self.embed = nn.Linear(4, width)
        self.attn = Attention(width, safe)
        self.head = nn.Linear(width, 1)

    def forward(self, x):
        return self.head(self.attn(self.embed(x))[:, 0]).squeeze(-1)


def train_retriever(safe, steps=25):
    """Mixed precision (float16 autocast, float32 weights, Adam): retrieve the value (feature 2) of
    the token whose key (feature 1) is largest. Learning to retrieve sharpens the attention, so
    its logits grow, past 11.09 around step 15-25."""
    torch.manual_seed(1)
    model = Retriever(safe)
    g = torch.Generator().manual_seed(2)

    def loss_at(step):
        x = torch.randn(32, 8, 4, generator=g)
        y = x[torch.arange(32), x[..., 1].argmax(dim=-1), 2]
        with torch.autocast("cpu", dtype=torch.float16):
            out = model(x)
        return F.mse_loss(out.float(), y)

    report, _ = train(model, torch.optim.Adam(model.parameters(), lr=1e-2), steps, loss_at, forward=True)
    return report, model.attn.overflows.index(True) if True in model.attn.overflows else None


@pytest.mark.skipif(not CPU_FLOAT16_AUTOCAST, reason="this torch has no float16 autocast on CPU")
def test_float16_exp_overflow_in_attention_is_born_in_the_forward_pass_of_the_attention():
    report, first_overflow = train_retriever(safe=False)
    (root,) = roots(report, "nonfinite")
    assert root.layer == "attn" and root.evidence["module"] == "attn", str(report)  # not 'head', after it
    assert root.evidence["pass"] == "forward" and root.evidence["where"] == "outputs"
    assert root.since_step == root.step == first_overflow
    assert 10 <= root.since_step <= 24
    # its consequence: the NaN gradients, first in the layer nearest the loss
    assert [(f.kind, f.layer) for f in consequences(report, root)] == [("nonfinite", "attn.v")]


@pytest.mark.skipif(not CPU_FLOAT16_AUTOCAST, reason="this torch has no float16 autocast on CPU")
def test_attention_with_torch_softmax_is_healthy():
    report, first_overflow = train_retriever(safe=True)
    assert first_overflow is not None  # exp(logits) would overflow: torch.softmax never computes it
    assert report.status == "healthy" and not report.findings, str(report)


# --------------------------------------------------------------------------------------
# 3. log(0) in a hand-written cross-entropy
# --------------------------------------------------------------------------------------


class CrossEntropy(nn.Module):
    """``-(y * log(softmax(logits))).sum()``, by hand (``safe=False``): once a class's probability
    rounds to exactly 0 (a logit gap above ~104 in float32), ``0 * log(0)`` is NaN; or
    ``F.cross_entropy`` (``safe=True``), which works with log-probabilities."""

    def __init__(self, safe: bool) -> None:
        super().__init__()
        self.safe = safe

    def forward(self, logits, labels):
        if self.safe:
            return F.cross_entropy(logits, labels)
        p = torch.softmax(logits, dim=-1)
        return -(F.one_hot(labels, logits.shape[-1]) * torch.log(p)).sum(dim=-1).mean()


class ClassifierWithLoss(nn.Module):
    """An MLP classifier that returns its loss, as models given labels do."""

    def __init__(self, safe: bool) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 8))
        self.loss = CrossEntropy(safe)

    def forward(self, x, labels):
        return self.loss(self.net(x), labels)


def train_classifier(safe, *, loss_inside=True, steps=20, **watch_options):
    """Adam (lr 0.1) on well-separated clusters with 3% label noise: the classifier grows very
    confident, and some probabilities of some examples round to exactly 0 (from step 16)."""
    torch.manual_seed(1)
    model = ClassifierWithLoss(safe)
    g = torch.Generator().manual_seed(2)
    centers = 3 * torch.randn(8, 16, generator=g)
    zero_probability = []

    def loss_at(step):
        labels = torch.randint(0, 8, (64,), generator=g)
        x = centers[labels] + torch.randn(64, 16, generator=g)
        noisy = torch.rand(64, generator=g) < 0.03
        labels = torch.where(noisy, torch.randint(0, 8, (64,), generator=g), labels)
        with torch.no_grad():
            zero_probability.append(bool((torch.softmax(model.net(x), dim=-1) == 0).any()))
        return model(x, labels) if loss_inside else CrossEntropy(safe)(model.net(x), labels)

    watched = model if loss_inside else model.net
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    report, losses = train(watched, optimizer, steps, loss_at, **watch_options)
    return report, losses, zero_probability.index(True) if True in zero_probability else None


def test_log_of_zero_in_a_loss_module_is_born_in_that_module():
    report, losses, saturated = train_classifier(safe=False, forward=True)
    (root,) = roots(report, "nonfinite")
    assert root.layer == "loss" and root.evidence["module"] == "loss", str(report)
    assert root.evidence["pass"] == "forward" and root.evidence["where"] == "outputs"
    assert root.since_step == first_nonfinite(losses) == saturated  # the first exact 0 probability
    assert 10 <= root.since_step <= 19


def test_log_of_zero_without_forward_statistics_says_the_loss_was_born_nonfinite():
    """Without forward statistics no module can be named, but a non-finite loss still proves the
    forward pass: the finding is about the loss (no layer) and says how to name the module."""
    report, losses, saturated = train_classifier(safe=False)
    (root,) = roots(report, "nonfinite")
    assert root.layer is None and root.evidence["pass"] == "forward", str(report)
    assert root.since_step == first_nonfinite(losses) == saturated
    assert root.evidence["loss"] == "nan"
    assert "forward=True" in root.message


def test_log_of_zero_in_a_loss_outside_the_watched_model_is_said_to_be_outside_it():
    report, losses, saturated = train_classifier(safe=False, loss_inside=False, forward=True)
    (root,) = roots(report, "nonfinite")
    assert root.layer is None and root.evidence["pass"] == "forward", str(report)
    assert root.since_step == first_nonfinite(losses) == saturated
    assert "Forward statistics are off" not in root.message, root.message


@pytest.mark.parametrize("loss_inside", [True, False])
def test_cross_entropy_from_log_probabilities_is_healthy(loss_inside):
    """Healthy, with one info finding, true and unrelated: ``fp8_range`` on the output layer, whose
    gradient (p - y) spans more binades than E5M2 holds once the classifier is this confident."""
    report, losses, saturated = train_classifier(safe=True, loss_inside=loss_inside, forward=True)
    assert saturated is not None  # the same probabilities round to 0, harmlessly
    assert all(map(math.isfinite, losses))
    assert {f.kind for f in report.findings} <= {"fp8_range"}, str(report)
    assert report.status == "healthy" and not [f for f in report.findings if f.severity != "info"], str(report)


# --------------------------------------------------------------------------------------
# 4. 0/0: normalising an all-zero row by its norm
# --------------------------------------------------------------------------------------


class L2Normalize(nn.Module):
    def __init__(self, safe: bool) -> None:
        super().__init__()
        self.safe = safe

    def forward(self, x):
        if self.safe:
            return F.normalize(x, dim=-1)  # divides by max(norm, eps)
        return x / x.norm(dim=-1, keepdim=True)


def train_bag_of_words(safe, steps=16):
    """Word-count vectors (32 words, 6 per document on average), normalised to unit length: a
    document with no words, the first at step 10, is an all-zero row and 0/0 is NaN."""
    torch.manual_seed(2)
    model = nn.Sequential(
        OrderedDict(normalize=L2Normalize(safe), hidden=nn.Linear(32, 32), relu=nn.ReLU(), out=nn.Linear(32, 1))
    )
    g = torch.Generator().manual_seed(3)
    topic = torch.randn(32, generator=g)
    empty = []

    def loss_at(step):
        counts = torch.poisson(torch.full((32, 32), 6 / 32), generator=g)
        empty.append(bool((counts.sum(dim=-1) == 0).any()))
        return F.mse_loss(model(counts).squeeze(-1), counts @ topic / 6)

    report, _ = train(model, torch.optim.Adam(model.parameters(), lr=1e-3), steps, loss_at, forward=True)
    return report, empty.index(True) if True in empty else None


def test_division_by_a_zero_norm_is_born_in_the_normalising_module():
    report, first_empty = train_bag_of_words(safe=False)
    (root,) = roots(report, "nonfinite")
    assert root.layer == "normalize" and root.evidence["module"] == "normalize", str(report)
    assert root.evidence["pass"] == "forward" and root.evidence["where"] == "outputs"
    assert root.evidence["nans"] > 0
    assert first_empty is not None and root.since_step == first_empty  # step 10 with this torch


def test_normalising_with_an_epsilon_is_healthy():
    report, first_empty = train_bag_of_words(safe=True)
    assert first_empty is not None  # the same empty document, harmless
    assert report.status == "healthy" and not report.findings, str(report)


# --------------------------------------------------------------------------------------
# 5. sqrt at 0 in backward: pairwise distances include each point's distance to itself
# --------------------------------------------------------------------------------------


class PairwiseDistances(nn.Module):
    """``sqrt(sum((a_i - a_j)**2))``: finite, but its derivative at the diagonal's 0 is ``inf * 0 =
    NaN`` (``safe=False``); ``sqrt(... + eps)`` (``safe=True``) is finite there."""

    def __init__(self, safe: bool) -> None:
        super().__init__()
        self.safe = safe

    def forward(self, a):
        squared = (a[:, None, :] - a[None, :, :]).square().sum(dim=-1)
        return torch.sqrt(squared + 1e-12) if self.safe else torch.sqrt(squared)


class Siamese(nn.Module):
    def __init__(self, safe: bool) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
        self.distances = PairwiseDistances(safe)
        self.calibrate = nn.Linear(1, 1)  # a layer after the distances: its gradient stays finite

    def forward(self, x):
        return self.calibrate(self.distances(self.encoder(x)).unsqueeze(-1)).squeeze(-1)


def train_siamese(safe, forward, steps=6):
    """Metric learning: a pair's score says whether its two points share a cluster."""
    torch.manual_seed(0)
    model = Siamese(safe)
    g = torch.Generator().manual_seed(1)
    centers = 2 * torch.randn(4, 8, generator=g)

    def loss_at(step):
        labels = torch.randint(0, 4, (16,), generator=g)
        same = (labels[:, None] == labels[None, :]).float()
        return F.binary_cross_entropy_with_logits(-model(centers[labels] + torch.randn(16, 8, generator=g)), same)

    return train(model, torch.optim.Adam(model.parameters(), lr=1e-3), steps, loss_at, forward=forward)


@pytest.mark.parametrize("forward", [False, True])
def test_sqrt_at_zero_is_born_in_backward_in_the_first_layer_before_it(forward):
    report, losses = train_siamese(safe=False, forward=forward)
    assert math.isfinite(losses[0]) and not math.isfinite(losses[1])  # NaN weights from step 1
    (root,) = roots(report, "nonfinite")
    assert root.evidence["pass"] == "backward", str(report)
    assert root.layer == "encoder.2" and root.layers == ("encoder.2", "encoder.0")  # not 'calibrate'
    assert root.since_step == root.step == 0
    assert report.first_nonfinite == (0, "encoder.2")


@pytest.mark.parametrize("forward", [False, True])
def test_sqrt_with_an_epsilon_is_healthy(forward):
    report, losses = train_siamese(safe=True, forward=forward)
    assert all(map(math.isfinite, losses))
    assert report.status == "healthy" and not report.findings, str(report)


# --------------------------------------------------------------------------------------
# Pure-float16 Adam: the NaN is born in the optimizer step
# --------------------------------------------------------------------------------------


def test_pure_float16_adam_is_reported_as_born_in_the_optimizer_step():
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(hidden=nn.Linear(8, 32), relu=nn.ReLU(), out=nn.Linear(32, 1))).half()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)

    def loss_at(step):
        x = torch.randn(64, 8, generator=g)
        return F.mse_loss(model(x.half()).float(), torch.sin(x[:, :1]))

    report, losses = train(model, optimizer, 4, loss_at, optimizer=optimizer, track_updates=True, forward=True)
    assert math.isfinite(losses[0]) and not math.isfinite(losses[1])
    (root,) = roots(report, "nonfinite")
    assert root.since_step == 0, str(report)  # the step whose update went non-finite
    assert root.evidence["pass"] == "optimizer" and "hidden" in root.layers, str(report)
    assert root.suggestion == SUGGESTIONS["nonfinite_optimizer"]
    # The NaN the next forward pass meets in 'hidden' is listed as its consequence.
    assert all(f.cause is not None for f in report.findings if f.kind == "nonfinite" and f is not root)
