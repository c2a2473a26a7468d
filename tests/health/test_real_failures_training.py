"""A corpus of real training failures: a learning rate too high, vanishing gradients, dead
ReLUs, a layer FP8 could not hold.

As in ``test_real_failures_numerics.py``, each failure arises from training a small real
model, each has a healthy twin that must stay quiet, and each failure test checks the
finding's kind, layer and steps, where it can against what the test measured itself.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from training_runs import train

from gradscope.monitor.options import HISTOGRAM_EVERY


def regression(g, inputs=8, batch=64):
    """A smooth regression target of the first three inputs."""
    x = torch.randn(batch, inputs, generator=g)
    return x, torch.sin(x[:, :1]) + 0.5 * x[:, 1:2] * x[:, 2:3]


def relu_mlp(seed, inputs=8, width=64):
    torch.manual_seed(seed)
    return nn.Sequential(
        OrderedDict(
            hidden1=nn.Linear(inputs, width),
            relu1=nn.ReLU(),
            hidden2=nn.Linear(width, width),
            relu2=nn.ReLU(),
            out=nn.Linear(width, 1),
        )
    )


# --------------------------------------------------------------------------------------
# 6. A learning rate too high for Adam
# --------------------------------------------------------------------------------------


def train_with_adam(seed, lr, steps):
    model = relu_mlp(seed)
    g = torch.Generator().manual_seed(seed + 1)

    def loss_at(step):
        x, y = regression(g)
        return F.mse_loss(model(x), y)

    return train(model, torch.optim.Adam(model.parameters(), lr=lr), steps, loss_at)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_adam_at_lr_1_explodes_from_its_first_update(seed):
    """Adam moves every weight by about lr per step: at lr=1 the first update throws the loss up
    by five orders of magnitude and the gradients follow, largest nearest the loss. (What follows
    varies with the seed: the loss falls back slowly, or units die; ``divergence`` is found at
    step 60 for two of these three seeds, so only the explosion is asserted.)"""
    report, losses = train_with_adam(seed, lr=1.0, steps=10)
    assert losses[1] > 1e4 * losses[0]
    finding = next(f for f in report.findings if f.kind == "exploding" and f.layer is not None)
    assert finding.layer == "out", str(report)  # first in backward order: where the rise starts
    assert finding.since_step == 1 and finding.step == 9
    assert finding.evidence["rms"]["out"] > 10 * finding.evidence["ceiling"]
    assert not [f for f in report.findings if f.kind == "nonfinite"], str(report)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_adam_at_lr_1e_3_is_healthy(seed):
    report, _ = train_with_adam(seed, lr=1e-3, steps=60)
    assert report.status == "healthy" and not report.findings, str(report)


# --------------------------------------------------------------------------------------
# 7. Vanishing gradients in a deep sigmoid network
# --------------------------------------------------------------------------------------


def deep_mlp(seed, activation, depth=12, width=32):
    """``depth`` blocks ``linear{i}`` + activation, then ``out``. ReLU blocks get He initialisation
    and zero biases; sigmoid blocks keep PyTorch's default initialisation."""
    torch.manual_seed(seed)
    layers = OrderedDict()
    for i in range(depth):
        linear = nn.Linear(16 if i == 0 else width, width)
        if activation is nn.ReLU:
            nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
            nn.init.zeros_(linear.bias)
        layers[f"linear{i}"], layers[f"act{i}"] = linear, activation()
    layers["out"] = nn.Linear(width, 1)
    return nn.Sequential(layers)


def train_deep(seed, activation, steps=10):
    model = deep_mlp(seed, activation)
    g = torch.Generator().manual_seed(seed + 1)

    def loss_at(step):
        x, y = regression(g, inputs=16)
        return F.mse_loss(model(x), y)

    return train(model, torch.optim.Adam(model.parameters(), lr=1e-3), steps, loss_at)[0]


