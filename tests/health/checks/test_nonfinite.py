"""The ``nonfinite`` check (NaN/Inf gradients and losses) and ``overflow`` (GradScaler skips):
from records fed to a ``RunState``, and on a real model with a ``torch.where(x > 0, sqrt(x), 0)``
trap whose backward produces NaN."""

import json
import math

import numpy as np
import run_builders
import torch
from torch import nn

from gradscope import Thresholds
from gradscope.health.checks import nonfinite
from gradscope.health.findings import SUGGESTIONS
from gradscope.health.report import assess
from gradscope.health.view import view_of
from gradscope.run import records
from gradscope.run.state import RunState
from gradscope.stats import layout

NAMES = ("a", "b", "c")


def run_state(names=NAMES) -> RunState:
    return run_builders.run_state(names, numel=10)


def sampled(step, nans=(0, 0, 0), infs=(0, 0, 0), present=(True, True, True), order=(2, 1, 0), **ranks):
    rows = np.zeros((len(nans), layout.ROW_WIDTH))
    rows[:, layout.NUMEL] = 10
    rows[:, layout.NANS] = nans
    rows[:, layout.INFS] = infs
    finite = 10 - rows[:, layout.NANS] - rows[:, layout.INFS]
    rows[:, layout.SUMSQ] = 0.01 * finite
    rows[:, layout.MAX_ABS] = 0.1
    return records.Sampled(step, rows, np.array(present), np.array(order), **ranks)


def detect(state, thresholds=None):
    t = thresholds or Thresholds()
    return nonfinite.detect(view_of(state, t), t)


def scales_with_skips(steps, skipped, grow_at=()):
    """GradScaler scales per step: halved after each skipped step, doubled at ``grow_at``."""
    scale, out = 2.0**16, []
    for step in range(steps):
        if step - 1 in skipped:
            scale /= 2
        if step in grow_at:
            scale *= 2
        out.append(scale)
    return out


# --------------------------------------------------------------------------------------
# Non-finite gradients
# --------------------------------------------------------------------------------------


def test_first_nonfinite_step_names_the_layer_nearest_the_loss():
    state = run_state()
    for step in range(2):
        state.apply(sampled(step))
    state.apply(sampled(2, nans=(0, 3, 0), infs=(0, 0, 1), order=(2, 1, 0)))  # 'c' is nearest the loss
    state.apply(sampled(3, nans=(5, 5, 5), order=(2, 1, 0)))
    state.apply(sampled(4))
    (finding,) = detect(state)
    assert (finding.kind, finding.severity) == ("nonfinite", "critical")
    assert finding.layer == "c" and finding.layers == ("c", "b")
    assert finding.step == finding.since_step == 2
    assert finding.evidence == {
        "pass": "unknown",  # no loss given, no forward statistics: the pass cannot be told
        "first_step": 2,
        "layers": ["c", "b"],
        "nans": 3,
        "infs": 1,
        "order": "backward",
        "sampled_steps_affected": 2,
    }
    assert "first at step 2: first in layer 'c' (nearest the loss in backward order)" in finding.message
    assert "followed by 1 more layers ('b')" in finding.message and "3 NaN and 1 Inf" in finding.message
    assert finding.suggestion == SUGGESTIONS["nonfinite"]
    json.dumps(finding.to_dict())
    report = assess(state, Thresholds())
    assert report.status == "critical" and report.first_nonfinite == (2, "c")


def test_without_backward_order_the_last_layer_in_model_order_comes_first():
    state = run_state()
    state.apply(sampled(0, nans=(1, 0, 2), order=(-1, -1, -1)))
    (finding,) = detect(state)
    assert finding.layers == ("c", "a") and finding.evidence["order"] == "model"
    assert "last in model order" in finding.message
    state = run_state()
    state.apply(sampled(0, nans=(1, 0, 2), order=(0, 1, -1)))  # partly known is not known
    (finding,) = detect(state)
    assert finding.layers == ("c", "a") and finding.evidence["order"] == "model"


