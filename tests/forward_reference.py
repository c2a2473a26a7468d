"""An independent reference for forward statistics (``watch(model, forward=True)``).

Our own forward hooks capture clones of every module's input and output tensors when they
run; :func:`reference` turns captured tensors into float64 statistics with
:mod:`stats_reference`. Nothing here reads gradscope's hooks or rows except the small
accessors at the end.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import numpy as np
import torch
from stats_reference import reference_row
from torch import nn

from gradscope.stats import layout

ROOT = "(root)"
"""The model itself, as gradscope names it."""


def float_tensors(value) -> list[torch.Tensor]:
    """The floating-point tensors in a module's inputs or outputs (tensors, lists, tuples,
    dicts, dataclasses), each object once."""
    found: dict[int, torch.Tensor] = {}

    def walk(item) -> None:
        if isinstance(item, torch.Tensor):
            if item.is_floating_point() and item.numel():
                found.setdefault(id(item), item)
        elif isinstance(item, dict):
            for child in item.values():
                walk(child)
        elif isinstance(item, (list, tuple)):
            for child in item:
                walk(child)
        elif dataclasses.is_dataclass(item) and not isinstance(item, type):
            for field in dataclasses.fields(item):
                walk(getattr(item, field.name))

    walk(value)
    return list(found.values())


class Recorder:
    """Clones of every module's input and output tensors, per call, taken by our own forward
    hooks when they run (before any later in-place operation), in forward passes recording
    autograd. Register it before ``watch``: its hooks then run first (they only read)."""

    def __init__(self, model: nn.Module) -> None:
        self.inputs: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.outputs: dict[str, list[torch.Tensor]] = defaultdict(list)
        self._handles = []
        for name, module in model.named_modules():
            name = name or ROOT
            self._handles.append(
                module.register_forward_pre_hook(
                    lambda m, args, kwargs, name=name: self._keep(self.inputs, name, (args, kwargs)), with_kwargs=True
                )
            )
            self._handles.append(
                module.register_forward_hook(lambda m, args, out, name=name: self._keep(self.outputs, name, out))
            )

    @staticmethod
    def _keep(store: dict, name: str, value) -> None:
        if torch.is_grad_enabled():
            store[name].extend(t.detach().clone() for t in float_tensors(value))

    def clear(self) -> None:
        self.inputs.clear()
        self.outputs.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def reference(tensors: list[torch.Tensor]) -> dict:
    """Float64 statistics of several tensors as one: counts and sums add, max takes max."""
    rows = [reference_row(t) for t in tensors]
    return {key: max(r[key] for r in rows) if key == "max_abs" else sum(r[key] for r in rows) for key in rows[0]}


def assert_row(row: np.ndarray, ref: dict, where: str, rtol: float = 1e-12) -> None:
    """A gradscope row (``ROW_WIDTH`` float64) against :func:`reference`: counts, max and
    histogram exactly; the sum within ``rtol`` of the sum of magnitudes (the honest scale of
    a sum that can cancel), the sum of squares within ``rtol`` relative."""
    for column, key in ((layout.NUMEL, "numel"), (layout.ZEROS, "zeros"), (layout.NANS, "nans"), (layout.INFS, "infs")):
        assert row[column] == ref[key], f"{where}: {key} {row[column]} != {ref[key]}"
    assert row[layout.MAX_ABS] == ref["max_abs"], f"{where}: max_abs {row[layout.MAX_ABS]!r} != {ref['max_abs']!r}"
    np.testing.assert_array_equal(row[layout.HIST :], ref["hist"], err_msg=where)
    total = row[layout.SUM]
    assert abs(total - ref["sum"]) <= rtol * ref["abs_sum"], f"{where}: sum {total!r} != {ref['sum']!r}"
    assert abs(row[layout.SUMSQ] - ref["sumsq"]) <= rtol * ref["sumsq"], f"{where}: sumsq {row[layout.SUMSQ]!r}"


# ---- reading a monitor ---------------------------------------------------------------------


def hooks_installed(model: nn.Module) -> bool:
    """Whether any module of ``model`` has a forward hook or pre-hook."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def latest(mon):
    """The newest forward record, after waiting for every sampled step's rows."""
    mon.history("forward_present")
    return mon._run.forward.latest


def module_index(mon) -> dict[str, int]:
    """Module name -> column of the forward rows."""
    return {name: i for i, name in enumerate(mon.info.modules)}