@pytest.mark.parametrize("seed", [0, 1])
def test_a_deep_sigmoid_network_vanishes_toward_the_input(seed):
    report = train_deep(seed, nn.Sigmoid)
    finding = next(f for f in report.findings if f.kind == "vanishing")
    assert finding.layer in ("linear0", "linear1"), str(report)  # the smallest: nearest the input
    assert {f"linear{i}" for i in range(6)} <= set(finding.layers)
    assert not {"linear11", "out"} & set(finding.layers)  # the layers nearest the loss are fine
    assert finding.evidence["rms"][finding.layer] < 1e-5 * finding.evidence["largest_rms"]
    assert finding.since_step == 0 and finding.step == 9
    assert {f.kind for f in report.findings} == {"vanishing"}, str(report)


@pytest.mark.parametrize("seed", [0, 1])
def test_the_same_depth_with_relu_and_he_initialisation_is_healthy(seed):
    report = train_deep(seed, nn.ReLU)
    assert report.status == "healthy" and not report.findings, str(report)


# --------------------------------------------------------------------------------------
# 8. Dead ReLUs from a learning rate too high for SGD
# --------------------------------------------------------------------------------------


def train_relu_regression(seed, lr, steps=20):
    """SGD on non-negative inputs (intensities, counts) with targets in raw units (tens). With
    inputs >= 0 one large step can push every unit's pre-activation below 0 for every input:
    the units never fire again and SGD cannot revive them. Returns the report and the first
    step from which 'hidden' got an all-zero gradient at every step (None if it never did),
    read from the gradient itself."""
    torch.manual_seed(seed)
    model = nn.Sequential(OrderedDict(hidden=nn.Linear(8, 16), relu=nn.ReLU(), out=nn.Linear(16, 1)))
    zero = []
    model.hidden.weight.register_hook(lambda grad: zero.append(bool((grad == 0).all())))
    g = torch.Generator().manual_seed(seed + 1)

    def loss_at(step):
        x = torch.randn(64, 8, generator=g).abs()
        return F.mse_loss(model(x), 10 * (torch.sin(2 * x[:, :1]) + 0.5 * x[:, 1:2] * x[:, 2:3]))

    report, _ = train(model, torch.optim.SGD(model.parameters(), lr=lr), steps, loss_at)
    alive = [step for step, all_zero in enumerate(zero) if not all_zero]
    dead_from = alive[-1] + 1 if alive else 0
    return report, dead_from if dead_from < steps else None


@pytest.mark.parametrize("seed", [0, 5])
def test_sgd_at_a_high_learning_rate_kills_every_unit_of_the_layer(seed):
    """At lr=0.5, 5 of 8 seeds (0, 4, 5, 6, 7) lose every unit within 4 steps, the rest later or
    not at all: dying is a matter of the first batches. The layer reported is the Linear whose
    units died (no gradient reaches its weights); 'out' still learns its bias, so it is not dead."""
    report, dead_from = train_relu_regression(seed, lr=0.5)
    assert dead_from is not None and dead_from <= 4
    dead = [f for f in report.findings if f.kind == "dead"]
    assert [f.layer for f in dead] == ["hidden"], str(report)
    assert dead[0].since_step == dead_from and dead[0].step == 19
    assert dead[0].evidence["zero_frac"] == 1.0
    assert not [f for f in report.findings if f.kind in ("nonfinite", "exploding")], str(report)


@pytest.mark.parametrize("seed", [0, 5])
def test_sgd_at_a_small_learning_rate_keeps_its_units(seed):
    report, dead_from = train_relu_regression(seed, lr=0.05)
    assert dead_from is None
    assert report.status == "healthy" and not report.findings, str(report)


# --------------------------------------------------------------------------------------
# 9. A layer FP8 could not hold: inputs in units 2**40 apart
# --------------------------------------------------------------------------------------

E5M2_MAX = 57344.0


