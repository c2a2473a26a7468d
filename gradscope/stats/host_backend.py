"""The CPU backends: tensors in, statistics rows out, on every core, by one of two kernels.

This module plans the work and moves the bytes; a *kernel* (called through
:mod:`gradscope.stats.host_kernels`) turns runs of float32/float64 elements into rows
(:mod:`gradscope.stats.layout`):

* ``"numba"`` (:mod:`gradscope.stats.numba_kernels`): one fused compiled pass, near the
  memory floor; needs the optional numba package (``pip install gradscope[numba]``);
* ``"numpy"`` (:mod:`gradscope.stats.numpy_kernels`): a handful of large NumPy calls per
  run; always available.

Both give the same counts, ``max_abs`` and histograms, bit for bit; sums agree within the
NumPy kernel's bound (relative error below 1e-6). If the numba kernel fails (it compiles
on first use), the NumPy kernel takes over, with one warning, and training goes on.

Work items hold about ``CHUNK`` elements at most: a slice of one large tensor, or a pack of
whole small tensors of one dtype and device. The numba kernel reads a pack of contiguous CPU
float32/float64 tensors where they lie (it is given their addresses); otherwise a single call
into torch flattens the pack into one buffer, reduced by segments. CPU float32/float64
tensors are read in place; other dtypes and devices are staged chunk by chunk into a
per-thread float32/float64 buffer by ``torch``'s ``copy_``. Kernels release
the GIL, so items spread over threads use every core. Results are deterministic: a
tensor's items are combined in a fixed order, whatever the number of threads.

*Light* rows (``histogram=False``) come from each kernel's light variant, which skips the
histogram and reports each item's smallest non-zero ``|g|``; the rule of
:func:`gradscope.stats.layout.triggers_histogram` is applied per tensor, its items combined
(a tensor triggers when any of its slices does), and the tensors that trigger are computed
again in full. A tensor's row depends on nothing but the tensor, light or full.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from gradscope.stats import host_kernels, layout
from gradscope.stats.host_kernels import KERNELS as KERNELS
from gradscope.stats.host_kernels import fastest_kernel as fastest_kernel
from gradscope.stats.host_kernels import kernel_available as kernel_available
from gradscope.stats.host_kernels import why_unavailable as why_unavailable
from gradscope.stats.inputs import add_implicit_zeros, flat_elements

CHUNK = 1 << 19
"""Elements per work item (2 MiB of float32). Measured on a 2-core machine, smaller items
lose more to per-call costs and GIL hand-offs than they gain from cache locality."""

PACK_BELOW = 1 << 15
"""Tensors with fewer elements are packed, many to a work item, and reduced by segments."""

PARALLEL_ABOVE = 1 << 20
"""Inputs with fewer elements in total are processed on the calling thread."""

_READ_IN_PLACE = (torch.float32, torch.float64)
"""Dtypes whose CPU tensors the kernels read where they lie (others are staged as float32)."""


def default_num_threads() -> int:
    """Threads the backend uses by default: the CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class _Workspace:
    """Per-thread scratch buffers, grown on demand and reused across calls."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, np.dtype], np.ndarray] = {}

    def get(self, name: str, dtype, n: int) -> np.ndarray:
        key = (name, np.dtype(dtype))
        buffer = self._buffers.get(key)
        if buffer is None or buffer.size < n:
            buffer = np.empty(max(n, CHUNK), dtype=dtype)
            self._buffers[key] = buffer
        return buffer[:n]


_local = threading.local()
_pool: ThreadPoolExecutor | None = None
_pool_workers = 0
_pool_lock = threading.Lock()


def _workspace() -> _Workspace:
    ws = getattr(_local, "workspace", None)
    if ws is None:
        ws = _local.workspace = _Workspace()
    return ws


def _thread_pool(workers: int) -> ThreadPoolExecutor:
    """A shared pool with at least ``workers`` threads (created once, grown when asked for more)."""
    global _pool, _pool_workers
    with _pool_lock:
        if _pool is None or _pool_workers < workers:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gradscope-cpu")
            _pool_workers = workers
        return _pool


# --------------------------------------------------------------------------------------
# Reading elements
# --------------------------------------------------------------------------------------


def _float_kind(dtype: torch.dtype) -> type:
    """NumPy type the kernels compute in for a torch dtype."""
    return np.float64 if dtype == torch.float64 else np.float32


def _as_numpy(values: torch.Tensor, ws: _Workspace) -> np.ndarray:
    """A flat tensor's elements as float32/float64 NumPy: in place for CPU float32/float64
    tensors, else converted into the thread's staging buffer."""
    if values.is_cpu and values.dtype in _READ_IN_PLACE:
        return values.detach().numpy()
    staged = ws.get("stage", _float_kind(values.dtype), values.numel())
    torch.from_numpy(staged).copy_(values.detach())
    return staged


