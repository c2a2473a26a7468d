"""The NumPy backend: every statistic on the CPU, vectorised, chunked and multi-threaded.

Each tensor is read as a flat run of float32 (float16, bfloat16 and float32 sources) or
float64 elements, in work items of at most ``CHUNK`` elements: a slice of one large tensor,
or a pack of whole small tensors. CPU float32/float64 tensors are read in place; any other
dtype or device is staged chunk by chunk into a per-thread float32/float64 buffer by
``torch``'s ``copy_`` (vectorised conversion, no Python loop, never a full-size float64 copy).

Per work item, all statistics come from a handful of large NumPy calls, each of which runs
without the GIL, so work items spread over threads use every core and the backend can run
on a monitor's worker thread beside autograd:

* histogram: the exponent byte is cut out of each value's bits with one shift (no ``log``),
  clamped into a bin, and bins are counted two at a time (a pair of bin bytes read as one
  ``uint16`` key), halving the scalar loop inside ``np.bincount`` that dominates CPU cost;
* zeros and non-finite values are derived from that histogram and from ``max``/``min`` and
  only counted separately when the histogram says they may be present;
* sums: float32 dot products of 256-element rows (with themselves, and with ones),
  combined in float64 (relative error below 1e-6); a chunk whose float32 sums overflow, or
  whose sum of squares is small enough for float32 underflow to matter, is summed again in
  float64.

Results are deterministic: rows of a tensor's work items are combined in a fixed order,
independent of the number of threads.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from gradscope.stats import layout
from gradscope.stats.inputs import FlatElements

CHUNK = 1 << 19
"""Elements per work item (2 MiB of float32). Measured on a 2-core machine, smaller items
lose more to NumPy's per-call cost and GIL hand-offs than they gain from cache locality."""

PACK_BELOW = 1 << 15
"""Tensors with fewer elements are packed, many to a work item, and reduced by segments."""

PARALLEL_ABOVE = 1 << 20
"""Inputs with fewer elements in total are processed on the calling thread."""

PAIRS_FROM = 1 << 16
"""Runs with at least this many elements count histogram bins in pairs (see ``_bin_counts``)."""

_ROW_DOT = 256  # elements per float32 dot product in the fast sums
_ONES_F32 = np.ones(_ROW_DOT, dtype=np.float32)
_VECDOT = getattr(np, "vecdot", None)  # NumPy >= 2.0; einsum otherwise
_PAIR_KEYS = layout.NUM_BINS * 256  # bin pairs read as little-endian uint16: lo + 256 * hi
_SMALLEST_SAFE_SUMSQ = 2.0**-100  # below, float32 squares may have lost tiny values
_F32_EXPONENT_BIN0 = 127 + layout.HIST_MIN_EXPONENT  # biased float32 exponent of bin 0 (79)
_F64_EXPONENT_BIN0 = 1023 + layout.HIST_MIN_EXPONENT  # biased float64 exponent of bin 0 (975)
_LAST_BIN = layout.NUM_BINS - 1


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
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gradscope-numpy")
            _pool_workers = workers
        return _pool


# --------------------------------------------------------------------------------------
# Reading elements
# --------------------------------------------------------------------------------------


def _float_kind(dtype: torch.dtype) -> type:
    """NumPy type the backend computes in for a torch dtype."""
    return np.float64 if dtype == torch.float64 else np.float32


def _readable_in_place(values: torch.Tensor) -> bool:
    return values.device.type == "cpu" and values.dtype in (torch.float32, torch.float64)


def _scaled(values: np.ndarray, inv_scale: float, out: np.ndarray) -> np.ndarray:
    """``values * inv_scale`` into ``out``, with inv_scale rounded to float32 as a GradScaler holds it."""
    return np.multiply(values, out.dtype.type(np.float32(inv_scale)), out=out)


def _read(values: torch.Tensor, start: int, stop: int, ws: _Workspace, inv_scale: float | None) -> np.ndarray:
    """Elements ``start:stop`` of a flat tensor (times ``inv_scale``, if given) as float32/float64
    NumPy; read in place when possible."""
    if _readable_in_place(values):
        view = values.detach()[start:stop].numpy()
        if inv_scale is None:
            return view
        return _scaled(view, inv_scale, ws.get("stage", view.dtype, view.size))
    staged = ws.get("stage", _float_kind(values.dtype), stop - start)
    torch.from_numpy(staged).copy_(values.detach()[start:stop])
    return staged if inv_scale is None else _scaled(staged, inv_scale, staged)


