"""Every compiled loop of the numba CPU kernels, for full rows and for light rows (numba).

:mod:`gradscope.stats.numba_kernels` (full rows) and :mod:`gradscope.stats.numba_light_kernels`
(light rows: no histogram) call the two drivers here, :func:`runs` and :func:`light_runs`,
which cut a run of elements into the same blocks and sum each block with the same loops, so
a light row's sums equal the full row's bit for bit. The kernels' modules say what each
loop computes and why.

All compiled code lives in this one module on purpose: numba's on-disk cache of a function
is invalidated only by a change to the function's own file, so a caller in another file
would keep running a stale copy of a loop changed here.

Importing this module needs numba; functions compile on first call (then cached on disk).
"""

from __future__ import annotations

import numpy as np
from numba import carray, njit, types
from numba.extending import intrinsic, overload

from gradscope.stats import layout

BLOCK = 1 << 16
"""Elements reduced per pass over cache (256 KiB of float32)."""

SMALL = 1024
"""Blocks shorter than this count their exponents into one table (nothing to interleave)."""

_N, _SUM, _SUMSQ, _MAX, _ZEROS, _NANS, _INFS, _HIST = (
    layout.NUMEL,
    layout.SUM,
    layout.SUMSQ,
    layout.MAX_ABS,
    layout.ZEROS,
    layout.NANS,
    layout.INFS,
    layout.HIST,
)
_LAST_BIN = layout.NUM_BINS - 1

# float32: 8-bit exponent field, bias 127
_E32 = 256
_S32 = np.uint32(23)
_M32 = np.uint32(0xFF)
_ABS32 = np.uint32(0x7FFFFFFF)
_INF32 = np.uint32(0x7F800000)
_BIN0_32 = 127 + layout.HIST_MIN_EXPONENT  # biased exponent of bin 0 (79)
_LO, _HI, _M = np.uint64(23), np.uint64(55), np.uint64(0xFF)  # the two float32 exponents of a 64-bit word
_T1, _T2, _T3, _T4, _T5, _T6, _T7 = (np.uint64(_E32 * way) for way in range(1, 8))

# float64: 11-bit exponent field, bias 1023
_E64 = 2048
_S64 = np.uint64(52)
_M64 = np.uint64(0x7FF)
_ABS64 = np.uint64(0x7FFFFFFFFFFFFFFF)
_INF64 = np.uint64(0x7FF0000000000000)
_BIN0_64 = 1023 + layout.HIST_MIN_EXPONENT  # 975
_W64 = np.uint64(_E64)

_ONE32 = np.uint32(1)
_ABS64_SIGNED = np.int64(0x7FFFFFFFFFFFFFFF)  # light rows read float64 bits as int64
_INF64_SIGNED = np.int64(0x7FF0000000000000)

_FAST = {"reassoc", "contract", "nsz"}  # reassociation lets the sums vectorise; NaN/Inf never reach them

FORMATS = {
    # dtype: (its bits' dtype, exponent values, interleaved tables, (|x| mask, Inf's bits, bin 0's exponent))
    np.dtype(np.float32): (np.uint32, _E32, 8, (_ABS32, _INF32, _BIN0_32)),
    np.dtype(np.float64): (np.uint64, _E64, 4, (_ABS64, _INF64, _BIN0_64)),
}
"""What :func:`runs` needs to know of each element format."""

LIGHT_FORMATS = {
    # dtype: (its bits' dtype, (|x| mask, Inf's bits)); float64 bits as int64, whose min/max vectorise
    np.dtype(np.float32): (np.uint32, (_ABS32, _INF32)),
    np.dtype(np.float64): (np.int64, (_ABS64_SIGNED, _INF64_SIGNED)),
}
"""What :func:`light_runs` needs to know of each element format."""


