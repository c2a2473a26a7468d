"""``grad_stats``: every statistic of a list of gradient tensors, from the best backend."""

from __future__ import annotations

import warnings

import numpy as np

from gradscope.stats import layout, numpy_backend, triton_backend
from gradscope.stats.dispatch import NUMPY, check_backend, engine_for
from gradscope.stats.inputs import check_tensor, collect_tensors, describe, flat_elements
from gradscope.stats.tensor_stats import TensorStats

_warned_fallback = False


def grad_stats(tensors, backend: str = "auto") -> TensorStats:
    """Gradient statistics of tensors, each read once (see :mod:`gradscope.stats.layout`).

    Args:
        tensors: a list (any iterable) of tensors, a single tensor, or an ``nn.Module``, in
            which case its parameters' ``.grad`` are used (parameters without a gradient are
            skipped, shared parameters counted once) and ``TensorStats.names`` holds the
            parameter names. Tensors may be float16, bfloat16, float32 or float64, of any
            shape or strides, dense or sparse, on CPU or CUDA.
        backend: ``"auto"`` (default): the Triton kernels for CUDA tensors when Triton
            works, NumPy otherwise. ``"triton"``: the kernels for every tensor; CUDA tensors,
            or CPU tensors when ``TRITON_INTERPRET=1`` was set before first use (raises if
            that cannot run). ``"numpy"``: NumPy on the CPU for every tensor (others are
            copied to the host chunk by chunk).

    Returns:
        :class:`TensorStats` with one row per tensor, in input order. This call waits for
        the device to finish; the training monitor uses the same kernels without waiting.

    Raises:
        TypeError: an input that is not a tensor, or a non-floating-point tensor (the error
            names the tensor's index, and its parameter name for modules, and its dtype).
        ValueError: an unknown backend, a tensor no backend can read, or ``backend="triton"``
            for a tensor Triton cannot read.

    Example:
        >>> import torch, gradscope
        >>> model = torch.nn.Linear(4, 2)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> stats = gradscope.grad_stats(model)
        >>> stats.names
        ('weight', 'bias')
        >>> stats.hist.shape
        (2, 64)
    """
    check_backend(backend, "grad_stats")
    items, names = collect_tensors(tensors)
    for index, tensor in enumerate(items):
        check_tensor(tensor, index, names)
    flats = [flat_elements(tensor) for tensor in items]

    on_kernels, on_numpy = [], []
    for index, flat in enumerate(flats):
        engine = engine_for(flat.values.device, backend, describe(index, names))
        (on_numpy if engine == NUMPY else on_kernels).append(index)
    rows = np.zeros((len(flats), layout.ROW_WIDTH))
    if on_kernels:
        try:
            rows[on_kernels] = triton_backend.triton_rows([flats[i] for i in on_kernels])
        except Exception as error:
            if backend == "triton":
                raise
            _warn_fallback(error)
            on_numpy += on_kernels
    if on_numpy:
        rows[on_numpy] = numpy_backend.numpy_rows([flats[i] for i in on_numpy])
    implicit = np.fromiter((flat.implicit_zeros for flat in flats), dtype=np.float64, count=len(flats))
    rows[:, layout.NUMEL] += implicit
    rows[:, layout.ZEROS] += implicit
    return TensorStats.from_rows(rows, names)


def _warn_fallback(error: Exception) -> None:
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(
            f"gradscope: the Triton kernels failed ({type(error).__name__}: {error}); "
            "falling back to the NumPy backend",
            RuntimeWarning,
            stacklevel=3,
        )
