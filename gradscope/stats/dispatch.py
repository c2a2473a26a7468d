"""Which backend reads a tensor: one rule for :func:`gradscope.grad_stats` and the monitor.

Tensors are grouped by the *engine* that reads them: a ``torch.device`` for the Triton
kernels (CUDA tensors, or CPU tensors in Triton's interpreter), or ``"numpy"`` for the NumPy
backend, which reads any device. The choice follows ``backend``, a tri-state option:

* ``"auto"`` (None-like default): the kernels for CUDA tensors when Triton serves the
  device, NumPy for everything else;
* ``"triton"``: the kernels for every tensor, and an error naming the tensor when they
  cannot read it (the user asked for a path that cannot run);
* ``"numpy"``: NumPy for every tensor.
"""

from __future__ import annotations

import torch

from gradscope.stats import triton_backend

BACKENDS = ("auto", "triton", "numpy")
"""The values ``backend=`` accepts."""

NUMPY = "numpy"
"""The engine key of the NumPy backend (Triton engines are keyed by their device)."""

Engine = torch.device | str
"""A ``torch.device`` (the Triton kernels on that device) or :data:`NUMPY`."""


def check_backend(backend: str, caller: str) -> None:
    """Raise ``ValueError`` naming ``caller`` unless ``backend`` is one of :data:`BACKENDS`."""
    if backend not in BACKENDS:
        raise ValueError(f"{caller}: backend must be one of {BACKENDS}, got {backend!r}")


def engine_for(device: torch.device, backend: str, what: str = "a tensor", caller: str = "grad_stats") -> Engine:
    """The engine that reads a tensor on ``device`` under ``backend`` (see the module docstring).

    Args:
        device: where the tensor lives.
        backend: ``"auto"``, ``"triton"`` or ``"numpy"``.
        what: how an error names the tensor (``"tensor 3 ('fc.weight')"``).
        caller: the public function an error names (``"grad_stats"``, ``"watch"``).

    Raises:
        ValueError: ``backend="triton"`` for a tensor the kernels cannot read (with why).
    """
    if backend == NUMPY:
        return NUMPY
    serves = triton_backend.serves(device)
    if backend == "auto":
        return device if serves and device.type == "cuda" else NUMPY
    if not serves:
        raise ValueError(f"{caller}: backend='triton' cannot read {what} on {device}: {_why_not(device)}")
    return device


def _why_not(device: torch.device) -> str:
    if not triton_backend.triton_importable():
        return "Triton is not installed"
    if device.type == "cpu":
        return "Triton reads CPU tensors only in its interpreter: set TRITON_INTERPRET=1 before importing gradscope"
    if device.type == "cuda":
        return "the kernels were imported in Triton's interpreter (TRITON_INTERPRET=1), which reads CPU tensors only"
    return f"Triton has no kernels for {device.type} tensors"