@njit(nogil=True, cache=True, boundscheck=False)
def _exponents32(bits, tables, counts):  # pragma: no cover - compiled
    """Add the exponent-field counts of float32 ``bits`` to ``counts`` (int64 ``(256,)``).

    Long runs are read as 64-bit words, two elements each, four words per iteration.
    """
    n = bits.size
    if n < SMALL:
        for i in range(n):
            counts[(bits[i] >> _S32) & _M32] += 1
        return
    tables[:] = 0
    pairs = n // 2
    words = bits[: 2 * pairs].view(np.uint64)
    whole = pairs - pairs % 4
    for j in range(0, whole, 4):
        a = words[j]
        b = words[j + 1]
        c = words[j + 2]
        d = words[j + 3]
        tables[(a >> _LO) & _M] += 1
        tables[_T1 + ((a >> _HI) & _M)] += 1
        tables[_T2 + ((b >> _LO) & _M)] += 1
        tables[_T3 + ((b >> _HI) & _M)] += 1
        tables[_T4 + ((c >> _LO) & _M)] += 1
        tables[_T5 + ((c >> _HI) & _M)] += 1
        tables[_T6 + ((d >> _LO) & _M)] += 1
        tables[_T7 + ((d >> _HI) & _M)] += 1
    for i in range(2 * whole, n):
        tables[(bits[i] >> _S32) & _M32] += 1
    for way in range(8):
        for e in range(_E32):
            counts[e] += tables[way * _E32 + e]


@njit(nogil=True, cache=True, boundscheck=False)
def _exponents64(bits, tables, counts):  # pragma: no cover - compiled
    """Add the exponent-field counts of float64 ``bits`` to ``counts`` (int64 ``(2048,)``)."""
    n = bits.size
    if n < SMALL:
        for i in range(n):
            counts[(bits[i] >> _S64) & _M64] += 1
        return
    tables[:] = 0
    n4 = n - n % 4
    for i in range(0, n4, 4):
        tables[(bits[i] >> _S64) & _M64] += 1
        tables[_W64 + ((bits[i + 1] >> _S64) & _M64)] += 1
        tables[_W64 * np.uint64(2) + ((bits[i + 2] >> _S64) & _M64)] += 1
        tables[_W64 * np.uint64(3) + ((bits[i + 3] >> _S64) & _M64)] += 1
    for i in range(n4, n):
        tables[(bits[i] >> _S64) & _M64] += 1
    for way in range(4):
        for e in range(_E64):
            counts[e] += tables[way * _E64 + e]


def _exponents(bits, tables, counts):
    """Add the exponent-field counts of ``bits`` to ``counts`` (by the bits' width). Called
    from Python it picks the function itself; inside compiled code the overload below does."""
    (_exponents32 if bits.dtype == np.uint32 else _exponents64)(bits, tables, counts)


@overload(_exponents, jit_options={"nogil": True})
def _exponents_of_width(bits, tables, counts):
    if bits.dtype == types.uint32:
        return lambda bits, tables, counts: _exponents32(bits, tables, counts)
    return lambda bits, tables, counts: _exponents64(bits, tables, counts)


@njit(nogil=True, cache=True, fastmath=_FAST, boundscheck=False)
def _sums(values):  # pragma: no cover - compiled
    """(sum, sum of squares) of values that are all finite, in float64 whatever their precision."""
    total = 0.0
    squares = 0.0
    for i in range(values.size):
        x = np.float64(values[i])
        total += x
        squares += x * x
    return total, squares


@njit(nogil=True, cache=True, boundscheck=False)
def _top32(bits):  # pragma: no cover - compiled
    """The largest ``bits & 0x7FFFFFFF``: for finite float32 values, the bits of ``max |x|``
    (kept in 32 bits, where the maximum vectorises)."""
    top = np.uint32(0)
    for i in range(bits.size):
        magnitude = np.uint32(bits[i] & _ABS32)
        top = magnitude if magnitude > top else top
    return top


@njit(nogil=True, cache=True, boundscheck=False)
def _top64(bits):  # pragma: no cover - compiled
    """As :func:`_top32` for float64 bits."""
    top = np.uint64(0)
    for i in range(bits.size):
        magnitude = bits[i] & _ABS64
        top = magnitude if magnitude > top else top
    return top


def _top(bits):
    """The bits of ``max |x|`` of finite values (by the bits' width; from Python as
    :func:`_exponents`)."""
    return (_top32 if bits.dtype == np.uint32 else _top64)(bits)


@overload(_top, jit_options={"nogil": True})
def _top_of_width(bits):
    if bits.dtype == types.uint32:
        return lambda bits: _top32(bits)
    return lambda bits: _top64(bits)


