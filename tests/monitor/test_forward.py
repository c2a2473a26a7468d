"""Forward statistics (``watch(model, forward=True)``): every module's rows against the float64
reference of the tensors our own forward hooks captured (:mod:`forward_reference`), for the
shapes a module may return, in-place operations, evaluation passes, micro-batches and
autocast."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from forward_reference import ROOT, Recorder, assert_row, latest, module_index, reference
from torch import nn

import gradscope
from gradscope.stats import layout


def batch(step: int, rows: int = 5, width: int = 6) -> torch.Tensor:
    return torch.randn(rows, width, generator=torch.Generator().manual_seed(100 + step))


# ---- numbers -------------------------------------------------------------------------------


class PairOut(nn.Module):
    """Returns a tuple."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        h = self.lin(x)
        return h, torch.tanh(h)


class DictOut(nn.Module):
    """Takes another module's tuple unchanged and returns a dict."""

    def forward(self, pair):
        a, b = pair
        return {"sum": a + b, "prod": a * b}


class Residual(nn.Module):
    """``b`` is fed by this module's own code (``a(x) + x``): its inputs are measured."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)

    def forward(self, x):
        return self.b(self.a(x) + x)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(6, 8), nn.Sequential(nn.LayerNorm(8), nn.GELU()))
        self.res = Residual()
        self.pair = PairOut()
        self.named = DictOut()
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        out = self.named(self.pair(self.res(self.stem(x))))
        return self.head(out["sum"] * out["prod"])


def test_every_module_row_equals_the_reference_of_its_tensors():
    torch.manual_seed(0)
    model = Net()
    recorder = Recorder(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradscope.watch(model, forward=True, backend="numpy") as mon:
        where = module_index(mon)
        assert mon.info.modules == tuple(name or ROOT for name, _ in model.named_modules())
        for step in range(2):
            recorder.clear()
            x = batch(step)
            model(x).square().mean().backward()
            mon.step()
            opt.step()
            opt.zero_grad()
            record = latest(mon)
            assert record.step == step
            assert (record.order[1] >= 0).all(), "every module returned floating-point tensors"
            for name, i in where.items():
                assert_row(record.outputs[i], reference(recorder.outputs[name]), f"step {step}: {name} outputs")
            # Containers copy their last child's row; the root returns the head's output.
            np.testing.assert_array_equal(record.outputs[where["stem"]], record.outputs[where["stem.1.1"]])
            np.testing.assert_array_equal(record.outputs[where["stem.1"]], record.outputs[where["stem.1.1"]])
            np.testing.assert_array_equal(record.outputs[where[ROOT]], record.outputs[where["head"]])
            # Inputs: the batch, and what a parent's own code computed; nothing else.
            measured = {name for name, i in where.items() if record.order[0, i] >= 0}
            assert measured == {ROOT, "res.b", "head"}
            assert_row(record.inputs[where[ROOT]], reference([x]), f"step {step}: batch")
            for name in ("res.b", "head"):
                assert_row(record.inputs[where[name]], reference(recorder.inputs[name]), f"{name} inputs")
            for name in where.keys() - measured:
                assert not record.inputs[where[name]].any(), f"{name}: absent inputs are zeros"
            assert record.dtypes == ("float32",) * len(where) and record.autocast == ""
        maxima = mon.history("forward_max_abs")
        assert list(maxima.steps) == [0, 1] and maxima.rows == mon.info.modules
        np.testing.assert_array_equal(maxima.values[1], record.outputs[:, layout.MAX_ABS])
        np.testing.assert_array_equal(mon.history("forward_numel").values[1], record.outputs[:, layout.NUMEL])
    recorder.remove()


class CalledTwice(nn.Module):
    """A shared Linear called twice; an Identity then returns its *first* output."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.out = nn.Identity()

    def forward(self, x):
        first = self.shared(x)
        second = self.shared(x * 2)
        return self.out(first) + second


def test_a_module_returning_an_earlier_output_of_a_shared_module_counts_only_that_output():
    torch.manual_seed(0)
    model = CalledTwice()
    recorder = Recorder(model)
    with gradscope.watch(model, forward=True, backend="numpy") as mon:
        model(batch(0, 3, 4)).sum().backward()
        mon.step()
        record, where = latest(mon), module_index(mon)
    recorder.remove()
    assert len(recorder.outputs["shared"]) == 2
    assert_row(record.outputs[where["shared"]], reference(recorder.outputs["shared"]), "both calls")
    assert_row(record.outputs[where["out"]], reference(recorder.outputs["out"]), "the first call only")


