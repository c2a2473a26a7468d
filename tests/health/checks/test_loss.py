"""Loss and metric checks on loss sequences: plateau, divergence, over- and underfitting."""

import re

import numpy as np
import torch

import gradscope
from gradscope.health.checks.loss import direction


def monitor_with_losses(losses, logged=None):
    """A monitor fed a loss per step, and metrics logged after the given steps."""
    logged = logged or {}
    mon = gradscope.watch(torch.nn.Linear(2, 1))
    for step, value in enumerate(losses):
        mon.step(loss=float(value))
        if step in logged:
            mon.log(**logged[step])
    return mon


def findings(mon, kind):
    return [f for f in mon.report().findings if f.kind == kind]


def test_metric_directions_follow_names():
    assert direction("val_accuracy") == direction("top1_f1") == direction("recall@5") == 1
    assert direction("val_loss") == direction("error_rate") == -1
    assert direction("lr") == direction("tokens_per_s") == 0


def test_plateau_names_the_best_step():
    losses = np.r_[np.linspace(2.0, 0.5, 100), np.full(300, 0.5) + 1e-5 * np.sin(np.arange(300))]
    with monitor_with_losses(losses) as mon:
        (plateau,) = findings(mon, "plateau")
    assert plateau.severity == "info"
    assert 95 <= plateau.evidence["best_step"] <= 110
    assert plateau.evidence["waited"] >= 200
    assert mon.report().status == "healthy"


def test_no_plateau_while_improving():
    with monitor_with_losses(np.exp(-np.arange(400) / 100)) as mon:
        assert not findings(mon, "plateau")
        assert not findings(mon, "divergence")


def test_divergence_when_the_loss_rises_steadily():
    losses = np.r_[np.linspace(2.0, 1.0, 100), 1.0 * 1.02 ** np.arange(100)]
    with monitor_with_losses(losses) as mon:
        (divergence,) = findings(mon, "divergence")
        assert divergence.severity == "critical" and mon.report().status == "critical"
        assert 95 <= divergence.evidence["best_step"] <= 105


def test_divergence_when_the_loss_jumps_and_stays_up():
    losses = np.r_[np.linspace(2.0, 0.8, 150), np.full(150, 2.0)]
    with monitor_with_losses(losses) as mon:
        (divergence,) = findings(mon, "divergence")
        assert divergence.evidence["pattern"] == "jump"
        assert re.search(r"jumped at step 15[0-4]\b", divergence.message)  # within the smoothing window
        assert 140 <= divergence.evidence["best_step"] <= 150
        assert not findings(mon, "underfitting"), "it learned, then broke: that is not underfitting"
    with monitor_with_losses(np.r_[np.linspace(2.0, 0.8, 150), np.full(30, 2.0), np.full(120, 0.8)]) as mon:
        assert not findings(mon, "divergence"), "a spike that recovered"


def test_noisy_but_flat_loss_is_not_divergence():
    rng = np.random.default_rng(0)
    with monitor_with_losses(1.0 + 0.3 * rng.standard_normal(300) ** 2) as mon:
        assert not findings(mon, "divergence")


def test_underfitting_when_the_loss_does_not_move():
    rng = np.random.default_rng(1)
    with monitor_with_losses(2.3 + 0.01 * rng.standard_normal(400)) as mon:
        (under,) = findings(mon, "underfitting")
        assert under.severity == "warning"
    with monitor_with_losses(2.3 + 0.01 * rng.standard_normal(100)) as mon:
        assert not findings(mon, "underfitting"), "too early to judge"
    with monitor_with_losses(np.r_[np.linspace(2.3, 0.5, 300), np.full(300, 0.5)]) as mon:
        assert not findings(mon, "underfitting"), "it learned, then plateaued"


def test_overfitting_when_validation_loss_rises_while_training_falls():
    train = np.linspace(2.0, 0.2, 500)
    val = {
        100: {"val_loss": 1.5},
        200: {"val_loss": 1.2},
        300: {"val_loss": 1.3},
        400: {"val_loss": 1.45},
        499: {"val_loss": 1.6},
    }
    with monitor_with_losses(train, val) as mon:
        (over,) = findings(mon, "overfitting")
    assert over.severity == "warning" and over.evidence["best_step"] == 200 and over.evidence["train_metric"] == "loss"
    healthy = {
        100: {"val_loss": 1.5},
        200: {"val_loss": 1.2},
        300: {"val_loss": 1.0},
        400: {"val_loss": 0.9},
        499: {"val_loss": 0.85},
    }
    with monitor_with_losses(train, healthy) as mon:
        assert not findings(mon, "overfitting")


def test_overfitting_from_a_train_validation_accuracy_gap():
    logged = {50: {"train_accuracy": 0.80, "val_accuracy": 0.78}, 99: {"train_accuracy": 0.99, "val_accuracy": 0.70}}
    with monitor_with_losses(np.linspace(1, 0.5, 100), logged) as mon:
        (over,) = findings(mon, "overfitting")
    assert abs(over.evidence["gap"] - 0.29) < 1e-9


def test_validation_plateau_counts_evaluations():
    logged = {s: {"val_accuracy": 0.9 if s > 10 else 0.5} for s in range(0, 100, 10)}
    with monitor_with_losses(np.linspace(1, 0.5, 100), logged) as mon:
        plateaus = [f for f in findings(mon, "plateau") if f.evidence["metric"] == "val_accuracy"]
    assert plateaus and plateaus[0].evidence["best_step"] == 20
