"""Triton kernel: every gradient statistic of many tensors in one launch and one read.

One operation, one file (Liger-Kernel's rule): the ``@triton.jit`` functions, then the
launcher that checks inputs, builds the work table and launches. It is longer than other
modules (~550 lines) because the work table's layout, the partial row's layout and the
tiling constraints are written in the kernel and read by the launcher; keeping them in one
file keeps each layout next to both of its readers.

One launch serves any number of tensors sharing a device and dtype. Work is described by a
table (tensor base addresses, sizes, output rows) and split into chunks of ``chunk_numel``
elements; each program reduces one chunk to a partial row, and the last program to finish a
tensor (counted with an integer atomic, not float atomics) adds that tensor's partial rows
in chunk order and writes its final row. Output is therefore deterministic: the same input
gives bit-identical rows, whatever the scheduling.

Numerics. Elements are read once, widened to float32 (float64 inputs stay float64) and
accumulated per lane. Everything that can be computed on integers is: the maximum magnitude
compares the magnitude bits, zeros and the histogram read the exponent field, so counts,
``max_abs`` and histograms are exact whatever the denormal mode. A chunk whose values are
all in ``[2**-40, 2**40)`` or zero (the normal case) takes the fast path: plain float32
sums. A chunk holding anything else (non-finite values, or magnitudes whose float32
squares would underflow or overflow) is reduced again by a careful path that counts NaN/Inf,
and sums tiny, normal and huge magnitudes in three separately scaled accumulators, so sums
stay accurate over the whole float32 range. Chunk partials are combined in float64.

Row layout of ``out`` is ``gradscope.stats.layout`` (71 float64 columns). The final
reduction adds every column of the chunk partials except ``max_abs``, whose maximum it
takes: the combine rule ``layout.COMBINE`` declares (the kernel tests check the two agree).
Partial rows hold:

    0 sum of normal values      3 sum of squares of normal values    6 max |g|
    1 sum of tiny values*2**86  4 sum of squares of tiny*2**86       7 zeros
    2 sum of huge values/2**80  5 sum of squares of huge/2**80       8 NaNs   9 Infs
    10..73 histogram
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch
import triton
import triton.language as tl

from gradscope.stats import layout

PARTIAL_HIST = 10
PARTIAL_WIDTH = PARTIAL_HIST + layout.NUM_BINS
_MAX_CHUNK = 1 << 20  # partial counts are float32 and exact below 2**24


@triton.jit
def _magnitude_bits(x, IS_FP64: tl.constexpr):
    """Bits of ``|x|`` as a signed integer; ordered like the magnitudes for finite ``x``."""
    if IS_FP64:
        return x.to(tl.int64, bitcast=True) & 0x7FFFFFFFFFFFFFFF
    else:
        return x.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _widen(x, ACC: tl.constexpr, IS_BF16: tl.constexpr):
    """``x`` as ACC, exactly. bfloat16 is widened by moving its bits into the top half of a
    float32 (what the hardware conversion does); Triton's CPU interpreter converts bfloat16
    subnormals wrongly, and this way both give the same, exact result."""
    if IS_BF16:
        return (x.to(tl.int16, bitcast=True).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(ACC)


@triton.jit
def _histogram_bin(abits, IS_FP64: tl.constexpr, NUM_BINS: tl.constexpr, MIN_EXPONENT: tl.constexpr):
    """Bin of a magnitude from its biased exponent: ``clamp(exponent - bias + 48, 0, 63)``."""
    if IS_FP64:
        exponent = (abits >> 52).to(tl.int32) - (1023 + MIN_EXPONENT)
    else:
        exponent = (abits >> 23) - (127 + MIN_EXPONENT)
    return tl.minimum(tl.maximum(exponent, 0), NUM_BINS - 1)


@triton.jit
def _fast_step(
    x,
    acc_sum,
    acc_sq,
    max_bits,
    unusual,
    hist,
    tiny_below,
    huge_from,
    IS_FP64: tl.constexpr,
    NUM_BINS: tl.constexpr,
    MIN_EXPONENT: tl.constexpr,
):
    """Fold one block of widened values into the fast path's per-lane accumulators.

    ``unusual`` flags lanes that saw a value the fast path cannot sum exactly enough
    (tiny, huge or non-finite); zeros (masked-off lanes included) are never unusual.
    """
    abits = _magnitude_bits(x, IS_FP64)
    nonzero = abits != 0
    acc_sum += x
    acc_sq += x * x
    max_bits = tl.maximum(max_bits, abits)
    unusual |= (nonzero & ((abits < tiny_below) | (abits >= huge_from))).to(tl.int32)
    hist += tl.histogram(_histogram_bin(abits, IS_FP64, NUM_BINS, MIN_EXPONENT), NUM_BINS, mask=nonzero)
    return acc_sum, acc_sq, max_bits, unusual, hist


@triton.jit
def _store_partial(
    partial,
    sum_normal,
    sum_tiny,
    sum_huge,
    sq_normal,
    sq_tiny,
    sq_huge,
    max_abs,
    zeros,
    nans,
    infs,
    hist,
    ACC: tl.constexpr,
    PARTIAL_HIST: tl.constexpr,
    NUM_BINS: tl.constexpr,
):
    """Write one chunk's partial row (layout in the module docstring)."""
    tl.store(partial + 0, tl.cast(sum_normal, ACC))
    tl.store(partial + 1, tl.cast(sum_tiny, ACC))
    tl.store(partial + 2, tl.cast(sum_huge, ACC))
    tl.store(partial + 3, tl.cast(sq_normal, ACC))
    tl.store(partial + 4, tl.cast(sq_tiny, ACC))
    tl.store(partial + 5, tl.cast(sq_huge, ACC))
    tl.store(partial + 6, tl.cast(max_abs, ACC))
    tl.store(partial + 7, tl.cast(zeros, ACC))
    tl.store(partial + 8, tl.cast(nans, ACC))
    tl.store(partial + 9, tl.cast(infs, ACC))
    tl.store(partial + PARTIAL_HIST + tl.arange(0, NUM_BINS), hist.to(ACC))