def e5m2_flushed_fraction(grads) -> float:
    """Fraction of the non-zero values of ``grads`` that a cast to float8_e5m2 with per-tensor
    power-of-two amax scaling rounds to zero (torch's own cast, not gradscope's histogram)."""
    values = torch.cat([g.flatten() for g in grads]).float()
    values = values[values != 0]
    k = math.floor(math.log2(E5M2_MAX / float(values.abs().max())))
    scaled = values * 2.0**k
    return float((scaled.to(torch.float8_e5m2) == 0).double().mean())


def train_tabular(seed, normalised, steps=20):
    """Tabular regression whose last 8 features are in units 1e12 (~2**40) larger than they are
    measured in: their values are ~1e-12, and so is the gradient of the first layer's weights
    on them. A per-tensor FP8 scale is set by the large ones, so those flush to zero."""
    torch.manual_seed(seed)
    model = nn.Sequential(OrderedDict(hidden=nn.Linear(16, 32), relu=nn.ReLU(), out=nn.Linear(32, 1)))
    seen = {"weight": [], "bias": []}  # the first layer's gradients, step by step
    model.hidden.weight.register_hook(seen["weight"].append)
    model.hidden.bias.register_hook(seen["bias"].append)
    units = torch.cat([torch.ones(8), torch.full((8,), 1e-12)])
    g = torch.Generator().manual_seed(seed + 1)

    def loss_at(step):
        x = torch.randn(64, 16, generator=g)
        y = torch.tanh(x[:, :4].sum(dim=1, keepdim=True) - x[:, 8:12].sum(dim=1, keepdim=True))
        return F.mse_loss(model(x if normalised else x * units), y)

    report, _ = train(model, torch.optim.Adam(model.parameters(), lr=1e-3), steps, loss_at)
    # the gradients of the newest step with a histogram (watch's default cadence)
    step = (steps - 1) // HISTOGRAM_EVERY * HISTOGRAM_EVERY
    return report, e5m2_flushed_fraction([seen["weight"][step], seen["bias"][step]])


@pytest.mark.parametrize("seed", [0, 1])
def test_inputs_of_very_different_scales_make_the_first_layer_fp8_unfriendly(seed):
    report, flushed = train_tabular(seed, normalised=False)
    assert report.status == "healthy", str(report)  # advice, not a fault
    (finding,) = [f for f in report.findings if f.kind == "fp8_range"]
    assert (finding.severity, finding.layer, finding.layers) == ("info", "hidden", ("hidden",))
    newest = 19 // HISTOGRAM_EVERY * HISTOGRAM_EVERY  # the newest histogram's step (20 steps)
    assert finding.step == finding.since_step == newest
    assert finding.evidence["hist_step"] == {"hidden": newest}
    assert finding.evidence["fp8_e5m2_zero"]["hidden"] == pytest.approx(flushed, abs=1e-3)
    assert flushed > 0.4  # the small features' 8 of the 16 weight columns


@pytest.mark.parametrize("seed", [0, 1])
def test_normalised_inputs_fit_fp8(seed):
    report, flushed = train_tabular(seed, normalised=True)
    assert flushed < 0.01
    assert report.status == "healthy" and not report.findings, str(report)


# --------------------------------------------------------------------------------------
# A confident classifier: a healthy run the spike rule calls exploding
# --------------------------------------------------------------------------------------


def test_a_converged_classifier_is_not_exploding():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 8))
    g = torch.Generator().manual_seed(1)
    centers = 3 * torch.randn(8, 16, generator=g)

    def loss_at(step):
        labels = torch.randint(0, 8, (64,), generator=g)
        return F.cross_entropy(model(centers[labels] + torch.randn(64, 16, generator=g)), labels)

    report, losses = train(model, torch.optim.Adam(model.parameters(), lr=5e-2), 30, loss_at)
    assert max(losses[10:]) < 1e-2 * losses[0]  # it has converged, and stays so
    assert not [f for f in report.findings if f.kind == "exploding"], str(report)