@njit(nogil=True, cache=True, boundscheck=False)
def _finite_sums(values, bits, abs_mask, inf_bits):  # pragma: no cover - compiled
    """(sum, sum of squares, largest ``bits & abs_mask``, NaN count, Inf count) over the
    finite values: the careful loop for a block that holds NaN/Inf (``bits``: any integer
    type in whose order ``bits & abs_mask`` is magnitude order; ``inf_bits``: Inf's)."""
    total = 0.0
    squares = 0.0
    top = abs_mask ^ abs_mask  # zero, of the bits' type
    nans = 0
    infs = 0
    for i in range(values.size):
        magnitude = bits[i] & abs_mask
        if magnitude >= inf_bits:
            nans += magnitude > inf_bits
            infs += magnitude == inf_bits
            continue
        x = np.float64(values[i])
        total += x
        squares += x * x
        top = magnitude if magnitude > top else top
    return total, squares, top, nans, infs


@njit(nogil=True, cache=True, boundscheck=False)
def _zeros(bits, abs_mask):  # pragma: no cover - compiled
    count = 0
    for i in range(bits.size):
        count += (bits[i] & abs_mask) == 0
    return count


@njit(nogil=True, cache=True, boundscheck=False)
def _fold(counts, bin0, zeros, row):  # pragma: no cover - compiled
    """Exponent-field counts -> the row's histogram: exponents up to ``bin0`` (and exponent
    0, less the zeros: subnormals) into bin 0, the next 62 one bin each, the rest up to the
    largest finite exponent into bin 63 (the all-ones exponent, NaN/Inf, is left out)."""
    low = counts[0] - zeros
    for e in range(1, bin0 + 1):
        low += counts[e]
    row[_HIST] += low
    for b in range(1, _LAST_BIN):
        row[_HIST + b] += counts[bin0 + b]
    high = 0
    for e in range(bin0 + _LAST_BIN, counts.size - 1):
        high += counts[e]
    row[_HIST + _LAST_BIN] += high


@njit(nogil=True, cache=True)
def _scale(values, factor, out):  # pragma: no cover - compiled
    """``out = values * factor`` in the values' own precision (as ``GradScaler.unscale_``)."""
    for i in range(values.size):
        out[i] = values[i] * factor


@intrinsic
def _at(typingctx, address, like):
    """A pointer to elements of ``like``'s dtype at the int64 ``address`` (to read tensors in place)."""

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

    return types.CPointer(like.dtype)(types.int64, like), codegen


@njit(nogil=True, cache=True, boundscheck=False)
def runs(addresses, sizes, out, fmt, scratch, scale, scaled):  # pragma: no cover - compiled
    """Rows of the runs of ``sizes[k]`` elements at ``addresses[k]`` into zeroed ``out[k]``.

    ``fmt`` is the element format (``FORMATS[dtype][3]``); ``scratch`` the reusable arrays
    (``numba_kernels._scratch``); with ``scaled``, each element is first multiplied by
    ``scale`` in its own precision, block by block in cache.
    """
    abs_mask, inf_bits, bin0 = fmt
    values_like, bits_like, buffer, buffer_bits, tables, counts, top_bits, top_value = scratch
    last = counts.size - 1
    for k in range(sizes.size):
        run = carray(_at(addresses[k], values_like), (sizes[k],))
        run_bits = carray(_at(addresses[k], bits_like), (sizes[k],))
        row = out[k]
        counts[:] = 0
        top = abs_mask ^ abs_mask  # zero, of the bits' type
        zeros = 0
        for lo in range(0, run.size, BLOCK):
            hi = min(lo + BLOCK, run.size)
            if scaled:
                values, bits = buffer[: hi - lo], buffer_bits[: hi - lo]
                _scale(run[lo:hi], scale, values)
            else:
                values, bits = run[lo:hi], run_bits[lo:hi]
            before_zero = counts[0]
            before_bad = counts[last]
            _exponents(bits, tables, counts)
            if counts[last] > before_bad:
                total, squares, block_top, nans, _ = _finite_sums(values, bits, abs_mask, inf_bits)
                row[_NANS] += nans
                row[_INFS] += counts[last] - before_bad - nans
            else:
                total, squares = _sums(values)
                block_top = _top(bits)
            if counts[0] > before_zero:
                zeros += _zeros(bits, abs_mask)
            row[_SUM] += total
            row[_SUMSQ] += squares
            top = block_top if block_top > top else top
        row[_N] = run.size
        row[_ZEROS] = zeros
        top_bits[0] = top
        row[_MAX] = top_value[0]
        _fold(counts, bin0, zeros, row)


# ---- light rows ---------------------------------------------------------------------