@triton.jit
def _grad_stats_kernel(
    # pointers
    tables_ptr,  # int64: [base address | numel | out row | first chunk | chunk count] per tensor,
    #              then [tensor index | start element] per chunk
    partial_ptr,  # ACC [num_chunks, PARTIAL_WIDTH]: per-chunk partial rows (scratch)
    arrival_ptr,  # int32 [num_tensors]: zero on entry, left zero on exit
    out_ptr,  # float64 [rows, ROW_WIDTH]: receives one row per tensor
    scale_ptr,  # float32 [1]: inv_scale every element is multiplied by (if HAS_SCALE)
    # sizes
    num_tensors,
    chunk_numel,  # elements per chunk, a multiple of BLOCK
    # meta-parameters
    IN_DTYPE: tl.constexpr,
    ACC: tl.constexpr,  # float32, or float64 for float64 inputs
    IS_FP64: tl.constexpr,
    IS_BF16: tl.constexpr,
    ALIGNED: tl.constexpr,  # all base addresses are multiples of 16 bytes
    HAS_SCALE: tl.constexpr,
    BLOCK: tl.constexpr,  # elements per fast-path step
    CAREFUL_BLOCK: tl.constexpr,  # elements per careful-path step (fewer live registers)
    FINAL_ROWS: tl.constexpr,  # partial rows added per step by the finishing program
    PARTIAL_HIST: tl.constexpr,  # first histogram column of a partial row
    PARTIAL_WIDTH: tl.constexpr,
    PARTIAL_COLS: tl.constexpr,  # PARTIAL_WIDTH rounded up to a power of two
    ROW_WIDTH: tl.constexpr,
    NUM_BINS: tl.constexpr,
    MIN_EXPONENT: tl.constexpr,
):
    chunk = tl.program_id(0).to(tl.int64)
    num_chunks = tl.num_programs(0).to(tl.int64)
    n_tensors = num_tensors.to(tl.int64)
    tensor = tl.load(tables_ptr + 5 * n_tensors + chunk)
    start = tl.load(tables_ptr + 5 * n_tensors + num_chunks + chunk)
    numel = tl.load(tables_ptr + n_tensors + tensor)
    stop = tl.minimum(start + chunk_numel, numel)
    base = tl.load(tables_ptr + tensor).to(tl.pointer_type(IN_DTYPE))
    if ALIGNED:  # every base address is 16-byte aligned and chunks start on a block: wide loads
        base = tl.multiple_of(base, 16)
        start = tl.multiple_of(start, BLOCK)
    partial = partial_ptr + chunk * PARTIAL_WIDTH
    # Statistics of g * inv_scale (a GradScaler's unscaling, in float32 as it does it).
    if HAS_SCALE:
        inv_scale = tl.load(scale_ptr).to(ACC)
    else:
        inv_scale = 1.0

    # Magnitude classes (as bits): tiny below 2**-40, huge from 2**40; none for float64.
    if IS_FP64:
        tiny_below = 0
        huge_from = 0x7FF0000000000000
        inf_bits = 0x7FF0000000000000
    else:
        tiny_below = 87 << 23
        huge_from = 167 << 23
        inf_bits = 0x7F800000

    # ---- fast path: plain sums; flags chunks that need the careful path -------------------
    # Whole blocks load without a mask (so aligned inputs get wide vector loads); the last,
    # partial block of a tensor loads with one.
    lanes = tl.arange(0, BLOCK)
    acc_sum = tl.zeros([BLOCK], ACC)
    acc_sq = tl.zeros([BLOCK], ACC)
    max_bits = _magnitude_bits(tl.zeros([BLOCK], ACC), IS_FP64)
    unusual = tl.zeros([BLOCK], tl.int32)
    hist = tl.zeros([NUM_BINS], tl.int32)
    whole_blocks = ((stop - start) // BLOCK).to(tl.int32)
    for step in range(0, whole_blocks):
        x = _widen(tl.load(base + (start + step * BLOCK + lanes)), ACC, IS_BF16) * inv_scale
        acc_sum, acc_sq, max_bits, unusual, hist = _fast_step(
            x, acc_sum, acc_sq, max_bits, unusual, hist, tiny_below, huge_from, IS_FP64, NUM_BINS, MIN_EXPONENT
        )
    index = start + whole_blocks * BLOCK + lanes
    x = _widen(tl.load(base + index, mask=index < stop, other=0.0), ACC, IS_BF16) * inv_scale
    acc_sum, acc_sq, max_bits, unusual, hist = _fast_step(
        x, acc_sum, acc_sq, max_bits, unusual, hist, tiny_below, huge_from, IS_FP64, NUM_BINS, MIN_EXPONENT
    )

    if tl.max(unusual, axis=0) == 0:
        # No NaN/Inf here, so every element is either a zero or in the histogram.
        _store_partial(
            partial,
            tl.sum(acc_sum, axis=0),
            0.0,
            0.0,
            tl.sum(acc_sq, axis=0),
            0.0,
            0.0,
            tl.max(max_bits, axis=0).to(ACC, bitcast=True),
            (stop - start) - tl.sum(hist, axis=0),
            0,
            0,
            hist,
            ACC,
            PARTIAL_HIST,
            NUM_BINS,
        )
    else:
        # ---- careful path: count NaN/Inf, sum tiny/normal/huge magnitudes apart ---------
        careful_lanes = tl.arange(0, CAREFUL_BLOCK)
        sum_normal = tl.zeros([CAREFUL_BLOCK], ACC)
        sum_tiny = tl.zeros([CAREFUL_BLOCK], ACC)
        sum_huge = tl.zeros([CAREFUL_BLOCK], ACC)
        sq_normal = tl.zeros([CAREFUL_BLOCK], ACC)
        sq_tiny = tl.zeros([CAREFUL_BLOCK], ACC)
        sq_huge = tl.zeros([CAREFUL_BLOCK], ACC)
        finite_max_bits = _magnitude_bits(tl.zeros([CAREFUL_BLOCK], ACC), IS_FP64)
        zeros = tl.zeros([CAREFUL_BLOCK], tl.int32)
        nans = tl.zeros([CAREFUL_BLOCK], tl.int32)
        infs = tl.zeros([CAREFUL_BLOCK], tl.int32)
        careful_hist = tl.zeros([NUM_BINS], tl.int32)
        for step in range(0, tl.cdiv(stop - start, CAREFUL_BLOCK).to(tl.int32)):
            careful_index = start + step * CAREFUL_BLOCK + careful_lanes
            in_range = careful_index < stop
            y = _widen(tl.load(base + careful_index, mask=in_range, other=0.0), ACC, IS_BF16) * inv_scale
            ybits = _magnitude_bits(y, IS_FP64)
            finite = ybits < inf_bits
            y_nonzero = ybits != 0
            tiny = y_nonzero & (ybits < tiny_below)
            huge = finite & (ybits >= huge_from)
            finite_y = tl.where(finite, y, 0.0)
            normal_y = tl.where(tiny | huge, 0.0, finite_y)
            if IS_FP64:
                tiny_y = tl.zeros([CAREFUL_BLOCK], ACC)
            else:
                # y * 2**86, computed from the bits for subnormals so that it is exact even
                # where denormal inputs are flushed to zero.
                subnormal_y = (ybits & 0x7FFFFF).to(tl.float32) * 1.0842021724855044e-19  # 2**-63
                subnormal_y = tl.where(y.to(tl.int32, bitcast=True) < 0, -subnormal_y, subnormal_y)
                tiny_y = tl.where(ybits < (1 << 23), subnormal_y, y * 7.737125245533627e25)  # 2**86
                tiny_y = tl.where(tiny, tiny_y, 0.0)
            huge_y = tl.where(huge, finite_y * 8.271806125530277e-25, 0.0)  # 2**-80
            sum_normal += normal_y
            sum_tiny += tiny_y
            sum_huge += huge_y
            sq_normal += normal_y * normal_y
            sq_tiny += tiny_y * tiny_y
            sq_huge += huge_y * huge_y
            finite_max_bits = tl.maximum(finite_max_bits, tl.where(finite, ybits, 0))
            zeros += (in_range & (ybits == 0)).to(tl.int32)
            nans += (ybits > inf_bits).to(tl.int32)
            infs += (ybits == inf_bits).to(tl.int32)
            careful_hist += tl.histogram(
                _histogram_bin(ybits, IS_FP64, NUM_BINS, MIN_EXPONENT), NUM_BINS, mask=finite & y_nonzero
            )
        _store_partial(
            partial,
            tl.sum(sum_normal, axis=0),
            tl.sum(sum_tiny, axis=0),
            tl.sum(sum_huge, axis=0),
            tl.sum(sq_normal, axis=0),
            tl.sum(sq_tiny, axis=0),
            tl.sum(sq_huge, axis=0),
            tl.max(finite_max_bits, axis=0).to(ACC, bitcast=True),
            tl.sum(zeros, axis=0),
            tl.sum(nans, axis=0),
            tl.sum(infs, axis=0),
            careful_hist,
            ACC,
            PARTIAL_HIST,
            NUM_BINS,
        )

    # ---- the last program of a tensor adds its partial rows, in chunk order ---------------
    tl.debug_barrier()  # every thread's partial stores precede the release below
    arrived = tl.atomic_add(arrival_ptr + tensor, 1, sem="acq_rel")
    tensor_chunks = tl.load(tables_ptr + 4 * n_tensors + tensor)
    if arrived == tensor_chunks - 1:
        first_chunk = tl.load(tables_ptr + 3 * n_tensors + tensor)
        cols = tl.arange(0, PARTIAL_COLS)
        sums = tl.zeros([PARTIAL_COLS], tl.float64)
        maxima = tl.zeros([PARTIAL_COLS], tl.float64)
        for row0 in range(0, tensor_chunks, FINAL_ROWS):
            rows = row0 + tl.arange(0, FINAL_ROWS)
            tile = tl.load(
                partial_ptr + (first_chunk + rows)[:, None] * PARTIAL_WIDTH + cols[None, :],
                mask=(rows < tensor_chunks)[:, None] & (cols < PARTIAL_WIDTH)[None, :],
                other=0.0,
                cache_modifier=".cg",  # written by other programs: read from L2, not L1
            ).to(tl.float64)
            sums += tl.sum(tile, axis=0)
            maxima = tl.maximum(maxima, tl.max(tile, axis=0))
        total = (
            tl.sum(tl.where(cols == 0, sums, 0.0), axis=0)
            + tl.sum(tl.where(cols == 1, sums, 0.0), axis=0) * 1.2924697071141057e-26  # 2**-86
            + tl.sum(tl.where(cols == 2, sums, 0.0), axis=0) * 1.2089258196146292e24  # 2**80
        )
        total_sq = (
            tl.sum(tl.where(cols == 3, sums, 0.0), axis=0)
            + tl.sum(tl.where(cols == 4, sums, 0.0), axis=0) * 1.2924697071141057e-26 * 1.2924697071141057e-26
            + tl.sum(tl.where(cols == 5, sums, 0.0), axis=0) * 1.2089258196146292e24 * 1.2089258196146292e24
        )
        out_row = out_ptr + tl.load(tables_ptr + 2 * n_tensors + tensor) * ROW_WIDTH
        tl.store(out_row + 0, numel.to(tl.float64))
        tl.store(out_row + 1, total)
        tl.store(out_row + 2, total_sq)
        tl.store(out_row + 3, tl.sum(tl.where(cols == 6, maxima, 0.0), axis=0))
        tl.store(out_row + 4, tl.sum(tl.where(cols == 7, sums, 0.0), axis=0))
        tl.store(out_row + 5, tl.sum(tl.where(cols == 8, sums, 0.0), axis=0))
        tl.store(out_row + 6, tl.sum(tl.where(cols == 9, sums, 0.0), axis=0))
        is_hist = (cols >= PARTIAL_HIST) & (cols < PARTIAL_HIST + NUM_BINS)
        tl.store(out_row + (ROW_WIDTH - NUM_BINS - PARTIAL_HIST) + cols, sums, mask=is_hist)
        tl.store(arrival_ptr + tensor, 0)  # ready for the next launch on this stream


# --------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------

_TRITON_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}