def _read_packed(parts: Sequence[torch.Tensor], total: int, ws: _Workspace, inv_scale: float | None) -> np.ndarray:
    """Several small flat tensors (one dtype and device) concatenated into one NumPy run
    (times ``inv_scale``, if given)."""
    staged = ws.get("stage", _float_kind(parts[0].dtype), total)
    if _readable_in_place(parts[0]):
        np.concatenate([p.detach().numpy() for p in parts], out=staged)
    else:
        torch.from_numpy(staged).copy_(torch.cat([p.detach() for p in parts]))
    return staged if inv_scale is None else _scaled(staged, inv_scale, staged)


# --------------------------------------------------------------------------------------
# Histogram bins
# --------------------------------------------------------------------------------------


def _bins(values: np.ndarray, ws: _Workspace) -> np.ndarray:
    """uint8 histogram bin of every element, from the exponent bits (no log).

    Zeros and subnormals fall in bin 0 and NaN/Inf in bin 63; callers remove them.
    """
    n = values.size
    bins = ws.get("bins", np.uint8, n)
    if values.dtype == np.float32:
        # The shift leaves sign and exponent; the unsafe cast to uint8 keeps the exponent.
        np.right_shift(values.view(np.uint32), 23, out=bins, casting="unsafe")
        np.clip(bins, _F32_EXPONENT_BIN0, _F32_EXPONENT_BIN0 + _LAST_BIN, out=bins)
        np.subtract(bins, _F32_EXPONENT_BIN0, out=bins)
    else:
        exponent = ws.get("exponent", np.uint16, n)
        np.right_shift(values.view(np.uint64), 52, out=exponent, casting="unsafe")
        np.bitwise_and(exponent, 0x7FF, out=exponent)
        np.clip(exponent, _F64_EXPONENT_BIN0, _F64_EXPONENT_BIN0 + _LAST_BIN, out=exponent)
        np.subtract(exponent, _F64_EXPONENT_BIN0, out=exponent)
        np.copyto(bins, exponent, casting="unsafe")
    return bins


def _bin_counts(bins: np.ndarray, ws: _Workspace) -> np.ndarray:
    """int64 ``(NUM_BINS,)`` counts of a uint8 bin array.

    Large arrays are counted two bins per ``bincount`` step: each pair of bytes read as one
    uint16 key ``a + 256 * b`` (either byte order), whose 2-D counts fold back onto bins.
    """
    n = bins.size
    if n < PAIRS_FROM:
        return np.bincount(bins, minlength=layout.NUM_BINS)
    half = n // 2
    keys = ws.get("pair_keys", np.intp, half)
    np.copyto(keys, bins[: 2 * half].view(np.uint16))
    pairs = np.bincount(keys, minlength=_PAIR_KEYS)[:_PAIR_KEYS].reshape(layout.NUM_BINS, 256)
    pairs = pairs[:, : layout.NUM_BINS]
    counts = pairs.sum(axis=0) + pairs.sum(axis=1)
    if n % 2:
        counts[bins[-1]] += 1
    return counts


# --------------------------------------------------------------------------------------
# One run of elements -> one row
# --------------------------------------------------------------------------------------