@njit(nogil=True, cache=True, boundscheck=False)
def _magnitudes32(bits):  # pragma: no cover - compiled
    """(largest magnitude, smallest non-zero magnitude less one, zeros) of float32 ``bits``
    (uint32); magnitudes are ``bits & 0x7FFFFFFF``, and the smallest is ``0x7FFFFFFF`` (not
    a finite magnitude) when every value is zero. All in 32 bits, where they vectorise."""
    top = np.uint32(0)
    low = _ABS32
    zeros = np.uint32(0)  # 32 bits like the rest, or the loop runs at half width (a block < 2**32)
    for i in range(bits.size):
        magnitude = np.uint32(bits[i] & _ABS32)
        below = np.uint32(np.uint32(magnitude - _ONE32) & _ABS32)  # a zero wraps to 0x7FFFFFFF
        top = magnitude if magnitude > top else top
        low = below if below < low else low
        zeros = np.uint32(zeros + np.uint32(magnitude == 0))
    return top, low, zeros


@njit(nogil=True, cache=True, boundscheck=False)
def _magnitudes64(bits):  # pragma: no cover - compiled
    """As :func:`_magnitudes32` for float64 ``bits`` read as int64 (signed order is magnitude
    order on 63-bit magnitudes, and a signed 64-bit minimum/maximum vectorises)."""
    top = np.int64(0)
    low = _ABS64_SIGNED
    zeros = 0
    for i in range(bits.size):
        magnitude = bits[i] & _ABS64_SIGNED
        below = (magnitude - 1) & _ABS64_SIGNED  # a zero wraps to 0x7FF...F
        top = magnitude if magnitude > top else top
        low = below if below < low else low
        zeros += magnitude == 0
    return top, low, zeros


def _magnitudes(bits):
    """The integer loop for ``bits``' width. Called from Python it picks the function itself;
    inside compiled code the overload below does."""
    return (_magnitudes32 if bits.dtype == np.uint32 else _magnitudes64)(bits)


@overload(_magnitudes, jit_options={"nogil": True})
def _magnitudes_of_width(bits):
    if bits.dtype == types.uint32:
        return lambda bits: _magnitudes32(bits)
    return lambda bits: _magnitudes64(bits)


@njit(nogil=True, cache=True, boundscheck=False)
def light_runs(addresses, sizes, out, lowest, fmt, scratch, scale, scaled):  # pragma: no cover - compiled
    """Light rows of the runs of ``sizes[k]`` elements at ``addresses[k]`` into zeroed
    ``out[k]`` (histogram columns untouched), and each run's smallest non-zero finite ``|x|``
    into ``lowest[k]`` (``inf`` when there is none).

    ``fmt`` is ``LIGHT_FORMATS[dtype][1]``; ``scratch`` the reusable arrays
    (``numba_light_kernels._scratch``); with ``scaled``, each element is first multiplied by
    ``scale`` in its own precision, block by block in cache, as :func:`runs` does.
    """
    abs_mask, inf_bits = fmt
    values_like, bits_like, buffer, buffer_bits, bits_out, value_out = scratch
    for k in range(sizes.size):
        run = carray(_at(addresses[k], values_like), (sizes[k],))
        run_bits = carray(_at(addresses[k], bits_like), (sizes[k],))
        row = out[k]
        top = abs_mask ^ abs_mask  # zero, of the bits' type
        low = abs_mask
        zeros = 0
        for lo in range(0, run.size, BLOCK):
            hi = min(lo + BLOCK, run.size)
            if scaled:
                values, bits = buffer[: hi - lo], buffer_bits[: hi - lo]
                _scale(run[lo:hi], scale, values)
            else:
                values, bits = run[lo:hi], run_bits[lo:hi]
            block_top, block_low, block_zeros = _magnitudes(bits)
            if block_top >= inf_bits:  # NaN or Inf in the block
                total, squares, block_top, nans, infs = _finite_sums(values, bits, abs_mask, inf_bits)
                row[_NANS] += nans
                row[_INFS] += infs
            else:
                total, squares = _sums(values)
            row[_SUM] += total
            row[_SUMSQ] += squares
            top = block_top if block_top > top else top
            low = block_low if block_low < low else low
            zeros += block_zeros
        row[_N] = run.size
        row[_ZEROS] = zeros
        bits_out[0] = top
        row[_MAX] = value_out[0]
        # NaN/Inf magnitudes, less one, are never below a finite one's: only finite values count.
        if low >= inf_bits - 1:
            lowest[k] = np.inf
        else:
            bits_out[0] = low + 1
            lowest[k] = value_out[0]