def test_backward_order_decides_even_against_model_order():
    state = run_state()
    state.apply(sampled(0, infs=(4, 0, 1), order=(0, 2, 1)))  # 'a' nearest the loss (a shared, reused layer)
    (finding,) = detect(state)
    assert finding.layers == ("a", "c") and finding.evidence["infs"] == 5 and finding.evidence["nans"] == 0
    assert "followed by" in finding.message and "; 0 NaN and 5 Inf values" in finding.message


def test_a_single_layer_message_has_no_followers():
    state = run_state()
    state.apply(sampled(0, nans=(0, 1, 0)))
    (finding,) = detect(state)
    assert finding.layers == ("b",) and "followed by" not in finding.message


def test_finite_gradients_and_absent_rows_are_silent():
    state = run_state()
    for step in range(5):
        state.apply(sampled(step))
    # An absent row's numbers mean nothing, NaN counts included.
    state.apply(sampled(5, nans=(0, 7, 0), present=(True, False, True)))
    assert detect(state) == []
    assert assess(state, Thresholds()).status == "healthy"


def test_distributed_events_name_the_rank():
    state = run_state()
    state.apply(sampled(0, nans=(0, 2, 0), nonfinite_rank=np.array([-1, 3, -1]), nonfinite_ranks=np.array([0, 3, 0])))
    (finding,) = detect(state)
    assert finding.evidence["rank"] == 3 and finding.evidence["ranks_affected"] == 3
    assert "; on rank 3 and 2 more ranks;" in finding.message
    state = run_state()
    state.apply(sampled(0, nans=(0, 2, 0), nonfinite_rank=np.array([-1, 1, -1]), nonfinite_ranks=np.array([0, 2, 0])))
    assert "; on rank 1 and 1 more rank;" in detect(state)[0].message


def test_sharded_runs_say_the_rank_cannot_be_known():
    """FSDP2 shards name no rank (where a NaN landed is not where it came from): the finding
    says so, and that forward statistics would name the rank of a forward-born NaN."""
    state = run_builders.run_state(NAMES, numel=10, extra={"distributed": {"kind": "sharded", "world": 2}})
    state.apply(sampled(0, nans=(0, 2, 0), nonfinite_rank=np.full(3, -1), nonfinite_ranks=np.zeros(3, int)))
    (finding,) = detect(state)
    assert "rank" not in finding.evidence and "on rank" not in finding.message
    assert "; the rank it came from cannot be known under sharding: " in finding.message
    assert finding.message.endswith(
        "watch(..., forward=True) (forward statistics are combined over the ranks) would tell, and name the rank "
        "whose forward pass went non-finite"
    )


# --------------------------------------------------------------------------------------
# Non-finite losses
# --------------------------------------------------------------------------------------


def test_a_nonfinite_loss_before_any_nonfinite_gradient_is_the_root_born_in_forward():
    state = run_state()
    for step, loss in enumerate([1.0, 0.9, math.inf, math.nan, 0.7]):
        state.apply(records.StepValues(step, {"loss": loss}))
        state.apply(sampled(step, nans=(0, 1, 0) if step == 3 else (0, 0, 0)))
    found = detect(state)
    assert len(found) == 2
    loss, grads = found
    assert loss.kind == "nonfinite" and loss.severity == "critical" and loss.cause is None
    assert loss.layer is None and loss.layers == ()
    assert loss.step == loss.since_step == 2  # the first bad loss is kept, not the latest
    assert loss.message.startswith("the loss is inf at step 2: the NaN/Inf was born in the forward pass")
    assert "watch(..., forward=True)" in loss.message  # says how to name the module
    assert loss.evidence == {"pass": "forward", "step": 2, "loss": "inf"}
    assert loss.suggestion == SUGGESTIONS["nonfinite_forward"]
    assert json.loads(json.dumps(loss.to_dict()))["evidence"]["loss"] == "inf"
    # The gradients that went NaN a step later are its consequence, not a second problem.
    assert grads.layer == "b" and grads.since_step == 3
    assert grads.cause == {"kind": "nonfinite", "layer": None, "step": 2}
    report = assess(state, Thresholds())
    assert report.first_nonfinite == (3, "b"), "the gradient finding, not the loss one"


