"""Triton kernel: every gradient statistic of many tensors in one launch and one read.

The ``@triton.jit`` functions; ``launch.py`` beside it checks inputs, builds the work table
and launches (the layouts below are written here and read there).

One launch serves any number of tensors sharing a device and dtype. Work is described by a
table (tensor base addresses, sizes, output rows, chunk sizes) and each tensor is split into
chunks whose size depends on its own size only (``launch.chunk_sizes``); each program
reduces one chunk to a partial row, and the last program to finish a
tensor (counted with an integer atomic, not float atomics) adds that tensor's partial rows
in chunk order and writes its final row. Output is therefore deterministic: the same input
gives bit-identical rows, whatever the scheduling.

Three launches, one source (constexpr ``HISTOGRAM``, ``GATED``):

* **full** (``HISTOGRAM``): every column of every tensor's row, histogram included.
* **light** (not ``HISTOGRAM``): the same reads and the same code for every other column
  (so they are bit-identical to the full launch's), no histogram anywhere: each tensor's
  row gets NaN (``layout.NO_HISTOGRAM``) in its 64 histogram columns. Every program whose
  chunk *triggers* the histogram (``layout.triggers_histogram``: NaN/Inf, a non-zero
  ``|g| < 2**-63`` or a finite ``|g| >= 2**56``, after unscaling) stores 1 into
  ``trigger_ptr[tensor]``. For 16/32-bit inputs these are exactly the chunks that take the
  careful path below; float64 tracks its smallest magnitude for it.
* **gated** (``HISTOGRAM`` and ``GATED``), launched right after a light launch on the same
  stream over the same work table: a program whose tensor's trigger is 0 returns at once;
  the tensors that trigger are computed in full and their rows overwritten, and each
  finishing program resets its tensor's trigger to 0 (the buffer is left zeroed, like the
  arrival counters).

Numerics. Elements are read once, widened to float32 (float64 inputs stay float64) and
accumulated per thread over ``[ROWS, LANES, VEC]`` tiles (per lane, ROWS times VEC
elements: VEC contiguous ones = one 16-byte load when aligned, every LANES-th otherwise,
:func:`_tile_offsets`). Everything that can be computed on integers is: the maximum magnitude
compares the magnitude bits, zeros and the histogram read the exponent field, so counts,
``max_abs`` and histograms are exact whatever the denormal mode. A chunk whose non-zero
magnitudes all lie in ``[2**-63, 2**56)`` (the normal case; float32 squares stay normal and
per-lane sums finite there) takes the fast path: plain float32 sums. A chunk holding
anything else (non-finite values, or magnitudes whose float32 squares would underflow or
overflow) is reduced again by a careful path that counts NaN/Inf,
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
def _tile_offsets(ALIGNED: tl.constexpr, ROWS: tl.constexpr, LANES: tl.constexpr, VEC: tl.constexpr):
    """Element offsets of one fast-path tile (2-D, ``ROWS * LANES * VEC`` elements), such that
    :func:`_lane_tile` gives lane ``l`` (one thread) ``ROWS * VEC`` of them.

    Aligned: ``[ROWS * LANES, VEC]``, lane ``l`` reads VEC contiguous elements (one 16-byte
    load) from each of ROWS rows. Otherwise ``[ROWS * VEC, LANES]``, lane ``l`` reads every
    LANES-th element: scalar loads that neighbouring lanes coalesce. Either way the only
    axis the compiler may spread over threads is the one it must (a 3-D tile leaves two
    equally non-contiguous axes, and Triton 3.6 spreads threads over the wrong one, so each
    step's per-lane reduction would need warp shuffles).
    """
    if ALIGNED:
        return tl.arange(0, ROWS * LANES)[:, None] * VEC + tl.arange(0, VEC)[None, :]
    else:
        return tl.arange(0, ROWS * VEC)[:, None] * LANES + tl.arange(0, LANES)[None, :]


@triton.jit
def _lane_tile(x, ALIGNED: tl.constexpr, ROWS: tl.constexpr, LANES: tl.constexpr, VEC: tl.constexpr):
    """A tile loaded at :func:`_tile_offsets` as ``[ROWS, LANES, VEC]``, lanes on axis 1 (no
    data moves: each thread keeps what it loaded)."""
    if ALIGNED:
        return tl.reshape(x, [ROWS, LANES, VEC])
    else:
        return tl.permute(tl.reshape(x, [ROWS, VEC, LANES]), (0, 2, 1))


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
    TRACK_MIN: tl.constexpr,
    HISTOGRAM: tl.constexpr,
    NUM_BINS: tl.constexpr,
    MIN_EXPONENT: tl.constexpr,
):
    """Fold one ``[ROWS, LANES, VEC]`` tile of widened values into the fast path's per-lane
    accumulators (shape ``[LANES]``: one per thread, so the tile's rows and vector elements
    are reduced inside each thread, without barriers).

    ``min_bits_m1`` is the unsigned minimum of ``bits(|x|) - 1`` (if TRACK_MIN): a zero
    wraps to the largest value, so it tracks the smallest non-zero magnitude in two
    instructions. Zeros land in histogram bin 0 (their exponent clamps to it) and are
    counted apart, so the histogram (if HISTOGRAM) needs no mask; the caller takes them out
    of bin 0.
    """
    abits = _magnitude_bits(x, IS_FP64)
    acc_sum += tl.sum(tl.sum(x, axis=2), axis=0)
    acc_sq += tl.sum(tl.sum(x * x, axis=2), axis=0)
    max_bits = tl.maximum(max_bits, tl.max(tl.max(abits, axis=2), axis=0))
    if TRACK_MIN:
        if IS_FP64:
            nonzero_m1 = (abits - 1).to(tl.uint64, bitcast=True)
        else:
            nonzero_m1 = (abits - 1).to(tl.uint32, bitcast=True)
        min_bits_m1 = tl.minimum(min_bits_m1, tl.min(tl.min(nonzero_m1, axis=2), axis=0))
    zero_count += tl.sum(tl.sum((abits == 0).to(tl.int32), axis=2), axis=0)
    if HISTOGRAM:
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
    HISTOGRAM: tl.constexpr,
    PARTIAL_HIST: tl.constexpr,
    NUM_BINS: tl.constexpr,
):
    """Write one chunk's partial row (layout in the module docstring; without HISTOGRAM,
    its first PARTIAL_HIST columns only)."""
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
    if HISTOGRAM:
        tl.store(partial + PARTIAL_HIST + tl.arange(0, NUM_BINS), hist.to(ACC))


@triton.jit(do_not_specialize=["num_tensors"])  # a launch of one tensor must not make it a constant
def _grad_stats_kernel(
    # pointers
    tables_ptr,  # int64: [base address | numel | out row | first chunk | chunk count | chunk size]
    #              per tensor, then [tensor index | start element] per chunk
    partial_ptr,  # ACC [num_chunks, PARTIAL_WIDTH]: per-chunk partial rows (scratch)
    arrival_ptr,  # int32 [num_tensors]: zero on entry, left zero on exit
    trigger_ptr,  # int32 [num_tensors]: the light launch sets 1 where a tensor triggers its
    #               histogram; the gated launch reads it and leaves it zero (unused otherwise)
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
    HISTOGRAM: tl.constexpr,  # False: the light launch (histogram columns NaN, triggers set)
    GATED: tl.constexpr,  # only tensors whose trigger is set (after a light launch)
    ROWS: tl.constexpr,  # fast-path tile: ROWS x LANES x VEC elements, ROWS x VEC per thread
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
    TINY_EXPONENT: tl.constexpr,  # layout.TINY_BELOW == 2**TINY_EXPONENT
    HUGE_EXPONENT: tl.constexpr,  # layout.HUGE_FROM == 2**HUGE_EXPONENT
):
    BLOCK: tl.constexpr = ROWS * LANES * VEC
    chunk = tl.program_id(0).to(tl.int64)
    num_chunks = tl.num_programs(0).to(tl.int64)
    n_tensors = num_tensors.to(tl.int64)
    tensor = tl.load(tables_ptr + 6 * n_tensors + chunk)
    if GATED:
        if tl.load(trigger_ptr + tensor) == 0:
            return  # the light launch's row stands: its histogram is not wanted
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

    # Magnitude classes (as bits). float32 squares stay normal from 2**-63 (TINY_EXPONENT)
    # and per-lane sums of squares (at most 2**13 terms per lane in a 2**20-element chunk)
    # stay finite below 2**56 (HUGE_EXPONENT): the fast path's plain sums are accurate for
    # magnitudes in [2**-63, 2**56), and the careful path's scalings (2**86, 2**-80) are
    # built for these two edges. float64 needs no classes, but its light launch triggers at
    # the same edges, so it tracks the smallest magnitude too.
    if IS_FP64:
        tiny_below = 0
        huge_from = 0x7FF0000000000000
        inf_bits = 0x7FF0000000000000
        trigger_tiny = (1023 + TINY_EXPONENT) << 52
        trigger_huge = (1023 + HUGE_EXPONENT) << 52
    else:
        tiny_below = (127 + TINY_EXPONENT) << 23
        huge_from = (127 + HUGE_EXPONENT) << 23
        inf_bits = 0x7F800000
        trigger_tiny = tiny_below
        trigger_huge = huge_from
    TRACK_MIN: tl.constexpr = not IS_FP64 or not HISTOGRAM

    # ---- fast path: plain sums; flags chunks that need the careful path -------------------
    # Whole tiles load without a mask (aligned inputs get 16-byte vector loads, ROWS of them
    # in flight per thread); the last, partial tile of a tensor loads with one.
    offsets = _tile_offsets(ALIGNED, ROWS, LANES, VEC)
    acc_sum = tl.zeros([LANES], ACC)
    acc_sq = tl.zeros([LANES], ACC)
    max_bits = _magnitude_bits(tl.zeros([LANES], ACC), IS_FP64)
    if IS_FP64:
        min_bits_m1 = tl.full([LANES], 0xFFFFFFFFFFFFFFFF, tl.uint64)
    else:
        min_bits_m1 = tl.full([LANES], 0xFFFFFFFF, tl.uint32)
    zero_count = tl.zeros([LANES], tl.int32)
    hist = tl.zeros([NUM_BINS], tl.int32)
    whole_tiles = ((stop - start) // BLOCK).to(tl.int32)
    for step in range(0, whole_tiles):
        x = _widen(tl.load(base + (start + step * BLOCK + offsets)), ACC, IS_BF16) * inv_scale
        x = _lane_tile(x, ALIGNED, ROWS, LANES, VEC)
        acc_sum, acc_sq, max_bits, min_bits_m1, zero_count, hist = _fast_tile(
            x,
            acc_sum,
            acc_sq,
            max_bits,
            min_bits_m1,
            zero_count,
            hist,
            IS_FP64,
            TRACK_MIN,
            HISTOGRAM,
            NUM_BINS,
            MIN_EXPONENT,
        )
    tail_start = start + whole_tiles * BLOCK
    padding = 0
    if tail_start < stop:
        index = tail_start + offsets
        x = _widen(tl.load(base + index, mask=index < stop, other=0.0), ACC, IS_BF16) * inv_scale
        x = _lane_tile(x, ALIGNED, ROWS, LANES, VEC)
        acc_sum, acc_sq, max_bits, min_bits_m1, zero_count, hist = _fast_tile(
            x,
            acc_sum,
            acc_sq,
            max_bits,
            min_bits_m1,
            zero_count,
            hist,
            IS_FP64,
            TRACK_MIN,
            HISTOGRAM,
            NUM_BINS,
            MIN_EXPONENT,
        )
        padding = (tail_start + BLOCK - stop).to(tl.int32)  # masked lanes: zeros, in bin 0

    chunk_max_bits = tl.max(max_bits, axis=0)
    usual = chunk_max_bits < huge_from  # no huge or non-finite value
    if not IS_FP64:
        usual = usual & (tl.min(min_bits_m1, axis=0) >= (tiny_below - 1))  # no tiny non-zero value
    if not HISTOGRAM:
        # The histogram trigger (layout.triggers_histogram): NaN/Inf, tiny or huge magnitudes.
        # For 16/32-bit inputs exactly the chunks that take the careful path.
        if IS_FP64:
            triggers = (chunk_max_bits >= trigger_huge) | (tl.min(min_bits_m1, axis=0) < (trigger_tiny - 1))
        else:
            triggers = ~usual
        if triggers:
            tl.store(trigger_ptr + tensor, 1)  # every triggering chunk stores the same 1
    if usual:
        zeros_and_padding = tl.sum(zero_count, axis=0)
        if HISTOGRAM:
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
            HISTOGRAM,
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
            if HISTOGRAM:
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
            HISTOGRAM,
            PARTIAL_HIST,
            NUM_BINS,
        )

    # ---- the last program of a tensor adds its partial rows, in chunk order ---------------
    tl.debug_barrier()  # every thread's partial stores precede the release below
    arrived = tl.atomic_add(arrival_ptr + tensor, 1, sem="acq_rel")
    tensor_chunks = tl.load(tables_ptr + 4 * n_tensors + tensor).to(tl.int32)  # 512, or numel / 2**20
    if arrived == tensor_chunks - 1:
        tensor_partials = partial_ptr + tl.load(tables_ptr + 3 * n_tensors + tensor) * PARTIAL_WIDTH
        cols = tl.arange(0, PARTIAL_COLS)
        # Without HISTOGRAM only the scalar columns are read (the tile keeps its shape, so the
        # scalars are added in the same order, bit for bit, as with it).
        if HISTOGRAM:
            read_cols = PARTIAL_WIDTH
        else:
            read_cols = PARTIAL_HIST
        # Tiles are folded element-wise (no barrier per step) and reduced once at the end;
        # the order is fixed, so the row is bit-identical whatever the scheduling.
        is_max = (cols == 6)[None, :]
        folded = tl.zeros([FINAL_ROWS, PARTIAL_COLS], tl.float64)
        for row0 in range(0, tensor_chunks, FINAL_ROWS):
            rows = row0 + tl.arange(0, FINAL_ROWS)
            tile = tl.load(
                tensor_partials + (rows[:, None] * PARTIAL_WIDTH + cols[None, :]),  # int32 offsets
                mask=(rows < tensor_chunks)[:, None] & (cols < read_cols)[None, :],
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
        if HISTOGRAM:
            is_hist = (cols >= PARTIAL_HIST) & (cols < PARTIAL_HIST + NUM_BINS)
            tl.store(out_row + (ROW_WIDTH - NUM_BINS - PARTIAL_HIST) + cols, sums, mask=is_hist)
        else:  # layout.NO_HISTOGRAM: a quiet NaN in every histogram column
            no_histogram = tl.full([NUM_BINS], 0x7FF8000000000000, tl.int64).to(tl.float64, bitcast=True)
            tl.store(out_row + (ROW_WIDTH - NUM_BINS) + tl.arange(0, NUM_BINS), no_histogram)
        if GATED:
            tl.store(trigger_ptr + tensor, 0)  # left zero, like the arrival counter
        tl.store(arrival_ptr + tensor, 0)  # ready for the next launch on this stream