class _Slice:
    """Work item: elements ``start:stop`` of one large flat tensor."""

    __slots__ = ("start", "stop", "tensor", "values")

    def __init__(self, tensor: int, values: torch.Tensor, start: int, stop: int) -> None:
        self.tensor, self.values, self.start, self.stop = tensor, values, start, stop

    @property
    def numel(self) -> int:
        return self.stop - self.start

    @property
    def owners(self) -> list[int]:
        return [self.tensor]

    def rows(self, kernel, ws: _Workspace, inv_scale: float | None) -> np.ndarray:
        return kernel.run(_as_numpy(self.values[self.start : self.stop], ws), ws, inv_scale)


class _Pack:
    """Work item: several whole small tensors of one dtype and device.

    A kernel that reads tensors in place takes the parts as they are when they are all
    contiguous CPU float32/float64 tensors; otherwise one call into torch flattens the
    parts (copying, and converting to float32 later) into one buffer.
    """

    __slots__ = ("numel", "owners", "parts", "sizes")

    def __init__(self, owners: list[int], parts: list[torch.Tensor], sizes: np.ndarray) -> None:
        self.owners, self.parts, self.sizes = owners, parts, sizes
        self.numel = int(sizes.sum())

    def rows(self, kernel, ws: _Workspace, inv_scale: float | None) -> np.ndarray:
        parts = self.parts
        first = parts[0]
        if (
            kernel.in_place
            and first.is_cpu
            and first.dtype in _READ_IN_PLACE
            and all(part.is_contiguous() for part in parts)
        ):
            return kernel.tensors(parts, self.sizes, inv_scale)
        flat = first.contiguous().view(-1) if len(parts) == 1 else torch._utils._flatten_dense_tensors(parts)
        starts = np.zeros(len(parts) + 1, dtype=np.int64)
        np.cumsum(self.sizes, out=starts[1:])
        return kernel.packed(_as_numpy(flat, ws), starts, ws, inv_scale)