def test_nonfinite_gradients_under_a_finite_loss_are_born_in_backward():
    state = run_state()
    for step, loss in enumerate([1.0, 0.9, 0.8, math.nan]):
        state.apply(records.StepValues(step, {"loss": loss}))
        state.apply(sampled(step, nans=(0, 2, 0) if step >= 2 else (0, 0, 0)))
    grads, loss = detect(state)
    assert grads.evidence["pass"] == "backward" and grads.cause is None and grads.since_step == 2
    assert grads.message.startswith("NaN/Inf born in the backward pass first at step 2")
    assert grads.suggestion == SUGGESTIONS["nonfinite_backward"]
    # The loss that went NaN afterwards (NaN weights) follows from it.
    assert loss.layer is None and loss.since_step == 3 and loss.cause == {"kind": "nonfinite", "layer": "b", "step": 2}


def test_nan_loss_alone():
    state = run_state()
    for step, loss in enumerate([1.0, math.nan]):
        state.apply(records.StepValues(step, {"loss": loss}))
    (finding,) = detect(state)
    assert finding.layer is None and finding.step == 1 and finding.evidence["loss"] == "nan"
    assert assess(state, Thresholds()).first_nonfinite is None


# --------------------------------------------------------------------------------------
# GradScaler skips: overflow, not nonfinite
# --------------------------------------------------------------------------------------


def test_steps_the_scaler_skipped_are_overflow_not_nonfinite():
    state = run_state()
    scales = scales_with_skips(10, skipped={2})
    for step in range(10):
        state.apply(records.StepValues(step, {"loss": 1.0, "grad_scale": scales[step]}))
        state.apply(sampled(step, nans=(0, 4, 4) if step == 2 else (0, 0, 0)))
    (overflow,) = detect(state)
    assert (overflow.kind, overflow.severity, overflow.layer) == ("overflow", "info", None)
    assert overflow.step == overflow.since_step == 2
    assert overflow.evidence == {"skipped_steps": [2], "recent_fraction": 0.1}
    assert overflow.suggestion == SUGGESTIONS["overflow"]
    assert "skipped 1 steps" in overflow.message and "(10% of the last 10 steps)" in overflow.message
    report = assess(state, Thresholds())
    assert report.status == "healthy" and report.first_nonfinite is None


def test_nonfinite_gradients_under_a_scaler_are_its_skips_at_once():
    """A GradScaler skips every step whose gradients hold NaN/Inf: such a step is a skip (an
    overflow) as soon as it is recorded, before a next step shows the lower scale, and the
    run's last step too."""
    state = run_state()
    scales = scales_with_skips(10, skipped={2, 6})
    for step in range(10):
        state.apply(records.StepValues(step, {"grad_scale": scales[step]}))
        state.apply(sampled(step, nans=(0, 4, 4) if step in (2, 6, 9) else (0, 0, 0)))
    assert state.series("skipped").values.nonzero()[0].tolist() == [2, 6, 9]
    (overflow,) = detect(state)
    assert overflow.kind == "overflow" and overflow.evidence["skipped_steps"] == [2, 6, 9]


