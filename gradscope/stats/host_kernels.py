"""The CPU kernels: which exist, which can run here, and how the CPU backend calls each.

:mod:`gradscope.stats.host_backend` plans the work and hands each work item to a kernel
through one of the small adapters here, which all take the same arguments:

* ``run(values, ws, inv_scale)``: one run of contiguous float32/float64 NumPy elements;
* ``packed(values, starts, ws, inv_scale)``: runs ``values[starts[k]:starts[k + 1]]``;
* ``tensors(parts, sizes, inv_scale)`` (kernels with ``in_place``): whole contiguous CPU
  float32/float64 tensors, read where they lie.

A *full* adapter returns float64 ``(K, ROW_WIDTH)`` rows; a *light* one (no histogram, see
:mod:`gradscope.stats.layout`) returns ``(rows, lowest)``, its light rows and float64
``(K,)``, each run's smallest non-zero finite ``|x|`` (what the histogram trigger needs
beside the row). ``ws`` is the calling thread's scratch buffers (``ws.get(name, dtype, n)``);
``inv_scale``, if given, unscales as ``GradScaler.unscale_`` does.
"""

from __future__ import annotations

import warnings

import numpy as np

from gradscope.stats import numpy_kernels
from gradscope.stats.reporting import GradscopeWarning

KERNELS = ("numba", "numpy")
"""The CPU kernels, fastest first."""

_broken: dict[str, str] = {}  # kernel -> why it cannot run here (set once, with a warning)


def kernel_available(kernel: str) -> bool:
    """True when ``kernel`` can run here (numba installed, and not found broken)."""
    if kernel in _broken:
        return False
    if kernel == "numba":
        try:
            from gradscope.stats import numba_kernels  # noqa: F401
        except Exception as error:  # ImportError, or numba failing to initialise
            _broken["numba"] = f"{type(error).__name__}: {error}"
            return False
    return True


def fastest_kernel() -> str:
    """The fastest kernel that can run here (what ``backend="auto"`` uses on the CPU)."""
    return next(kernel for kernel in KERNELS if kernel_available(kernel))


def why_unavailable(kernel: str) -> str:
    """Why ``kernel`` cannot run (after :func:`kernel_available` said False)."""
    return _broken.get(kernel, "unknown")


def mark_broken(kernel: str, error: Exception, stacklevel: int) -> None:
    """Record that ``kernel`` failed (it is not used again in this process) and warn once,
    at ``stacklevel`` frames above the caller."""
    _broken[kernel] = f"{type(error).__name__}: {error}"
    warnings.warn(
        f"gradscope: the {kernel} kernel failed ({_broken[kernel]}); the NumPy kernel takes over",
        GradscopeWarning,
        stacklevel=stacklevel + 1,
    )


def _scaled(values: np.ndarray, inv_scale: float, out: np.ndarray) -> np.ndarray:
    """``values * inv_scale`` into ``out``, with inv_scale rounded to float32 and the product in
    the values' precision, as ``GradScaler.unscale_`` computes it."""
    return np.multiply(values, out.dtype.type(np.float32(inv_scale)), out=out)


def _unscaled(values: np.ndarray, ws, inv_scale: float | None) -> np.ndarray:
    if inv_scale is None:
        return values
    return _scaled(values, inv_scale, ws.get("scaled", values.dtype, values.size))


class _NumpyKernel:
    """The NumPy kernel: reads one float32/float64 NumPy run at a time."""

    in_place = False

    @staticmethod
    def run(values: np.ndarray, ws, inv_scale: float | None) -> np.ndarray:
        return numpy_kernels.run_row(_unscaled(values, ws, inv_scale), ws)

    @staticmethod
    def packed(values: np.ndarray, starts: np.ndarray, ws, inv_scale: float | None) -> np.ndarray:
        return numpy_kernels.packed_rows(_unscaled(values, ws, inv_scale), starts, ws)


class _NumpyLightKernel:
    """The NumPy kernel's light rows."""

    in_place = False

    @staticmethod
    def run(values: np.ndarray, ws, inv_scale: float | None) -> tuple[np.ndarray, np.ndarray]:
        return numpy_kernels.light_run_row(_unscaled(values, ws, inv_scale), ws)

    @staticmethod
    def packed(values: np.ndarray, starts: np.ndarray, ws, inv_scale: float | None) -> tuple[np.ndarray, np.ndarray]:
        return numpy_kernels.light_packed_rows(_unscaled(values, ws, inv_scale), starts, ws)


class _NumbaKernel:
    """The compiled kernel: one code for slices and packs; also reads whole contiguous CPU
    tensors where they lie."""

    in_place = True

    @staticmethod
    def run(values: np.ndarray, ws, inv_scale: float | None) -> np.ndarray:
        return _NumbaKernel.packed(values, np.array([0, values.size], dtype=np.int64), ws, inv_scale)

    @staticmethod
    def packed(values: np.ndarray, starts: np.ndarray, ws, inv_scale: float | None) -> np.ndarray:
        from gradscope.stats import numba_kernels

        return numba_kernels.rows(values, starts, inv_scale)

    @staticmethod
    def tensors(parts, sizes: np.ndarray, inv_scale: float | None) -> np.ndarray:
        from gradscope.stats import numba_kernels

        return numba_kernels.tensor_rows(parts, sizes, inv_scale)


class _NumbaLightKernel:
    """The compiled kernel's light rows (:mod:`gradscope.stats.numba_light_kernels`)."""

    in_place = True

    @staticmethod
    def run(values: np.ndarray, ws, inv_scale: float | None) -> tuple[np.ndarray, np.ndarray]:
        return _NumbaLightKernel.packed(values, np.array([0, values.size], dtype=np.int64), ws, inv_scale)

    @staticmethod
    def packed(values: np.ndarray, starts: np.ndarray, ws, inv_scale: float | None) -> tuple[np.ndarray, np.ndarray]:
        from gradscope.stats import numba_light_kernels

        return numba_light_kernels.light_rows(values, starts, inv_scale)

    @staticmethod
    def tensors(parts, sizes: np.ndarray, inv_scale: float | None) -> tuple[np.ndarray, np.ndarray]:
        from gradscope.stats import numba_light_kernels

        return numba_light_kernels.light_tensor_rows(parts, sizes, inv_scale)


_ADAPTERS = {
    ("numpy", True): _NumpyKernel,
    ("numpy", False): _NumpyLightKernel,
    ("numba", True): _NumbaKernel,
    ("numba", False): _NumbaLightKernel,
}


def adapter(kernel: str, histogram: bool):
    """How to call ``kernel`` (one of :data:`KERNELS`) for full rows (``histogram``) or light
    rows (see the module docstring)."""
    return _ADAPTERS[kernel, histogram]