_arrival_counters: dict[tuple[int, int], torch.Tensor] = {}


def is_interpreted() -> bool:
    """True when the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import).

    Interpreted kernels read CPU tensors; compiled kernels read CUDA tensors.
    """
    return not isinstance(_grad_stats_kernel, triton.runtime.JITFunction)


def _arrival(device: torch.device, count: int) -> torch.Tensor:
    """Zeroed int32 counters for one launch; the kernel leaves them zeroed again.

    On CUDA they are reused per (device, stream): launches on one stream run in order.
    """
    if device.type != "cuda":
        return torch.zeros(count, dtype=torch.int32, device=device)
    key = (device.index, torch.cuda.current_stream(device).cuda_stream)
    counters = _arrival_counters.get(key)
    if counters is None or counters.numel() < count:
        counters = torch.zeros(max(count, 1024), dtype=torch.int32, device=device)
        _arrival_counters[key] = counters
    return counters


def _launch_sizes(dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """(block, careful block, chunk elements, final rows, warps) for one launch.

    The chunk size is fixed, not derived from the launch's total size, so that a tensor's
    row is bit-identical whichever other tensors share its launch (the monitor launches per
    bucket of gradients in backward mode and all at once in step mode). 2**16 elements per
    program keeps every SM busy from about 10M elements on an H100.

    Compiled sizes keep the kernel within 64 registers per thread on sm_90 (cuobjdump with
    Triton 3.9: 59-61 for 16/32-bit inputs, 52 for float64), so four 8-warp programs fit on
    each SM.
    """
    if is_interpreted():
        return 1024, 256, 1 << 12, 8, 1
    block, careful_block = (1024, 256) if dtype == torch.float64 else (2048, 512)
    return block, careful_block, 1 << 16, 16, 8


def grad_stats_launch(
    values: Sequence[torch.Tensor],
    out: torch.Tensor,
    out_rows: Sequence[int],
    *,
    inv_scale: torch.Tensor | None = None,
    block: int | None = None,
    careful_block: int | None = None,
    chunk_numel: int | None = None,
    final_rows: int | None = None,
) -> None:
    """Write the statistics rows of ``values`` into ``out[out_rows]``, without host synchronisation.

    One kernel launch whatever the number of tensors. The caller keeps ``values`` alive
    until the launch has run (on CUDA, stream order does this for tensors it frees).

    Args:
        values: 1-D contiguous tensors sharing one device and one dtype (float16, bfloat16,
            float32 or float64): CUDA tensors for compiled kernels, CPU tensors when
            interpreted (:func:`is_interpreted`). Empty tensors get a row of zeros.
        out: float64 ``(R, ROW_WIDTH)`` contiguous tensor on the same device.
        out_rows: for each tensor, the row of ``out`` it writes (distinct).
        inv_scale: optional float32 one-element tensor on the same device; statistics are
            then those of ``g * inv_scale`` (multiplied in float32, as ``GradScaler.unscale_``
            does), read by the kernel so that no host synchronisation is needed.
        block, careful_block, chunk_numel, final_rows: override the tiling (tests); powers of
            two, ``chunk_numel`` a multiple of both blocks and at most 2**20.
    """
    if not values:
        return
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

    numels = np.fromiter((v.numel() for v in values), dtype=np.int64, count=len(values))
    sizes = _launch_sizes(dtype)
    block = block or sizes[0]
    careful_block = careful_block or sizes[1]
    chunk_numel = chunk_numel or max(sizes[2], block, careful_block)
    if chunk_numel % block or chunk_numel % careful_block or chunk_numel > _MAX_CHUNK:
        raise ValueError(
            f"grad_stats_launch: chunk_numel={chunk_numel} must be a multiple of both blocks, <= {_MAX_CHUNK}"
        )
    rows = np.asarray(out_rows, dtype=np.int64)
    if rows.min() < 0 or rows.max() >= out.shape[0]:
        raise ValueError(f"grad_stats_launch: out_rows must lie in [0, {out.shape[0]})")
    addresses = np.fromiter((v.data_ptr() for v in values), dtype=np.int64, count=len(values))
    table = work_table(addresses, numels, rows, chunk_numel)
    launch_table(
        table,
        len(values),
        dtype,
        out,
        inv_scale=inv_scale,
        chunk_numel=chunk_numel,
        block=block,
        careful_block=careful_block,
        final_rows=final_rows or sizes[3],
        num_warps=sizes[4],
    )


def work_table(addresses: np.ndarray, numels: np.ndarray, out_rows: np.ndarray, chunk_numel: int) -> np.ndarray:
    """The kernel's int64 work table (layout in ``_grad_stats_kernel``); every tensor gets a chunk.

    Args:
        addresses: int64 ``(T,)`` address of each tensor's first element.
        numels: int64 ``(T,)`` elements per tensor.
        out_rows: int64 ``(T,)`` output row per tensor.
        chunk_numel: elements per chunk.
    """
    count = numels.size
    chunks = np.maximum(1, -(-numels // chunk_numel))
    first_chunk = np.zeros(count, dtype=np.int64)
    np.cumsum(chunks[:-1], out=first_chunk[1:])
    chunk_tensor = np.repeat(np.arange(count, dtype=np.int64), chunks)
    chunk_start = (np.arange(chunk_tensor.size, dtype=np.int64) - first_chunk[chunk_tensor]) * chunk_numel
    return np.concatenate([addresses, numels, out_rows, first_chunk, chunks, chunk_tensor, chunk_start])


def launch_table(
    table: np.ndarray,
    num_tensors: int,
    dtype: torch.dtype,
    out: torch.Tensor,
    *,
    inv_scale: torch.Tensor | None = None,
    chunk_numel: int,
    block: int,
    careful_block: int,
    final_rows: int,
    num_warps: int = 8,
) -> None:
    """Launch the kernel over a work table from :func:`work_table` (no checks; no host sync)."""
    device = out.device
    num_chunks = (table.size - 5 * num_tensors) // 2
    aligned = bool((table[:num_tensors] % 16 == 0).all())
    table = torch.from_numpy(table)
    if device.type == "cuda":
        table = table.pin_memory().to(device, non_blocking=True)  # pinned + async: no host sync
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    partial = torch.empty((num_chunks, PARTIAL_WIDTH), dtype=acc, device=device)
    launching = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    # The interpreter evaluates the fast path's float32 squares even for chunks that then take
    # the careful path; their overflow is expected and must not warn.
    quiet = np.errstate(over="ignore", invalid="ignore") if is_interpreted() else contextlib.nullcontext()
    # FMA fusion (x * x + acc in one rounding) is what we want; said explicitly, as Triton's
    # default is changing.
    options = {} if is_interpreted() else {"num_warps": num_warps, "enable_fp_fusion": True}
    with launching, quiet:
        _grad_stats_kernel[(num_chunks,)](
            table,
            partial,
            _arrival(device, num_tensors),
            out,
            out if inv_scale is None else inv_scale,  # any pointer when there is no scale
            num_tensors,
            chunk_numel,
            IN_DTYPE=_TRITON_DTYPES[dtype],
            ACC=_TRITON_DTYPES[acc],
            IS_FP64=dtype == torch.float64,
            IS_BF16=dtype == torch.bfloat16,
            ALIGNED=aligned,
            HAS_SCALE=inv_scale is not None,
            BLOCK=block,
            CAREFUL_BLOCK=careful_block,
            FINAL_ROWS=final_rows,
            PARTIAL_HIST=PARTIAL_HIST,
            PARTIAL_WIDTH=PARTIAL_WIDTH,
            PARTIAL_COLS=triton.next_power_of_2(PARTIAL_WIDTH),
            ROW_WIDTH=layout.ROW_WIDTH,
            NUM_BINS=layout.NUM_BINS,
            MIN_EXPONENT=layout.HIST_MIN_EXPONENT,
            **options,
        )