# ---- shapes of what a module returns --------------------------------------------------------


@dataclasses.dataclass
class Pair:
    first: torch.Tensor
    second: torch.Tensor | None
    count: int = 3


def _packed(kind: str, h: torch.Tensor):
    """``(what the module returns, the floating-point tensors in it)``."""
    a, b, c = h * 2, h + 1, h - 3
    if kind == "model_output":
        from transformers.utils import ModelOutput

        @dataclasses.dataclass
        class Output(ModelOutput):
            logits: torch.Tensor | None = None
            hidden: torch.Tensor | None = None
            unset: torch.Tensor | None = None

        return Output(logits=a, hidden=b), [a, b]
    strided = a[:, ::2]
    return {
        "tensor": (a, [a]),
        "tuple": ((a, b), [a, b]),
        "list": ([a, b], [a, b]),
        "dict": ({"a": a, "b": b}, [a, b]),
        "nested": ((a, [b, {"c": c}]), [a, b, c]),
        "same_twice": ((a, a), [a]),
        "dataclass": (Pair(a, b), [a, b]),
        "dataclass_with_none": (Pair(a, None), [a]),
        "none": (None, []),
        "non_tensors": ((7, "text", 2.5, None, a), [a]),
        "integer": (((h > 0).long(), torch.arange(3)), []),
        "float_and_integer": ((torch.arange(3), b), [b]),
        "complex": (torch.complex(h, h), []),
        "fp64": ((a.double(),), [a.double()]),
        "bf16": (a.bfloat16(), [a.bfloat16()]),
        "fp16": ([a.half()], [a.half()]),
        "transposed": (a.t(), [a.t()]),
        "strided": (strided, [strided]),
        "expanded": (a[:, :1].expand(-1, 4), [a[:, :1].expand(-1, 4)]),
        "channels_last": (
            a.reshape(3, 1, 2, 2).contiguous(memory_format=torch.channels_last),
            [a.reshape(3, 1, 2, 2)],
        ),
    }[kind]


KINDS = (
    "tensor",
    "tuple",
    "list",
    "dict",
    "nested",
    "same_twice",
    "dataclass",
    "dataclass_with_none",
    "none",
    "non_tensors",
    "integer",
    "float_and_integer",
    "complex",
    "fp64",
    "bf16",
    "fp16",
    "transposed",
    "strided",
    "expanded",
    "channels_last",
)


