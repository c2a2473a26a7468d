"""``grad_stats``: every statistic of a list of gradient tensors, from the best backend."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from gradscope.stats import host_backend, layout, triton_backend
from gradscope.stats.dispatch import check_backend, engine_for, is_host
from gradscope.stats.inputs import add_implicit_zeros, check_tensor, collect_tensors, describe, flat_elements
from gradscope.stats.reporting import GradscopeWarning
from gradscope.stats.tensor_stats import TensorStats

_warned_fallback = False


def grad_stats(tensors, backend: str = "auto", histogram: bool = True) -> TensorStats:
    """Gradient statistics of tensors, each read once (see :mod:`gradscope.stats.layout`).

    Args:
        tensors: a list (any iterable) of tensors, a single tensor, or an ``nn.Module``, in
            which case its parameters' ``.grad`` are used (parameters without a gradient are
            skipped, shared parameters counted once) and ``TensorStats.names`` holds the
            parameter names. As in ``clip_grad_norm_``, parameters stand for their gradients
            (``grad_stats(model.parameters())`` measures the gradients; a parameter without
            one is skipped): any ``nn.Parameter`` or leaf tensor that requires grad. Pass
            ``p.detach()`` to measure a parameter's values. Tensors may be float16, bfloat16,
            float32 or float64, of any shape or strides, dense or sparse, on CPU or CUDA.
        backend: ``"auto"`` (default): the Triton kernels for CUDA tensors when Triton
            works, the fastest CPU kernel installed otherwise (numba, else NumPy).
            ``"triton"``: the kernels for every tensor; CUDA tensors, or CPU tensors when
            ``TRITON_INTERPRET=1`` was set before first use (raises if that cannot run).
            ``"numba"`` / ``"numpy"``: that CPU kernel for every tensor (tensors on other
            devices are copied to the host chunk by chunk).
        histogram: True (default): every statistic, the 64-bin histogram included. False:
            *light* statistics (:mod:`gradscope.stats.layout`), cheaper because the
            histogram is the costly part: every other field is computed exactly as with
            ``histogram=True`` (the same values, bit for bit), but a tensor's histogram is
            computed only when the tensor *triggers*, that is holds a NaN or Inf, a non-zero
            ``|g|`` below ``2**-63`` (:data:`~gradscope.stats.layout.TINY_BELOW`) or a finite
            ``|g|`` from ``2**56`` (:data:`~gradscope.stats.layout.HUGE_FROM`) up: the
            values a histogram is needed to explain. For every other tensor the histogram is
            unknown: ``TensorStats.hist_known`` is False there and its ``hist`` row zeros
            (its statistics rows hold NaN, :data:`~gradscope.stats.layout.NO_HISTOGRAM`).
            Every backend applies the same rule.

    Returns:
        :class:`TensorStats` with one row per tensor, in input order. This call waits for
        the device to finish; the training monitor uses the same kernels without waiting.

    Raises:
        TypeError: an input that is not a tensor, or a non-floating-point tensor (the error
            names the tensor's index, and its parameter name for modules, and its dtype).
        ValueError: an unknown backend, a tensor no backend can read, or ``backend="triton"``
            for a tensor Triton cannot read.

    Examples:
        >>> import torch, gradscope
        >>> model = torch.nn.Linear(4, 2)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> stats = gradscope.grad_stats(model)
        >>> stats.names
        ('weight', 'bias')
        >>> stats.hist.shape
        (2, 64)
        >>> light = gradscope.grad_stats(model, histogram=False)  # no histogram: nothing triggers
        >>> light.hist_known.tolist(), bool((light.norm == stats.norm).all())
        ([False, False], True)
    """
    check_backend(backend, "grad_stats")
    items, names = collect_tensors(tensors)
    for index, tensor in enumerate(items):
        check_tensor(tensor, index, names)
    rows = np.zeros((len(items), layout.ROW_WIDTH))
    on_kernels: list[int] = []
    on_host: dict[str, list[int]] = {}  # CPU kernel -> tensors
    engine_of: dict[torch.device, object] = {}  # one decision per device (the first tensor there names it)
    for index, tensor in enumerate(items):
        device = tensor.device
        engine = engine_of.get(device)
        if engine is None:
            engine = engine_of[device] = engine_for(device, backend, describe(index, names))
        if is_host(engine):
            on_host.setdefault(engine, []).append(index)
        else:
            on_kernels.append(index)
    if on_kernels:
        flats = [flat_elements(items[i]) for i in on_kernels]
        try:
            implicit = np.array([flat.implicit_zeros for flat in flats], dtype=np.float64)
            found = triton_backend.triton_rows(flats, inv_scale=None, histogram=histogram)
            rows[on_kernels] = add_implicit_zeros(found, implicit)
        except Exception as error:
            if backend == "triton":
                raise
            _warn_fallback(error)
            on_host.setdefault(host_backend.fastest_kernel(), []).extend(on_kernels)
    for kernel, indices in on_host.items():
        rows[indices] = host_backend.host_rows([items[i] for i in indices], kernel, histogram=histogram)
    return TensorStats.from_rows(rows, names)


def _warn_fallback(error: Exception) -> None:
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(
            f"gradscope: the Triton kernels failed ({type(error).__name__}: {error}); falling back to a CPU kernel",
            GradscopeWarning,
            stacklevel=3,
        )