def _row_dots(rows: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Dot product of each row of ``rows`` with the matching row of ``other`` (broadcast)."""
    if _VECDOT is not None:
        return _VECDOT(rows, other)
    return np.einsum("ij,ij->i", rows, np.broadcast_to(other, rows.shape))


def _sums(values: np.ndarray, ws: _Workspace) -> tuple[float, float]:
    """(sum, sum of squares) of finite values, to ~1e-6 relative or better.

    float32 runs are reduced as 256-element rows (float32 dot products of each row with
    itself and with ones), and the row results added in float64. Runs whose float32 sums
    overflow, or whose squares are small enough for float32 underflow to matter (sum of
    squares below 2**-100), are summed again in float64.
    """
    if values.dtype == np.float32:
        body = values.size - values.size % _ROW_DOT
        rows = values[:body].reshape(-1, _ROW_DOT)
        tail = values[body:].astype(np.float64)
        total = float(np.add.reduce(_row_dots(rows, _ONES_F32), dtype=np.float64)) + float(tail.sum())
        squares = float(np.add.reduce(_row_dots(rows, rows), dtype=np.float64)) + float(np.einsum("i,i->", tail, tail))
        if np.isfinite(total) and np.isfinite(squares) and squares >= _SMALLEST_SAFE_SUMSQ:
            return total, squares
        wide = ws.get("wide", np.float64, values.size)
        np.copyto(wide, values)
        values = wide
    return float(np.add.reduce(values)), float(np.einsum("i,i->", values, values))


def _run_row(values: np.ndarray, ws: _Workspace) -> np.ndarray:
    """The statistics row of one run of float32/float64 elements (see ``layout``)."""
    row = np.zeros(layout.ROW_WIDTH)
    n = values.size
    row[layout.NUMEL] = n
    if n == 0:
        return row
    hist = _bin_counts(_bins(values, ws), ws)
    high, low = values.max(), values.min()
    if not (np.isfinite(high) and np.isfinite(low)):
        nonfinite = ~np.isfinite(values)
        nans = int(np.count_nonzero(np.isnan(values)))
        infs = int(np.count_nonzero(nonfinite)) - nans
        hist[_LAST_BIN] -= nans + infs
        finite = np.where(nonfinite, 0, values)
        high, low = finite.max(), finite.min()
        row[layout.NANS], row[layout.INFS] = nans, infs
        values = finite
        zeros = int(np.count_nonzero(values == 0)) - nans - infs
    elif hist[0]:
        zeros = int(np.count_nonzero(np.equal(values, 0, out=ws.get("is_zero", bool, n))))
    else:
        zeros = 0
    hist[0] -= zeros
    row[layout.SUM], row[layout.SUMSQ] = _sums(values, ws)
    row[layout.MAX_ABS] = max(float(high), -float(low))
    row[layout.ZEROS] = zeros
    row[layout.HIST :] = hist
    return row


def _packed_rows(values: np.ndarray, sizes: np.ndarray, ws: _Workspace) -> np.ndarray:
    """Rows of several non-empty tensors laid end to end in ``values`` (segmented reductions)."""
    k = sizes.size
    starts = np.zeros(k, dtype=np.intp)
    np.cumsum(sizes[:-1], out=starts[1:])
    rows = np.zeros((k, layout.ROW_WIDTH))
    rows[:, layout.NUMEL] = sizes
    segment = np.repeat(np.arange(k, dtype=np.intp) * layout.NUM_BINS, sizes)
    segment += _bins(values, ws)
    hist = np.bincount(segment, minlength=k * layout.NUM_BINS).reshape(k, layout.NUM_BINS)
    zeros = np.add.reduceat((values == 0).view(np.uint8), starts, dtype=np.int64)
    wide = ws.get("wide", np.float64, values.size)
    np.copyto(wide, values)
    nonfinite = ~np.isfinite(wide)
    if nonfinite.any():
        nans = np.add.reduceat(np.isnan(wide).view(np.uint8), starts, dtype=np.int64)
        infs = np.add.reduceat(nonfinite.view(np.uint8), starts, dtype=np.int64) - nans
        hist[:, _LAST_BIN] -= nans + infs
        rows[:, layout.NANS], rows[:, layout.INFS] = nans, infs
        wide[nonfinite] = 0
    hist[:, 0] -= zeros
    rows[:, layout.ZEROS] = zeros
    rows[:, layout.SUM] = np.add.reduceat(wide, starts)
    magnitude = ws.get("magnitude", np.float64, values.size)
    np.abs(wide, out=magnitude)
    rows[:, layout.MAX_ABS] = np.maximum.reduceat(magnitude, starts)
    np.square(wide, out=wide)
    rows[:, layout.SUMSQ] = np.add.reduceat(wide, starts)
    rows[:, layout.HIST :] = hist
    return rows


# --------------------------------------------------------------------------------------
# Planning work and running it
# --------------------------------------------------------------------------------------


class _Slice:
    """Work item: elements ``start:stop`` of one large tensor."""

    __slots__ = ("start", "stop", "tensor", "values")

    def __init__(self, tensor: int, values: torch.Tensor, start: int, stop: int) -> None:
        self.tensor, self.values, self.start, self.stop = tensor, values, start, stop

    @property
    def numel(self) -> int:
        return self.stop - self.start

    def rows(self, ws: _Workspace, inv_scale: float | None) -> np.ndarray:
        return _run_row(_read(self.values, self.start, self.stop, ws, inv_scale), ws)[None, :]


class _Pack:
    """Work item: several whole small tensors of one dtype and device."""

    __slots__ = ("numel", "parts", "tensors")

    def __init__(self) -> None:
        self.tensors: list[int] = []
        self.parts: list[torch.Tensor] = []
        self.numel = 0

    def rows(self, ws: _Workspace, inv_scale: float | None) -> np.ndarray:
        values = _read_packed(self.parts, self.numel, ws, inv_scale)
        sizes = np.fromiter((p.numel() for p in self.parts), dtype=np.intp, count=len(self.parts))
        return _packed_rows(values, sizes, ws)


def _plan(flats: Sequence[FlatElements]) -> list[_Slice | _Pack]:
    """Split tensors into work items of at most ``CHUNK`` elements, in a fixed order."""
    items: list[_Slice | _Pack] = []
    packs: dict[tuple, _Pack] = {}
    for index, flat in enumerate(flats):
        values = flat.values
        n = values.numel()
        if n == 0:
            continue
        if n >= PACK_BELOW:
            items.extend(_Slice(index, values, start, min(start + CHUNK, n)) for start in range(0, n, CHUNK))
            continue
        key = (values.dtype, values.device)
        pack = packs.get(key)
        if pack is None or pack.numel + n > CHUNK:
            pack = packs[key] = _Pack()
            items.append(pack)
        pack.tensors.append(index)
        pack.parts.append(values)
        pack.numel += n
    return items


def _run_items(items: Sequence[_Slice | _Pack], inv_scale: float | None) -> list[np.ndarray]:
    ws = _workspace()
    # Overflow of float64 squares beyond 1.3e154 is part of the result (sumsq = inf), not an error.
    with np.errstate(over="ignore", invalid="ignore"):
        return [item.rows(ws, inv_scale) for item in items]


def _split_evenly(items: Sequence[_Slice | _Pack], parts: int) -> list[Sequence[_Slice | _Pack]]:
    """Cut ``items`` into ``parts`` consecutive runs of about equal element counts."""
    sizes = np.fromiter((item.numel for item in items), dtype=np.int64, count=len(items))
    ends = np.cumsum(sizes)
    cuts = np.searchsorted(ends, ends[-1] * np.arange(1, parts) / parts, side="right")
    bounds = [0, *cuts.tolist(), len(items)]
    return [items[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def numpy_rows(
    flats: Sequence[FlatElements], num_threads: int | None = None, inv_scale: float | None = None
) -> np.ndarray:
    """Statistics rows (float64 ``(T, ROW_WIDTH)``) of flattened tensors, computed with NumPy.

    Rows describe ``flats[i].values``; sparse tensors' unstored zeros are not added here.

    Args:
        flats: the tensors' elements, as produced by :func:`gradscope.stats.inputs.flat_elements`;
            any device (non-CPU tensors are copied to host chunk by chunk).
        num_threads: worker threads; default :func:`default_num_threads`. Results do not
            depend on it.
        inv_scale: if given, statistics of ``g * inv_scale``, with inv_scale rounded to
            float32 and the product in float32 (float64 for float64 tensors), as
            ``GradScaler.unscale_`` computes it.
    """
    items = _plan(flats)
    if num_threads is None:
        num_threads = default_num_threads()
    total = sum(item.numel for item in items)
    if num_threads > 1 and total >= PARALLEL_ABOVE and len(items) > 1:
        runs = _split_evenly(items, num_threads)
        # The calling thread takes the first run itself; the pool takes the others.
        pool = _thread_pool(num_threads - 1)
        futures = [pool.submit(_run_items, run, inv_scale) for run in runs[1:]]
        results = _run_items(runs[0], inv_scale)
        for future in futures:
            results.extend(future.result())
    else:
        results = _run_items(items, inv_scale)

    partial: list[list[np.ndarray]] = [[] for _ in flats]
    for item, rows in zip(items, results, strict=True):
        if isinstance(item, _Slice):
            partial[item.tensor].append(rows[0])
        else:
            for index, row in zip(item.tensors, rows, strict=True):
                partial[index].append(row)
    out = np.zeros((len(flats), layout.ROW_WIDTH))
    for index, rows in enumerate(partial):
        if rows:
            out[index] = layout.combine_rows(np.stack(rows))
    return out