def test_nonfinite_after_the_scale_collapsed_is_reported_and_counted_without_the_overflows():
    """Genuine NaN: the scaler skips every step and halves its scale; once the scale is 1 or
    less, scaling cannot be what overflows, and the steps are non-finite gradients again."""
    state = run_state()
    scales = [4.0, 4.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.125]  # halved after each skip from step 2 on
    for step in range(8):
        state.apply(records.StepValues(step, {"grad_scale": scales[step]}))
        state.apply(sampled(step, nans=(0, 4, 4) if step >= 2 else (0, 0, 0)))
    grads, overflow = detect(state)
    assert grads.kind == "nonfinite" and grads.since_step == 4 and grads.layer == "c"
    assert grads.evidence["sampled_steps_affected"] == 4  # steps 4..7, not the overflows 2 and 3
    assert overflow.kind == "overflow" and overflow.evidence["skipped_steps"] == [2, 3]


def test_a_rising_scale_is_not_a_skip():
    state = run_state()
    scales = scales_with_skips(10, skipped=set(), grow_at={4, 8})
    for step in range(10):
        state.apply(records.StepValues(step, {"grad_scale": scales[step]}))
    assert detect(state) == []


def test_overflow_turns_into_a_warning_at_the_warn_fraction():
    t = Thresholds(overflow_window=10, overflow_warn_fraction=0.2)

    def overflow_of(skipped):
        state = run_state()
        scales = scales_with_skips(20, skipped)
        for step in range(20):
            state.apply(records.StepValues(step, {"grad_scale": scales[step]}))
        (finding,) = detect(state, t)
        return finding

    at = overflow_of({12, 15})  # 2 of the last 10 steps (10..19): exactly the warn fraction
    assert at.severity == "warning" and at.evidence["recent_fraction"] == 0.2
    assert (at.since_step, at.step) == (12, 15)
    below = overflow_of({3, 15})  # one of them too old to count
    assert below.severity == "info" and below.evidence == {"skipped_steps": [3, 15], "recent_fraction": 0.1}
    assert (below.since_step, below.step) == (3, 15)
    old = overflow_of({0, 1, 2, 3, 4, 5})
    assert old.severity == "info" and old.evidence["recent_fraction"] == 0.0 and old.step == 5
    many = overflow_of(set(range(0, 19, 2)))
    assert many.severity == "warning" and many.evidence["recent_fraction"] == 0.5
    assert "skipped 10 steps" in many.message


# --------------------------------------------------------------------------------------
# A real model
# --------------------------------------------------------------------------------------


class SqrtTrap(nn.Module):
    """``torch.where(h > 0, sqrt(h), 0)``: finite forward, but the backward of sqrt at h < 0 is
    NaN, and 0 * NaN is NaN, so 'pre' receives NaN gradients while 'post' stays finite."""

    def __init__(self, safe: bool = False):
        super().__init__()
        self.pre = nn.Linear(8, 8)
        self.post = nn.Linear(8, 1)
        self.safe = safe

    def forward(self, x):
        h = self.pre(x)
        inner = h.clamp_min(1e-6) if self.safe else h
        return self.post(torch.where(h > 0, torch.sqrt(inner), torch.zeros_like(h)))


def train(model, steps=3):
    return run_builders.train_and_report(model, steps, (16, 8))


def test_sqrt_trap_in_a_real_model_names_the_layer_before_it():
    torch.manual_seed(0)
    report = train(SqrtTrap())
    found = [f for f in report.findings if f.kind == "nonfinite"]
    assert len(found) == 1, str(report)
    (finding,) = found
    assert finding.layer == "pre" and finding.layers == ("pre",)
    assert finding.since_step == 0 and finding.evidence["order"] == "backward"
    assert finding.evidence["nans"] > 0 and finding.evidence["sampled_steps_affected"] == 3
    assert report.first_nonfinite == (0, "pre") and report.status == "critical"
    assert {row.name: row.status for row in report.layers} == {"pre": "critical", "post": "healthy"}


def test_the_safe_version_of_the_trap_is_silent():
    torch.manual_seed(0)
    report = train(SqrtTrap(safe=True))
    assert not [f for f in report.findings if f.kind in ("nonfinite", "overflow")], str(report)
    assert report.first_nonfinite is None
