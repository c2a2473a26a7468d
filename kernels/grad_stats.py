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
def _fast_tile(
    x,
    acc_sum,
    acc_sq,
    max_bits,
    min_bits_m1,
    zero_count,
    hist,
    IS_FP64: tl.constexpr,
    NUM_BINS: tl.constexpr,
    MIN_EXPONENT: tl.constexpr,
):
    """Fold one ``[ROWS, LANES, VEC]`` tile of widened values into the fast path's per-lane
    accumulators (shape ``[LANES]``: one per thread, so the tile's rows and vector elements
    are reduced inside each thread, without barriers).

    ``min_bits_m1`` is the unsigned minimum of ``bits(|x|) - 1``: a zero wraps to the largest
    value, so it tracks the smallest non-zero magnitude in two instructions. Zeros land in
    histogram bin 0 (their exponent clamps to it) and are counted apart, so the histogram
    needs no mask; the caller takes them out of bin 0.
    """
    abits = _magnitude_bits(x, IS_FP64)
    acc_sum += tl.sum(tl.sum(x, axis=2), axis=0)
    acc_sq += tl.sum(tl.sum(x * x, axis=2), axis=0)
    max_bits = tl.maximum(max_bits, tl.max(tl.max(abits, axis=2), axis=0))
    if not IS_FP64:
        nonzero_m1 = (abits - 1).to(tl.uint32, bitcast=True)
        min_bits_m1 = tl.minimum(min_bits_m1, tl.min(tl.min(nonzero_m1, axis=2), axis=0))
    zero_count += tl.sum(tl.sum((abits == 0).to(tl.int32), axis=2), axis=0)
    bins = _histogram_bin(abits, IS_FP64, NUM_BINS, MIN_EXPONENT)
    hist += tl.histogram(tl.reshape(bins, [bins.numel]), NUM_BINS)
    return acc_sum, acc_sq, max_bits, min_bits_m1, zero_count, hist


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


