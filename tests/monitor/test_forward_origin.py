"""Where a NaN/Inf was born in the forward pass (``watch(model, forward=True)``): the module
whose own code made it, the batch, or a parent's code between two children — in the forward
history's events (:func:`gradscope.run.forward_history.nonfinite_origin`) and in the report."""

from __future__ import annotations

import torch
from forward_reference import ROOT, latest, module_index
from torch import nn

import gradscope
from gradscope.run.forward_history import nonfinite_origin


class Amplify(nn.Module):
    """Multiplies its child's finite output by ``scale`` (1e39 overflows float32 to Inf)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.scale = 1.0

    def forward(self, x):
        return self.inner(x) * self.scale


class Overflowing(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.amp = Amplify()
        self.norm = nn.LayerNorm(4)  # Inf -> NaN
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.norm(self.amp(x)))


class LogBetween(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        return self.b(torch.log(self.a(x) - 10))  # NaN, made by this module's own code


class Blocked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = LogBetween()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.block(x))


def batch(step: int) -> torch.Tensor:
    return torch.randn(3, 4, generator=torch.Generator().manual_seed(100 + step))


def run_steps(model, mon, steps: int, poison_step: int | None = None) -> None:
    for step in range(steps):
        x = batch(step)
        if step == poison_step:
            x[1, 2] = float("nan")
        model(x).sum().backward()
        mon.step()
        model.zero_grad()


def root_finding(mon):
    """The one root ``nonfinite`` finding; the non-finite gradients that follow name it as cause."""
    findings = [f for f in mon.report(wait=True).findings if f.kind == "nonfinite"]
    roots = [f for f in findings if f.cause is None]
    assert len(roots) == 1, [f.message for f in findings]
    (root,) = roots
    assert root.evidence["pass"] == "forward" and root.severity == "critical"
    for consequence in findings:
        if consequence is not root:
            assert consequence.cause == {"kind": "nonfinite", "layer": root.layer, "step": root.step}
    return root


def test_an_overflow_is_traced_to_the_module_whose_own_code_made_it():
    torch.manual_seed(0)
    model = Overflowing()
    with gradscope.watch(model, forward=True, backend="numpy") as mon:
        run_steps(model, mon, 2)
        assert mon._run.forward.events == [], "healthy steps"
        model.amp.scale = 1e39
        run_steps(model, mon, 1)
        where = module_index(mon)
        origin = nonfinite_origin(latest(mon))
        (event,) = mon._run.forward.events
        finding = root_finding(mon)
    assert event == origin and event.step == 2
    assert mon.info.modules[origin.module] == "amp" and origin.where == "outputs"
    assert origin.infs == 12 and origin.nans == 0 and origin.dtype == "float32"
    assert [mon.info.modules[m] for m in origin.modules] == ["amp", "norm", "head", ROOT]
    assert where["amp.inner"] not in origin.modules, "the child's output was finite"
    assert finding.layer == "amp" and finding.step == 2
    assert finding.evidence["module"] == "amp" and finding.evidence["where"] == "outputs"


def test_a_nan_in_the_batch_is_traced_to_the_inputs_of_the_root():
    torch.manual_seed(0)
    model = Overflowing()
    with gradscope.watch(model, forward=True, backend="numpy") as mon:
        run_steps(model, mon, 2, poison_step=1)
        (event,) = mon._run.forward.events
        finding = root_finding(mon)
    assert event.step == 1 and mon.info.modules[event.module] == ROOT and event.where == "inputs"
    assert (event.nans, event.infs) == (1, 0)
    assert finding.layer == ROOT and finding.evidence["module"] == ROOT and finding.evidence["where"] == "inputs"


def test_a_nan_made_by_a_parent_between_two_children_is_traced_to_the_parent():
    torch.manual_seed(0)
    model = Blocked()
    with gradscope.watch(model, forward=True, backend="numpy") as mon:
        run_steps(model, mon, 1)
        (event,) = mon._run.forward.events
        finding = root_finding(mon)
    assert mon.info.modules[event.module] == "block.b" and event.where == "inputs"
    assert event.nans == 12, "log of a negative number, every element"
    assert [mon.info.modules[m] for m in event.modules] == ["block.b", "block", "head", ROOT]
    assert finding.layer == "block"
    assert finding.evidence["module"] == "block.b" and finding.evidence["where"] == "inputs"


def test_a_healthy_run_has_no_forward_events():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 2))
    with gradscope.watch(model, forward=True, backend="numpy") as mon:
        run_steps(model, mon, 3)
        report = mon.report(wait=True)
        assert mon._run.forward.events == [] and mon._run.forward.nonfinite_steps == 0
        assert list(mon._run.forward.steps()) == [0, 1, 2]
    assert not [f for f in report.findings if f.kind == "nonfinite"]


def test_a_minus_inf_attention_mask_is_not_a_nonfinite_finding():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    mask = nn.Transformer.generate_square_subsequent_mask(5)
    with gradscope.watch(layer, forward=True, backend="numpy") as mon:
        out = layer(torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0)), src_mask=mask)
        assert torch.isfinite(out).all()
        out.sum().backward()
        mon.step()
        report = mon.report(wait=True)
    assert not [f.message for f in report.findings if f.kind == "nonfinite"]
