"""Which backend reads a tensor: one rule for :func:`gradscope.grad_stats` and the monitor.

Tensors are grouped by the *engine* that reads them: a ``torch.device`` for the Triton
kernels (CUDA tensors, or CPU tensors in Triton's interpreter), or the name of a CPU kernel
(:mod:`gradscope.stats.host_backend`: ``"numba"``, compiled, or ``"numpy"``), which reads
any device. The choice follows ``backend``:

* ``"auto"`` (default): the Triton kernels for CUDA tensors when Triton serves the device;
  for everything else the fastest CPU kernel installed (numba if it is, else NumPy). CUDA
  tensors without Triton installed are an error that says how to install it: reading them
  on the CPU instead would copy every gradient to the host at every sampled step, which is
  no way to monitor a GPU run unless asked for (``backend="numpy"``);
* ``"triton"``: the kernels for every tensor, and an error naming the tensor when they
  cannot read it (the user asked for a path that cannot run);
* ``"numba"``: the compiled CPU kernel for every tensor (an error if numba is missing);
* ``"numpy"``: the NumPy CPU kernel for every tensor.
"""

from __future__ import annotations

import torch

from gradscope.stats import host_backend, triton_backend

BACKENDS = ("auto", "triton", "numba", "numpy")
"""The values ``backend=`` accepts."""

INSTALL_TRITON = (
    "Triton is not installed: pip install triton (torch's CUDA wheels for Linux bring it; "
    "or pip install 'gradscope-diagnostics[triton]')"
)
"""Why Triton cannot read a tensor when it is missing, and the fix."""

Engine = torch.device | str
"""A ``torch.device`` (the Triton kernels on that device) or a CPU kernel's name
(``"numba"``, ``"numpy"``)."""


def is_host(engine: Engine) -> bool:
    """True for a CPU kernel (rows computed on the host), False for Triton on a device."""
    return isinstance(engine, str)


def check_backend(backend: str, caller: str) -> None:
    """Raise ``ValueError`` naming ``caller`` unless ``backend`` is one of :data:`BACKENDS`."""
    if backend not in BACKENDS:
        raise ValueError(f"{caller}: backend must be one of {BACKENDS}, got {backend!r}")


def engine_for(device: torch.device, backend: str, what: str = "a tensor", caller: str = "grad_stats") -> Engine:
    """The engine that reads a tensor on ``device`` under ``backend`` (see the module docstring).

    Args:
        device: where the tensor lives.
        backend: one of :data:`BACKENDS`.
        what: how an error names the tensor (``"tensor 3 ('fc.weight')"``).
        caller: the public function an error names (``"grad_stats"``, ``"watch"``).

    Raises:
        ValueError: ``backend="triton"`` for a tensor the kernels cannot read,
            ``backend="auto"`` for a CUDA tensor without Triton installed, or
            ``backend="numba"`` without numba (each with why and the fix).
    """
    if backend == "numpy":
        return backend
    if backend == "numba":
        if not host_backend.kernel_available("numba"):
            raise ValueError(
                f"{caller}: backend='numba' needs the numba package (pip install 'gradscope[numba]'): "
                f"{host_backend.why_unavailable('numba')}"
            )
        return backend
    serves = triton_backend.serves(device)
    if backend == "auto":
        if device.type == "cuda" and not triton_backend.triton_importable():
            raise ValueError(
                f"{caller}: {what} on {device} need gradscope's Triton kernels. {INSTALL_TRITON}. "
                "Or pass backend='numpy' to read CUDA tensors on the CPU (a device-to-host copy every sampled step)."
            )
        return device if serves and device.type == "cuda" else host_backend.fastest_kernel()
    if not serves:
        raise ValueError(f"{caller}: backend='triton' cannot read {what} on {device}: {_why_not(device)}")
    return device


def _why_not(device: torch.device) -> str:
    if not triton_backend.triton_importable():
        return INSTALL_TRITON
    if device.type == "cpu":
        return "Triton reads CPU tensors only in its interpreter: set TRITON_INTERPRET=1 before importing gradscope"
    if device.type == "cuda":
        return "the kernels were imported in Triton's interpreter (TRITON_INTERPRET=1), which reads CPU tensors only"
    return f"Triton has no kernels for {device.type} tensors"