@triton.jit(do_not_specialize=["num_tensors"])  # a launch of one tensor must not make it a constant
def _grad_stats_kernel(
    # pointers
    tables_ptr,  # int64: [base address | numel | out row | first chunk | chunk count | chunk size]
    #              per tensor, then [tensor index | start element] per chunk
    partial_ptr,  # ACC [num_chunks, PARTIAL_WIDTH]: per-chunk partial rows (scratch)
    arrival_ptr,  # int32 [num_tensors]: zero on entry, left zero on exit
    out_ptr,  # float64 [rows, ROW_WIDTH]: receives one row per tensor
    scale_ptr,  # float32 [1]: inv_scale every element is multiplied by (if HAS_SCALE)
    # sizes
    num_tensors,
    # meta-parameters
    IN_DTYPE: tl.constexpr,
    ACC: tl.constexpr,  # float32, or float64 for float64 inputs
    IS_FP64: tl.constexpr,
    IS_BF16: tl.constexpr,
    ALIGNED: tl.constexpr,  # all base addresses are multiples of 16 bytes
    HAS_SCALE: tl.constexpr,
    ROWS: tl.constexpr,  # fast-path tile: ROWS x LANES x VEC elements, VEC contiguous per thread
    LANES: tl.constexpr,
    VEC: tl.constexpr,
    CAREFUL_BLOCK: tl.constexpr,  # elements per careful-path step (fewer live registers)
    FINAL_ROWS: tl.constexpr,  # partial rows added per step by the finishing program
    PARTIAL_HIST: tl.constexpr,  # first histogram column of a partial row
    PARTIAL_WIDTH: tl.constexpr,
    PARTIAL_COLS: tl.constexpr,  # PARTIAL_WIDTH rounded up to a power of two
    ROW_WIDTH: tl.constexpr,
    NUM_BINS: tl.constexpr,
    MIN_EXPONENT: tl.constexpr,
):
    BLOCK: tl.constexpr = ROWS * LANES * VEC
    chunk = tl.program_id(0).to(tl.int64)
    num_chunks = tl.num_programs(0).to(tl.int64)
    n_tensors = num_tensors.to(tl.int64)
    tensor = tl.load(tables_ptr + 6 * n_tensors + chunk)
    start = tl.load(tables_ptr + 6 * n_tensors + num_chunks + chunk)
    numel = tl.load(tables_ptr + n_tensors + tensor)
    stop = tl.minimum(start + tl.load(tables_ptr + 5 * n_tensors + tensor), numel)
    base = tl.load(tables_ptr + tensor).to(tl.pointer_type(IN_DTYPE))
    if ALIGNED:  # every base address is 16-byte aligned and chunks start on a tile: wide loads
        base = tl.multiple_of(base, 16)
        start = tl.multiple_of(start, BLOCK)
    partial = partial_ptr + chunk * PARTIAL_WIDTH
    # Statistics of g * inv_scale (a GradScaler's unscaling, in float32 as it does it).
    if HAS_SCALE:
        inv_scale = tl.load(scale_ptr).to(ACC)
    else:
        inv_scale = 1.0

    # Magnitude classes (as bits). float32 squares stay normal from 2**-63 and per-lane sums
    # of squares (at most 2**13 terms per lane in a 2**20-element chunk) stay finite below
    # 2**56: the fast path's plain sums are accurate for magnitudes in [2**-63, 2**56).
    # float64 needs no classes.
    if IS_FP64:
        tiny_below = 0
        huge_from = 0x7FF0000000000000
        inf_bits = 0x7FF0000000000000
    else:
        tiny_below = 64 << 23
        huge_from = 183 << 23
        inf_bits = 0x7F800000

    # ---- fast path: plain sums; flags chunks that need the careful path -------------------
    # Whole tiles load without a mask (aligned inputs get 16-byte vector loads, ROWS of them
    # in flight per thread); the last, partial tile of a tensor loads with one.
    offsets = (
        tl.arange(0, ROWS)[:, None, None] * (LANES * VEC)
        + tl.arange(0, LANES)[None, :, None] * VEC
        + tl.arange(0, VEC)[None, None, :]
    )
    acc_sum = tl.zeros([LANES], ACC)
    acc_sq = tl.zeros([LANES], ACC)
    max_bits = _magnitude_bits(tl.zeros([LANES], ACC), IS_FP64)
    min_bits_m1 = tl.full([LANES], 0xFFFFFFFF, tl.uint32)
    zero_count = tl.zeros([LANES], tl.int32)
    hist = tl.zeros([NUM_BINS], tl.int32)
    whole_tiles = ((stop - start) // BLOCK).to(tl.int32)
    for step in range(0, whole_tiles):
        x = _widen(tl.load(base + (start + step * BLOCK + offsets)), ACC, IS_BF16) * inv_scale
        acc_sum, acc_sq, max_bits, min_bits_m1, zero_count, hist = _fast_tile(
            x, acc_sum, acc_sq, max_bits, min_bits_m1, zero_count, hist, IS_FP64, NUM_BINS, MIN_EXPONENT
        )
    tail_start = start + whole_tiles * BLOCK
    padding = 0
    if tail_start < stop:
        index = tail_start + offsets
        x = _widen(tl.load(base + index, mask=index < stop, other=0.0), ACC, IS_BF16) * inv_scale
        acc_sum, acc_sq, max_bits, min_bits_m1, zero_count, hist = _fast_tile(
            x, acc_sum, acc_sq, max_bits, min_bits_m1, zero_count, hist, IS_FP64, NUM_BINS, MIN_EXPONENT
        )
        padding = (tail_start + BLOCK - stop).to(tl.int32)  # masked lanes: zeros, in bin 0

    chunk_max_bits = tl.max(max_bits, axis=0)
    usual = chunk_max_bits < huge_from  # no huge or non-finite value
    if not IS_FP64:
        usual = usual & (tl.min(min_bits_m1, axis=0) >= (tiny_below - 1))  # no tiny non-zero value
    if usual:
        zeros_and_padding = tl.sum(zero_count, axis=0)
        hist -= tl.where(tl.arange(0, NUM_BINS) == 0, zeros_and_padding, 0)
        _store_partial(
            partial,
            tl.sum(acc_sum, axis=0),
            0.0,
            0.0,
            tl.sum(acc_sq, axis=0),
            0.0,
            0.0,
            chunk_max_bits.to(ACC, bitcast=True),
            zeros_and_padding - padding,
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
        # Tiles are folded element-wise (no barrier per step) and reduced once at the end;
        # the order is fixed, so the row is bit-identical whatever the scheduling.
        is_max = (cols == 6)[None, :]
        folded = tl.zeros([FINAL_ROWS, PARTIAL_COLS], tl.float64)
        for row0 in range(0, tensor_chunks, FINAL_ROWS):
            rows = row0 + tl.arange(0, FINAL_ROWS)
            tile = tl.load(
                partial_ptr + (first_chunk + rows)[:, None] * PARTIAL_WIDTH + cols[None, :],
                mask=(rows < tensor_chunks)[:, None] & (cols < PARTIAL_WIDTH)[None, :],
                other=0.0,
                cache_modifier=".cg",  # written by other programs: read from L2, not L1
            ).to(tl.float64)
            folded = tl.where(is_max, tl.maximum(folded, tile), folded + tile)
        sums = tl.sum(folded, axis=0)
        maxima = tl.max(folded, axis=0)
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

    VEC elements (16 bytes) are contiguous in one thread; LANES = one per thread; ROWS
    such tiles are loaded per step.
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

    One kernel launch for the 16-byte-aligned tensors and one for the others (so that one
    misaligned tensor does not cost the rest their wide loads), whatever the number of
    tensors. The caller keeps ``values`` alive until the launch has run (on CUDA, stream
    order does this for tensors it frees).

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
            two, ``chunk_numel`` (the smallest chunk) a multiple of both blocks and at most 2**20.
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
    power_of_two = (chunk_numel & (chunk_numel - 1)) == 0
    if not power_of_two or chunk_numel % block or chunk_numel % careful_block or chunk_numel > _MAX_CHUNK:
        raise ValueError(
            f"grad_stats_launch: chunk_numel={chunk_numel} must be a power of two, a multiple of both blocks, "
            f"<= {_MAX_CHUNK}"
        )
    rows = np.asarray(out_rows, dtype=np.int64)
    if rows.min() < 0 or rows.max() >= out.shape[0]:
        raise ValueError(f"grad_stats_launch: out_rows must lie in [0, {out.shape[0]})")
    addresses = np.fromiter((v.data_ptr() for v in values), dtype=np.int64, count=len(values))
    aligned = addresses % 16 == 0
    for group in (aligned, ~aligned):
        if group.any():
            launch_table(
                work_table(addresses[group], numels[group], rows[group], chunk_numel),
                int(group.sum()),
                dtype,
                out,
                inv_scale=inv_scale,
                block=block,
                careful_block=careful_block,
                final_rows=final_rows or sizes[3],
                num_warps=sizes[4],
            )


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


def launch_table(
    table: np.ndarray,
    num_tensors: int,
    dtype: torch.dtype,
    out: torch.Tensor,
    *,
    inv_scale: torch.Tensor | None = None,
    block: int,
    careful_block: int,
    final_rows: int,
    num_warps: int = 4,
    maxnreg: int | None = None,
):
    """Launch the kernel over a work table from :func:`work_table` (no checks; no host sync).

    Returns Triton's compiled kernel (its ``n_regs``/``n_spills`` say what the launch used),
    or None when interpreted. ``maxnreg`` caps registers per thread (None: the compiler's
    choice).
    """
    device = out.device
    num_chunks = (table.size - 6 * num_tensors) // 2
    aligned = bool((table[:num_tensors] % 16 == 0).all())
    table = torch.from_numpy(table)
    if device.type == "cuda":
        table = table.pin_memory().to(device, non_blocking=True)  # pinned + async: no host sync
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    partial = torch.empty((num_chunks, PARTIAL_WIDTH), dtype=acc, device=device)
    rows, lanes, vec = tile_shape(block, 1 if is_interpreted() else num_warps, dtype.itemsize)
    switch = device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device()
    launching = torch.cuda.device(device) if switch else contextlib.nullcontext()
    # The interpreter evaluates the fast path's float32 squares even for chunks that then take
    # the careful path; their overflow is expected and must not warn.
    quiet = np.errstate(over="ignore", invalid="ignore") if is_interpreted() else contextlib.nullcontext()
    # FMA fusion (x * x + acc in one rounding) is what we want; said explicitly, as Triton's
    # default is changing.
    options = {} if is_interpreted() else {"num_warps": num_warps, "enable_fp_fusion": True}
    if maxnreg is not None and not is_interpreted():
        options["maxnreg"] = maxnreg
    with launching, quiet:
        return _grad_stats_kernel[(num_chunks,)](
            table,
            partial,
            _arrival(device, num_tensors),
            out,
            out if inv_scale is None else inv_scale,  # any pointer when there is no scale
            num_tensors,
            IN_DTYPE=_TRITON_DTYPES[dtype],
            ACC=_TRITON_DTYPES[acc],
            IS_FP64=dtype == torch.float64,
            IS_BF16=dtype == torch.bfloat16,
            ALIGNED=aligned,
            HAS_SCALE=inv_scale is not None,
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
            **options,
        )