class Shaped(nn.Module):
    """Returns its Linear's output transformed and packed as ``kind``; ``expected`` holds copies
    of the floating-point tensors it returned."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        self.h = self.lin(x)
        value, expected = _packed(self.kind, self.h)
        self.expected = [t.detach().clone() for t in expected]
        return value


class Shapes(nn.Module):
    def __init__(self, kinds) -> None:
        super().__init__()
        self.parts = nn.ModuleDict({kind: Shaped(kind) for kind in kinds})  # never called itself

    def forward(self, x):
        for part in self.parts.values():
            part(x)
        return sum(part.h.sum() for part in self.parts.values())


def _check_shapes(kinds) -> None:
    torch.manual_seed(0)
    model = Shapes(kinds)
    with gradscope.watch(model, forward=True, backend="numpy") as mon:
        model(batch(0, 3, 4)).backward()
        mon.step()
        record, where = latest(mon), module_index(mon)
    assert mon.errors == []
    for kind in kinds:
        i, expected = where[f"parts.{kind}"], model.parts[kind].expected
        if expected:
            assert record.order[1, i] >= 0, kind
            assert_row(record.outputs[i], reference(expected), kind)
            assert record.dtypes[i] == str(expected[0].dtype).removeprefix("torch."), kind
        else:
            assert record.order[1, i] == -1 and not record.outputs[i].any(), f"{kind}: nothing measurable"
            assert record.dtypes[i] == "", kind
    assert record.order[1, where["parts"]] == -1, "a ModuleDict is never called"
    assert record.outputs[where[ROOT], layout.NUMEL] == 1, "the root's scalar loss"


def test_every_shape_of_output_is_measured():
    _check_shapes(KINDS)


def test_a_transformers_model_output_is_measured():
    pytest.importorskip("transformers")
    _check_shapes(("model_output",))


def test_integer_inputs_are_not_measured():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
    tokens = torch.tensor([[1, 2, 3], [4, 5, 0]])
    with gradscope.watch(model, forward=True, backend="numpy") as mon:
        model(tokens).sum().backward()
        mon.step()
        record, where = latest(mon), module_index(mon)
    assert not record.present[0].any(), "token ids are not floating point"
    assert_row(record.outputs[where["0"]], reference([model[0].weight.detach()[tokens]]), "embedding")


def test_in_place_operations_after_a_module_do_not_change_its_row():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 2))
    recorder = Recorder(model)
    with gradscope.watch(model, forward=True, backend="numpy") as mon:
        model(batch(0, 8, 4)).sum().backward()
        mon.step()
        record, where = latest(mon), module_index(mon)
    recorder.remove()
    (before,) = recorder.outputs["0"]
    assert (before < 0).any(), "the Linear's output has negative values for ReLU to overwrite"
    assert_row(record.outputs[where["0"]], reference([before]), "Linear (before ReLU)")
    assert_row(record.outputs[where["1"]], reference([before.clamp(min=0)]), "ReLU(inplace=True)")
    assert record.outputs[where["1"], layout.ZEROS] > 0 == record.outputs[where["0"], layout.ZEROS]


# ---- which forward passes --------------------------------------------------------------------


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 2))


def test_forward_passes_without_autograd_are_not_measured():
    model = mlp()
    recorder = Recorder(model)
    with gradscope.watch(model, forward=True, backend="numpy") as mon:
        x = batch(0)
        with torch.no_grad():
            model(batch(1) * 1000)
        with torch.inference_mode():
            model(batch(2) * 1000)
        model(x).sum().backward()
        mon.step()
        with torch.no_grad():  # step 1: evaluation only
            model(x)
        mon.step()
        record = latest(mon)
        assert list(mon._run.forward.steps()) == [0], "a step with only evaluation passes has no forward record"
    recorder.remove()
    assert record.step == 0
    assert_row(record.inputs[0], reference([x]), "the training batch only")
    for name, i in module_index(mon).items():
        assert_row(record.outputs[i], reference(recorder.outputs[name]), name)


def test_accumulated_micro_batches_combine_into_one_row():
    model = mlp()
    recorder = Recorder(model)
    with gradscope.watch(model, accumulation_steps=2, forward=True, backend="numpy") as mon:
        first, second = batch(0), batch(1)
        for x in (first, second):
            model(x).sum().backward()
        mon.step()
        record = latest(mon)
    recorder.remove()
    assert record.inputs[0, layout.NUMEL] == 2 * first.numel()
    assert_row(record.inputs[0], reference([first, second]), "both micro-batches")
    for name, i in module_index(mon).items():
        assert len(recorder.outputs[name]) == 2
        assert_row(record.outputs[i], reference(recorder.outputs[name]), name)


class Checkpointed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Linear(6, 8), nn.GELU())
        self.b = nn.Linear(8, 2)

    def forward(self, x):
        return self.b(torch.utils.checkpoint.checkpoint(self.a, x, use_reentrant=False))


def test_activation_checkpoint_recomputation_is_not_measured_again():
    torch.manual_seed(0)
    model = Checkpointed()
    recorder = Recorder(model)
    with gradscope.watch(model, forward=True, backend="numpy") as mon:
        model(batch(0)).sum().backward()  # backward recomputes 'a' (not recorded: grad mode is on)
        mon.step()
        record = latest(mon)
    recorder.remove()
    assert len(recorder.outputs["a.0"]) == 2, "backward did recompute 'a'"
    for name, i in module_index(mon).items():
        assert_row(record.outputs[i], reference(recorder.outputs[name][:1]), f"{name}: the forward call only")


@pytest.mark.parametrize(
    "inputs",
    [
        "features",
        "token_ids",
    ],
)
def test_autocast_is_recorded_with_the_dtypes_modules_returned(inputs):
    torch.manual_seed(0)
    if inputs == "features":
        model, x = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 2)), batch(0)
    else:
        model, x = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2)), torch.tensor([[1, 2, 3]])
    with gradscope.watch(model, forward=True, backend="numpy") as mon:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        out.float().sum().backward()
        mon.step()
        record, where = latest(mon), module_index(mon)
    assert record.dtypes[where["1"]] == "bfloat16", "autocast Linear returns bfloat16"
    assert record.autocast == "bfloat16"
