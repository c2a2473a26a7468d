"""What ``grad_stats`` accepts: collecting gradient tensors, checking them, flattening them.

Every statistic is invariant under permutation of a tensor's elements, so backends read a
tensor as one flat run of elements in whatever order memory holds them. ``flat_elements``
finds that run without copying whenever the tensor covers its memory exactly (contiguous,
transposed, channels-last...), and copies only views with gaps or overlaps.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from gradscope.stats import layout

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
"""Element types every backend reads."""

_SPARSE_LAYOUTS = (torch.sparse_coo, torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc)


@dataclass(frozen=True)
class FlatElements:
    """A tensor's elements as one dense 1-D tensor, plus the zeros it does not store.

    Attributes:
        values: 1-D tensor, same dtype and device as the source, dense in memory.
        implicit_zeros: elements of the source absent from ``values`` because they are
            unstored zeros of a sparse tensor (0 for strided tensors).
    """

    values: torch.Tensor
    implicit_zeros: int = 0


def add_implicit_zeros(rows, implicit_zeros):
    """Count unstored sparse zeros (:attr:`FlatElements.implicit_zeros`) in their rows: each is
    an element, and a zero. ``rows``: ``(N, ROW_WIDTH)``, a NumPy array or a torch tensor
    (``implicit_zeros`` of the same kind, ``(N,)``), changed in place and returned."""
    rows[:, layout.NUMEL] += implicit_zeros
    rows[:, layout.ZEROS] += implicit_zeros
    return rows


def is_parameter(tensor) -> bool:
    """True for a tensor whose gradient, not its values, ``grad_stats`` reads: an
    ``nn.Parameter``, or any leaf tensor that requires grad (what ``clip_grad_norm_`` and
    optimizers take as parameters)."""
    return isinstance(tensor, torch.Tensor) and tensor.requires_grad and tensor.is_leaf


def collect_tensors(tensors) -> tuple[list[torch.Tensor], tuple[str, ...] | None]:
    """Turn ``grad_stats``'s argument into a list of tensors and, for modules, their names.

    Parameters stand for their gradients, as in ``torch.nn.utils.clip_grad_norm_``: passing
    ``model.parameters()`` measures the gradients, never the weights.

    Args:
        tensors: an ``nn.Module`` (its parameters' ``.grad``, skipping parameters whose
            gradient is None; shared parameters once), a single tensor, or an iterable of
            tensors. A parameter (:func:`is_parameter`) given alone or in the iterable stands
            for its ``.grad`` (skipped when None); other tensors are measured as they are.

    Returns:
        ``(tensors, names)``; ``names`` holds parameter names for a module, else None.
    """
    if isinstance(tensors, torch.nn.Module):
        named = [(name, p.grad) for name, p in tensors.named_parameters() if p.grad is not None]
        return [g for _, g in named], tuple(name for name, _ in named)
    if isinstance(tensors, torch.Tensor):
        tensors = [tensors]
    elif isinstance(tensors, (str, bytes)) or not isinstance(tensors, Iterable):
        raise TypeError(f"grad_stats expects an nn.Module, a tensor or a list of tensors, got {type(tensors).__name__}")
    out = []
    for tensor in tensors:
        if is_parameter(tensor):
            if tensor.grad is not None:
                out.append(tensor.grad)
        else:
            out.append(tensor)
    return out, None


def describe(index: int, names: tuple[str, ...] | None) -> str:
    """How error messages name the tensor at ``index``."""
    if names is not None:
        return f"tensor {index} ({names[index]!r})"
    return f"tensor {index}"


def check_tensor(tensor, index: int, names: tuple[str, ...] | None = None) -> None:
    """Raise a clear error naming the tensor if no backend can read it.

    Raises:
        TypeError: not a tensor, or an element type other than float16/bfloat16/float32/float64.
        ValueError: a tensor on the ``meta`` device (it has no values), or a layout gradscope
            cannot read.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"grad_stats: {describe(index, names)} is {type(tensor).__name__}, not a torch.Tensor")
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"grad_stats: {describe(index, names)} has dtype {tensor.dtype}; gradient statistics need a "
            "floating-point tensor of dtype float16, bfloat16, float32 or float64"
        )
    if tensor.is_meta:
        raise ValueError(
            f"grad_stats: {describe(index, names)} is on the 'meta' device, which holds no values; no backend serves it"
        )
    if tensor.layout != torch.strided and tensor.layout not in _SPARSE_LAYOUTS:
        where = describe(index, names)
        raise ValueError(f"grad_stats: {where} has layout {tensor.layout}, which gradscope cannot read")


def is_dense(tensor: torch.Tensor) -> bool:
    """True when the strided ``tensor``'s elements fill a gap-free, non-overlapping memory span."""
    if tensor.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(tensor.stride(), tensor.shape, strict=True) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def flat_elements(tensor: torch.Tensor) -> FlatElements:
    """The elements of a checked tensor as one dense 1-D tensor (see the module docstring).

    Dense strided tensors are viewed in place. Views with gaps or overlaps (``x[:, ::2]``,
    ``expand``) are copied once with ``contiguous()``. Sparse tensors contribute their stored
    values (COO tensors are coalesced first, so duplicate entries add as they do in the
    tensor) and count their unstored elements as zeros.
    """
    if tensor.layout != torch.strided:
        if tensor.layout == torch.sparse_coo:
            values = tensor.coalesce().values()
        else:
            values = tensor.values()
        values = values.reshape(-1)
        return FlatElements(flat_elements(values).values, tensor.numel() - values.numel())
    if tensor.numel() == 0:
        return FlatElements(tensor.new_empty(0))
    if is_dense(tensor):
        return FlatElements(tensor.as_strided((tensor.numel(),), (1,), tensor.storage_offset()))
    return FlatElements(tensor.contiguous().view(-1))