def _packs(tensors: Sequence[torch.Tensor], indices: np.ndarray, sizes: np.ndarray) -> list[_Pack]:
    """Consecutive ``tensors[indices]`` (one dtype and device) cut into packs of about
    ``CHUNK`` elements."""
    cuts = np.flatnonzero(np.diff(np.cumsum(sizes) // CHUNK)) + 1
    bounds = [0, *cuts.tolist(), len(indices)]
    packs = []
    for a, b in itertools.pairwise(bounds):
        owners = indices[a:b].tolist()
        packs.append(_Pack(owners, [tensors[i] for i in owners], sizes[a:b]))
    return packs


def _plan(tensors: Sequence[torch.Tensor]) -> tuple[list[_Slice | _Pack], np.ndarray]:
    """Work items of at most about ``CHUNK`` elements, in a fixed order, and each tensor's
    unstored zeros (sparse tensors).

    Gradients of one model are usually all strided tensors of one dtype on the CPU; then
    the plan is a few vectorised steps (a handful of attribute reads per tensor in all).
    """
    implicit = np.zeros(len(tensors))
    kinds = {(t.layout, t.dtype, t.is_cpu) for t in tensors}
    if len(kinds) == 1 and next(iter(kinds))[0] == torch.strided and next(iter(kinds))[2]:
        flats = tensors
        groups = [np.arange(len(tensors))]
    else:  # several dtypes or devices, sparse tensors: by (dtype, device), sparse ones flattened
        flats = []
        by_kind: dict[tuple, list[int]] = {}
        for index, tensor in enumerate(tensors):
            if tensor.layout != torch.strided:
                flat = flat_elements(tensor)
                tensor, implicit[index] = flat.values, flat.implicit_zeros
            flats.append(tensor)
            by_kind.setdefault((tensor.dtype, tensor.device), []).append(index)
        groups = [np.array(members) for members in by_kind.values()]
    sizes = np.fromiter((t.numel() for t in flats), dtype=np.int64, count=len(flats))
    items: list[_Slice | _Pack] = []
    for members in groups:
        numel = sizes[members]
        small = members[(numel > 0) & (numel < PACK_BELOW)]
        if small.size:
            items += _packs(flats, small, sizes[small])
        for index in members[numel >= PACK_BELOW].tolist():
            values, n = flat_elements(flats[index]).values, int(sizes[index])
            items.extend(_Slice(index, values, start, min(start + CHUNK, n)) for start in range(0, n, CHUNK))
    return items, implicit


def _run_items(items: Sequence[_Slice | _Pack], kernel, inv_scale: float | None) -> list:
    ws = _workspace()
    # Overflow of float64 squares beyond 1.3e154 is part of the result (sumsq = inf), not an error.
    with np.errstate(over="ignore", invalid="ignore"):
        return [item.rows(kernel, ws, inv_scale) for item in items]


def _split_evenly(items: Sequence[_Slice | _Pack], parts: int) -> list[Sequence[_Slice | _Pack]]:
    """Cut ``items`` into ``parts`` consecutive runs of about equal element counts."""
    sizes = np.fromiter((item.numel for item in items), dtype=np.int64, count=len(items))
    ends = np.cumsum(sizes)
    cuts = np.searchsorted(ends, ends[-1] * np.arange(1, parts) / parts, side="right")
    bounds = [0, *cuts.tolist(), len(items)]
    return [items[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def _compute(items, kernel, num_threads: int, inv_scale: float | None) -> list:
    """Each item's result from ``kernel`` (an adapter of :mod:`gradscope.stats.host_kernels`),
    in item order."""
    total = sum(item.numel for item in items)
    if num_threads > 1 and total >= PARALLEL_ABOVE and len(items) > 1:
        runs = _split_evenly(items, num_threads)
        # The calling thread takes the first run itself; the pool takes the others.
        pool = _thread_pool(num_threads - 1)
        futures = [pool.submit(_run_items, run, kernel, inv_scale) for run in runs[1:]]
        results = _run_items(runs[0], kernel, inv_scale)
        for future in futures:
            results.extend(future.result())
        return results
    return _run_items(items, kernel, inv_scale)


def host_rows(
    tensors: Sequence[torch.Tensor],
    kernel: str = "numpy",
    num_threads: int | None = None,
    inv_scale: float | None = None,
    histogram: bool = True,
) -> np.ndarray:
    """Statistics rows (float64 ``(T, ROW_WIDTH)``) of tensors, computed on the CPU.

    Args:
        tensors: checked tensors (:func:`gradscope.stats.inputs.check_tensor`), any layout,
            shape and device (non-CPU tensors are copied to the host chunk by chunk);
            sparse tensors' unstored zeros are counted.
        kernel: ``"numba"`` or ``"numpy"`` (:data:`KERNELS`); a numba kernel that cannot
            run hands over to NumPy (one warning).
        num_threads: worker threads; default :func:`default_num_threads`. Results do not
            depend on it.
        inv_scale: if given, statistics of ``g * inv_scale``, with inv_scale rounded to float32
            and the product in the tensor's precision (float32 for float16/bfloat16), as
            ``GradScaler.unscale_`` computes it.
        histogram: False for *light* rows (:mod:`gradscope.stats.layout`): the histogram
            columns of every tensor are NaN (:data:`~gradscope.stats.layout.NO_HISTOGRAM`)
            except those of tensors that trigger
            (:func:`~gradscope.stats.layout.triggers_histogram`: NaN/Inf, a tiny or a huge
            ``|g|`` after unscaling, in any slice of the tensor), which get their full row.
            The scalar columns are the full rows' bit for bit. Light rows are computed for
            all tensors first, then the triggering ones again in full.
    """
    items, implicit = _plan(tensors)
    out = np.zeros((len(tensors), layout.ROW_WIDTH))
    if not histogram:
        out[:, layout.HIST :] = layout.NO_HISTOGRAM  # empty tensors too: no histogram was computed
    threads = default_num_threads() if num_threads is None else num_threads
    lowest = np.full(len(tensors), np.inf)  # light rows: each tensor's smallest non-zero finite |g|
    if items:
        if kernel != "numpy" and not kernel_available(kernel):
            kernel = "numpy"
        try:
            results = _compute(items, host_kernels.adapter(kernel, histogram), threads, inv_scale)
        except Exception as error:
            if kernel == "numpy":
                raise
            host_kernels.mark_broken(kernel, error, stacklevel=3)
            kernel = "numpy"
            results = _compute(items, host_kernels.adapter(kernel, histogram), threads, inv_scale)
        owners = np.fromiter(itertools.chain.from_iterable(item.owners for item in items), dtype=np.intp)
        # A large tensor's slices are consecutive items: combine each tensor's rows by the rule.
        starts = np.flatnonzero(np.r_[True, owners[1:] != owners[:-1]])
        if not histogram:
            results, lowest_of_items = zip(*results, strict=True)
            lowest[owners[starts]] = np.minimum.reduceat(np.concatenate(lowest_of_items), starts)
        rows = np.concatenate(results)
        out[owners[starts]] = layout.combine_segments(rows, starts) if starts.size < owners.size else rows
    out = add_implicit_zeros(out, implicit)
    if not histogram:
        nonfinite = out[:, layout.NANS] + out[:, layout.INFS]
        triggered = np.flatnonzero(layout.triggers_histogram(nonfinite, lowest, out[:, layout.MAX_ABS]))
        if triggered.size:  # rare: their full rows, computed as if these tensors were alone
            out[triggered] = host_rows([tensors[i] for i in triggered], kernel, threads, inv_scale)
    return out
