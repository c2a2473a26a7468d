"""The built-in demo: each fault is found, in the right layer; no fault, no gradient findings."""

import pytest
import torch

from gradscope import demo
from gradscope.monitor.options import HISTOGRAM_EVERY

GRADIENT_KINDS = {"nonfinite", "exploding", "vanishing", "dead", "stalled_updates", "overflow"}


@pytest.fixture(scope="module")
def reports():
    return {fault: demo.run(fault).report() for fault in demo.FAULTS}


def test_no_fault_is_healthy(reports):
    report = reports["none"]
    assert report.status == "healthy"
    assert not [f for f in report.findings if f.kind in GRADIENT_KINDS]


@pytest.mark.parametrize("fault", [f for f in demo.FAULTS if f != "none"])
def test_each_fault_is_named_with_its_layer(reports, fault):
    expected = demo.EXPECTED[fault]
    report = reports[fault]
    assert report.status != "healthy"
    assert [f for f in report.findings if f.kind == expected.kind and f.layer == expected.layer], [
        (f.kind, f.layer) for f in report.findings
    ]


def test_exploding_names_where_the_explosion_starts_not_just_the_largest(reports):
    (finding,) = [f for f in reports["exploding"].findings if f.kind == "exploding" and f.layer]
    assert finding.evidence["first_in_backward_order"] == "blocks.4.linear" == finding.layer
    assert finding.evidence["largest"] == "input"  # the gradient keeps growing on its way to the input
    assert set(finding.layers) == {"input", *(f"blocks.{i}.linear" for i in range(5))}


def test_faults_do_not_raise_each_others_alarms(reports):
    """Each fault's report holds no gradient finding of another fault's kind."""
    own = {
        "vanishing": {"vanishing"},
        "exploding": {"exploding"},
        "dead": {"dead"},
        "nan": {"nonfinite", "dead"},
        "fp16": {"underflow"},
        "forward-overflow": {"nonfinite"},
    }
    for fault, kinds in own.items():
        others = {f.kind for f in reports[fault].findings if f.kind in GRADIENT_KINDS} - kinds
        assert not others, (fault, others)


def test_the_nan_fault_keeps_the_loss_finite_until_the_weights_are_hit():
    mon = demo.run("nan", 40)
    first_step, layer = mon.report().first_nonfinite
    assert (first_step, layer) == (20, "blocks.4.linear")
    losses = mon.history("loss").values
    assert torch.isfinite(torch.as_tensor(losses[:21])).all()


def test_the_fp16_fault_underflows_every_gradient_and_kills_no_unit(reports):
    report = reports["fp16"]
    (finding,) = [f for f in report.findings if f.kind == "underflow"]
    assert finding.evidence["pass"] == "backward" and finding.evidence["dtype"] == "float16"
    assert finding.evidence["below_normal_fraction"] == {layer.name: 1.0 for layer in report.layers}
    # the newest histogram's step (the default cadence): still underflowing there
    assert set(finding.evidence["hist_step"].values()) == {finding.step}
    assert finding.step % HISTOGRAM_EVERY == 0 and 0 <= report.step - finding.step < HISTOGRAM_EVERY
    assert not [f for f in report.findings if f.kind in ("dead", "vanishing", "nonfinite")]


def test_the_forward_overflow_fault_is_born_in_the_forward_pass_of_its_block(reports):
    report = reports["forward-overflow"]
    root = report.findings[0]
    assert (root.kind, root.layer) == ("nonfinite", "blocks.6")
    assert root.evidence["pass"] == "forward" and root.evidence["where"] == "outputs"
    assert root.evidence["module_type"] == "Block" and root.evidence["infs"] > 0
    assert 20 <= root.since_step <= 80, root.since_step  # once the pre-activations have grown past 11.1
    # its consequence, linked by the nonfinite check itself: the NaN gradients of the same step
    (consequence,) = [f for f in report.findings if f.kind == "nonfinite" and f is not root]
    assert consequence.cause == {"kind": "nonfinite", "layer": "blocks.6", "step": root.since_step}
    assert consequence.since_step == root.since_step


@pytest.mark.parametrize(("pre_activation", "finite"), [(11.0, True), (11.2, False)])
def test_the_forward_overflow_block_overflows_above_float16s_exp_limit(pre_activation, finite):
    """exp(11.0) = 59874 fits float16 (largest 65504); exp(11.2) = 73130 does not."""
    block = demo.Block(demo.WIDTH, "softplus_half")
    with torch.no_grad():
        block.linear.weight.zero_()
        block.linear.bias.fill_(pre_activation)
    out = block(torch.randn(4, demo.WIDTH))
    assert out.dtype == torch.float32
    assert bool(torch.isfinite(out).all()) is finite


def test_the_exploding_fault_leaves_the_forward_pass_alone():
    x = torch.randn(16, demo.INPUTS)
    model = demo.build("exploding")
    before = model(x)
    model.blocks[demo.FAULTY_BLOCK["exploding"]].activation = "faulty_backward"
    assert torch.equal(model(x), before)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown fault 'typo'"):
        demo.build("typo")
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        demo.run("none", 0)
