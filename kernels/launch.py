"""Launcher of the statistics kernel (``grad_stats.py``): checks inputs, builds the work
table, chooses the tiling and launches, without host synchronisation: one full launch per
group of tensors, or for light rows (``histogram=False``) a light launch and the gated full
launch that completes the tensors it flagged, sharing the work table, the scratch rows and
a persistent trigger buffer per (device, stream).

The kernel's layouts (the work table, the partial rows) are documented in ``grad_stats.py``
and written here; the tiling (tile shape, chunk sizes, warps) is chosen here from the
measurements in ``benchmarks/bench_launch.py`` and the static report
``benchmarks/kernel_static.py``.
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch
import triton
import triton.language as tl
from gradscope.kernels.grad_stats import _MAX_CHUNK, PARTIAL_HIST, PARTIAL_WIDTH, _grad_stats_kernel

from gradscope.stats import layout

_TRITON_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}

_arrival_counters: dict[tuple[int, int], torch.Tensor] = {}
_trigger_flags: dict[tuple[int, int], torch.Tensor] = {}


def is_interpreted() -> bool:
    """True when the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import).

    Interpreted kernels read CPU tensors; compiled kernels read CUDA tensors.
    """
    return not isinstance(_grad_stats_kernel, triton.runtime.JITFunction)


def _zeroed(buffers: dict[tuple[int, int], torch.Tensor], device: torch.device, count: int) -> torch.Tensor:
    """A zeroed int32 buffer of at least ``count`` entries that the kernel leaves zeroed again.

    On CUDA it is kept per (device, stream) in ``buffers`` and reused: launches on one stream
    run in order, so no memset is needed between them.
    """
    if device.type != "cuda":
        return torch.zeros(count, dtype=torch.int32, device=device)
    key = (device.index, torch.cuda.current_stream(device).cuda_stream)
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < count:
        buffer = torch.zeros(max(count, 1024), dtype=torch.int32, device=device)
        buffers[key] = buffer
    return buffer


def _arrival(device: torch.device, count: int) -> torch.Tensor:
    """Per-tensor arrival counters of one launch (zero; each finishing program resets its own)."""
    return _zeroed(_arrival_counters, device, count)


def _triggers(device: torch.device, count: int) -> torch.Tensor:
    """Per-tensor histogram triggers of a light launch and its gated launch (zero; the gated
    launch's finishing programs reset the ones the light launch set)."""
    return _zeroed(_trigger_flags, device, count)


TARGET_CHUNKS = 512
"""A tensor is split into about this many chunks at most (chunks grow from the minimum in
powers of two, up to 2**20 elements): the finishing program then adds at most
``TARGET_CHUNKS / FINAL_ROWS`` tiles for any tensor below 2**29 elements."""


def _launch_sizes(dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """(block, careful block, minimum chunk elements, final rows, warps) for one launch.

    Chunk sizes depend on each tensor's own size only (:func:`chunk_sizes`), never on the
    launch's other tensors, so a tensor's row is bit-identical whichever tensors share its
    launch (the monitor launches per bucket of gradients in backward mode and all at once in
    step mode). 2**16 elements per program keeps every SM busy from about 10M elements.

    Compiled: 4 warps, and ``block`` = ROWS x 128 threads x one 16-byte vector each: 4 rows
    of 8 for 16-bit inputs, 8 rows of 4 for float32, 2 rows of 2 for float64, so each thread
    keeps 64 (32 for float64) bytes of loads in flight per step. Registers and spills of each
    variant are in ``benchmarks/kernel_static.py``'s report; timings in ``bench_launch.py``.
    """
    if is_interpreted():
        return 1024, 256, 1 << 12, 8, 1
    if dtype == torch.float64:
        return 512, 256, 1 << 16, 16, 4
    return 4096, 512, 1 << 16, 16, 4


def tile_shape(block: int, num_warps: int, element_size: int) -> tuple[int, int, int]:
    """(ROWS, LANES, VEC) of a fast-path tile of ``block`` elements (powers of two).

    LANES = one per thread, each taking ROWS x VEC elements per step: VEC contiguous ones (16
    bytes) from each of ROWS rows when aligned, every LANES-th element otherwise
    (``grad_stats._tile_offsets``).
    """
    vec = max(1, min(16 // element_size, block))
    lanes = max(1, min(32 * num_warps, block // vec))
    return block // (lanes * vec), lanes, vec


def chunk_sizes(numels: np.ndarray, min_chunk: int) -> np.ndarray:
    """Elements per chunk of each tensor: ``min_chunk`` (a power of two), doubled until the
    tensor has at most :data:`TARGET_CHUNKS` chunks, capped at 2**20 (float32 partial counts
    stay exact)."""
    wanted = np.maximum(-(-numels // TARGET_CHUNKS), 1)
    doublings = np.ceil(np.log2(np.maximum(wanted / min_chunk, 1.0))).astype(np.int64)
    return np.minimum(np.left_shift(np.int64(min_chunk), doublings), max(_MAX_CHUNK, min_chunk))


TABLE_CACHE = 32
"""Work tables kept, with their partial-row scratch, per (device, stream, dtype, tiling and
the tensors' addresses, sizes and rows). A monitor launches the same gradients at the same
addresses step after step (the same buckets in backward mode): a hit skips building the
table, copying it to the device and allocating scratch, so the launch does no allocation and
no copy, and can be captured in a CUDA graph (the captured table stays alive here)."""

_tables: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]] = OrderedDict()


def _prepared(
    device: torch.device,
    dtype: torch.dtype,
    addresses: np.ndarray,
    numels: np.ndarray,
    rows: np.ndarray,
    chunk_numel: int,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(work table on ``device``, partial-row scratch, chunks) of one launch group, from the
    cache (:data:`TABLE_CACHE`) or built, copied (pinned + async: no host sync) and kept."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream, dtype, chunk_numel, addresses.tobytes(), numels.tobytes(), rows.tobytes())
    found = _tables.get(key)
    if found is not None:
        _tables.move_to_end(key)
        return found[1], found[2], found[3]
    table = work_table(addresses, numels, rows, chunk_numel)
    host = torch.from_numpy(table)
    on_device = host
    if device.type == "cuda":
        host = host.pin_memory()
        on_device = host.to(device, non_blocking=True)
    chunks = (table.size - 6 * addresses.size) // 2
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    partial = torch.empty((chunks, PARTIAL_WIDTH), dtype=acc, device=device)  # both launches' of a pair
    _tables[key] = (host, on_device, partial, chunks)
    if len(_tables) > TABLE_CACHE:
        _tables.popitem(last=False)  # stream-ordered frees: in-flight launches keep their memory
    return on_device, partial, chunks


def grad_stats_launch(
    values: Sequence[torch.Tensor],
    out: torch.Tensor,
    out_rows: Sequence[int],
    *,
    inv_scale: torch.Tensor | None = None,
    histogram: bool = True,
    block: int | None = None,
    careful_block: int | None = None,
    chunk_numel: int | None = None,
    final_rows: int | None = None,
    checked: bool = True,
) -> None:
    """Write the statistics rows of ``values`` into ``out[out_rows]``, without host synchronisation.

    The 16-byte-aligned tensors and the others are launched apart (so that one misaligned
    tensor does not cost the rest their wide loads), whatever the number of tensors: one
    full launch each, or with ``histogram=False`` a light launch and its gated launch each
    (``grad_stats.py``). The caller keeps ``values`` alive until the launches have run (on
    CUDA, stream order does this for tensors it frees).

    Args:
        values: 1-D contiguous tensors sharing one device and one dtype (float16, bfloat16,
            float32 or float64): CUDA tensors for compiled kernels, CPU tensors when
            interpreted (:func:`is_interpreted`). Empty tensors get a row of zeros.
        out: float64 ``(R, ROW_WIDTH)`` contiguous tensor on the same device.
        out_rows: for each tensor, the row of ``out`` it writes (distinct).
        inv_scale: optional float32 one-element tensor on the same device; statistics are
            then those of ``g * inv_scale`` (multiplied in float32, as ``GradScaler.unscale_``
            does), read by the kernel so that no host synchronisation is needed.
        histogram: True: every row complete. False: light rows (``layout``'s "Light rows"):
            histogram columns NaN, except for the tensors that trigger
            (``layout.triggers_histogram``), whose rows are complete; the other columns are
            bit-identical to a complete row's either way.
        block, careful_block, chunk_numel, final_rows: override the tiling (tests); powers of
            two, ``chunk_numel`` (the smallest chunk) a multiple of both blocks and at most 2**20.
        checked: False skips the per-tensor checks of ``values``, ``out`` and ``out_rows``
            (about 0.2 µs of Python per tensor), for callers whose inputs are 1-D contiguous
            by construction and grouped by dtype (the monitor's,
            ``gradscope.stats.triton_backend.launch_rows``).
    """
    if not values:
        return
    first = values[0]
    device, dtype = first.device, first.dtype
    if checked:
        _check(values, out, out_rows, inv_scale)
    elif dtype not in _TRITON_DTYPES:
        raise TypeError(f"grad_stats_launch: dtype {dtype} is not one of {list(_TRITON_DTYPES)}")
    numels = np.fromiter((v.numel() for v in values), dtype=np.int64, count=len(values))
    sizes = _launch_sizes(dtype)
    block = block or sizes[0]
    careful_block = careful_block or sizes[1]
    chunk_numel = chunk_numel or max(sizes[2], block, careful_block)
    power_of_two = (chunk_numel & (chunk_numel - 1)) == 0
    if not power_of_two or chunk_numel % block or chunk_numel % careful_block or chunk_numel > _MAX_CHUNK:
        raise ValueError(
            f"grad_stats_launch: chunk_numel={chunk_numel} must be a power of two, a multiple of both blocks, "
            f"<= {_MAX_CHUNK}"
        )
    rows = np.asarray(out_rows, dtype=np.int64)
    if checked and (rows.min() < 0 or rows.max() >= out.shape[0]):
        raise ValueError(f"grad_stats_launch: out_rows must lie in [0, {out.shape[0]})")
    addresses = np.fromiter((v.data_ptr() for v in values), dtype=np.int64, count=len(values))
    aligned = addresses % 16 == 0
    for group in (aligned, ~aligned):
        if group.any():
            table, partial, chunks = _prepared(device, dtype, addresses[group], numels[group], rows[group], chunk_numel)
            _launch_prepared(
                table,
                partial,
                chunks,
                int(group.sum()),
                bool(aligned[group][0]),
                dtype,
                out,
                inv_scale=inv_scale,
                histogram=histogram,
                block=block,
                careful_block=careful_block,
                final_rows=final_rows or sizes[3],
                num_warps=sizes[4],
            )


def _check(values: Sequence[torch.Tensor], out: torch.Tensor, out_rows: Sequence[int], inv_scale) -> None:
    """Raise naming what is wrong with a launch's inputs (see :func:`grad_stats_launch`)."""
    first = values[0]
    device, dtype = first.device, first.dtype
    if dtype not in _TRITON_DTYPES:
        raise TypeError(f"grad_stats_launch: dtype {dtype} is not one of {list(_TRITON_DTYPES)}")
    wanted = "cpu" if is_interpreted() else "cuda"
    if device.type != wanted:
        mode = "interpreted (TRITON_INTERPRET=1)" if is_interpreted() else "compiled"
        raise ValueError(f"grad_stats_launch: {mode} kernels read {wanted} tensors, got a {device.type} tensor")
    for i, v in enumerate(values):
        if v.device != device or v.dtype != dtype:
            raise ValueError(f"grad_stats_launch: tensor {i} is {v.dtype} on {v.device}, expected {dtype} on {device}")
        if v.dim() != 1 or not v.is_contiguous():
            raise ValueError(f"grad_stats_launch: tensor {i} must be 1-D and contiguous")
    if out.dtype != torch.float64 or out.dim() != 2 or out.shape[1] != layout.ROW_WIDTH or not out.is_contiguous():
        raise ValueError(f"grad_stats_launch: out must be a contiguous float64 (R, {layout.ROW_WIDTH}) tensor")
    if out.device != device:
        raise ValueError(f"grad_stats_launch: out is on {out.device}, the tensors on {device}")
    if len(out_rows) != len(values):
        raise ValueError(f"grad_stats_launch: {len(out_rows)} out_rows for {len(values)} tensors")
    if inv_scale is not None and (
        inv_scale.dtype != torch.float32 or inv_scale.numel() != 1 or inv_scale.device != device
    ):
        raise ValueError(f"grad_stats_launch: inv_scale must be a one-element float32 tensor on {device}")


def work_table(addresses: np.ndarray, numels: np.ndarray, out_rows: np.ndarray, min_chunk: int) -> np.ndarray:
    """The kernel's int64 work table (layout in ``_grad_stats_kernel``); every tensor gets a chunk.

    Args:
        addresses: int64 ``(T,)`` address of each tensor's first element.
        numels: int64 ``(T,)`` elements per tensor.
        out_rows: int64 ``(T,)`` output row per tensor.
        min_chunk: elements per chunk of small tensors (:func:`chunk_sizes`).
    """
    count = numels.size
    chunk_numel = chunk_sizes(numels, min_chunk)
    chunks = np.maximum(1, -(-numels // chunk_numel))
    first_chunk = np.zeros(count, dtype=np.int64)
    np.cumsum(chunks[:-1], out=first_chunk[1:])
    chunk_tensor = np.repeat(np.arange(count, dtype=np.int64), chunks)
    chunk_start = (np.arange(chunk_tensor.size, dtype=np.int64) - first_chunk[chunk_tensor]) * chunk_numel[chunk_tensor]
    return np.concatenate([addresses, numels, out_rows, first_chunk, chunks, chunk_numel, chunk_tensor, chunk_start])


def _exponent(power_of_two: float) -> int:
    """``e`` such that ``power_of_two == 2.0**e``."""
    mantissa, exponent = math.frexp(power_of_two)
    if mantissa != 0.5:
        raise ValueError(f"{power_of_two} is not a power of two")
    return exponent - 1


def kernel_meta(
    dtype: torch.dtype,
    *,
    aligned: bool,
    scale: bool,
    histogram: bool = True,
    gated: bool = False,
    block: int,
    careful_block: int,
    final_rows: int,
    num_warps: int,
    maxnreg: int | None = None,
) -> tuple[dict, dict]:
    """(constexpr arguments, compiler options) of one launch: the one place that says which
    variant a launch compiles, read by :func:`launch_table` and by the static report
    (``benchmarks/kernel_static.py``), so the report compiles exactly what is launched.

    ``histogram=False`` is the light launch; ``histogram=True, gated=True`` the full launch
    that follows it, computing only the tensors it flagged.
    """
    if gated and not histogram:
        raise ValueError("kernel_meta: a gated launch computes histograms (histogram=True)")
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    rows, lanes, vec = tile_shape(block, 1 if is_interpreted() else num_warps, dtype.itemsize)
    constants = dict(
        IN_DTYPE=_TRITON_DTYPES[dtype],
        ACC=_TRITON_DTYPES[acc],
        IS_FP64=dtype == torch.float64,
        IS_BF16=dtype == torch.bfloat16,
        ALIGNED=aligned,
        HAS_SCALE=scale,
        HISTOGRAM=histogram,
        GATED=gated,
        ROWS=rows,
        LANES=lanes,
        VEC=vec,
        CAREFUL_BLOCK=careful_block,
        FINAL_ROWS=final_rows,
        PARTIAL_HIST=PARTIAL_HIST,
        PARTIAL_WIDTH=PARTIAL_WIDTH,
        PARTIAL_COLS=triton.next_power_of_2(PARTIAL_WIDTH),
        ROW_WIDTH=layout.ROW_WIDTH,
        NUM_BINS=layout.NUM_BINS,
        MIN_EXPONENT=layout.HIST_MIN_EXPONENT,
        TINY_EXPONENT=_exponent(layout.TINY_BELOW),
        HUGE_EXPONENT=_exponent(layout.HUGE_FROM),
    )
    if is_interpreted():
        return constants, {}
    # FMA fusion (x * x + acc in one rounding) is what we want; said explicitly, as Triton's
    # default is changing.
    options = {"num_warps": num_warps, "enable_fp_fusion": True}
    if maxnreg is not None:
        options["maxnreg"] = maxnreg
    return constants, options


def launch_table(
    table: np.ndarray,
    num_tensors: int,
    dtype: torch.dtype,
    out: torch.Tensor,
    *,
    inv_scale: torch.Tensor | None = None,
    histogram: bool = True,
    block: int,
    careful_block: int,
    final_rows: int,
    num_warps: int = 4,
    maxnreg: int | None = None,
):
    """Launch the kernel over a work table from :func:`work_table` (no checks; no host sync):
    one full launch, or with ``histogram=False`` the light launch, then the gated launch
    over the same table (on the same stream, so it sees the light launch's triggers).

    Returns Triton's compiled kernel of the first launch (its ``n_regs``/``n_spills`` say what
    it used), or None when interpreted. ``maxnreg`` caps registers per thread (None: the
    compiler's choice).
    """
    device = out.device
    num_chunks = (table.size - 6 * num_tensors) // 2
    aligned = bool((table[:num_tensors] % 16 == 0).all())
    table = torch.from_numpy(table)
    if device.type == "cuda":
        table = table.pin_memory().to(device, non_blocking=True)  # pinned + async: no host sync
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    partial = torch.empty((num_chunks, PARTIAL_WIDTH), dtype=acc, device=device)  # both launches'
    return _launch_prepared(
        table,
        partial,
        num_chunks,
        num_tensors,
        aligned,
        dtype,
        out,
        inv_scale=inv_scale,
        histogram=histogram,
        block=block,
        careful_block=careful_block,
        final_rows=final_rows,
        num_warps=num_warps,
        maxnreg=maxnreg,
    )


def _launch_prepared(
    table: torch.Tensor,
    partial: torch.Tensor,
    num_chunks: int,
    num_tensors: int,
    aligned: bool,
    dtype: torch.dtype,
    out: torch.Tensor,
    *,
    inv_scale: torch.Tensor | None,
    histogram: bool,
    block: int,
    careful_block: int,
    final_rows: int,
    num_warps: int,
    maxnreg: int | None = None,
):
    """:func:`launch_table`'s launches, over a work table already on the device."""
    device = out.device
    arrival = _arrival(device, num_tensors)
    triggers = arrival if histogram else _triggers(device, num_tensors)  # any int32 pointer when unused
    passes = [(True, False)] if histogram else [(False, False), (True, True)]
    switch = device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device()
    launching = torch.cuda.device(device) if switch else contextlib.nullcontext()
    # The interpreter evaluates the fast path's float32 squares even for chunks that then take
    # the careful path; their overflow is expected and must not warn.
    quiet = np.errstate(over="ignore", invalid="ignore") if is_interpreted() else contextlib.nullcontext()
    compiled = []
    with launching, quiet:
        for full, gated in passes:
            constants, options = kernel_meta(
                dtype,
                aligned=aligned,
                scale=inv_scale is not None,
                histogram=full,
                gated=gated,
                block=block,
                careful_block=careful_block,
                final_rows=final_rows,
                num_warps=num_warps,
                maxnreg=maxnreg,
            )
            compiled.append(
                _grad_stats_kernel[(num_chunks,)](
                    table,
                    partial,
                    arrival,
                    triggers,
                    out,
                    out if inv_scale is None else inv_scale,  # any pointer when there is no scale
                    num_tensors,
                    **constants,
                    **options,
                )
            )
    return compiled[0]
