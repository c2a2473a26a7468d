"""The Triton kernel against the float64 reference.

Without CUDA these run in Triton's interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1), with tiny tiles so small inputs still span many chunks, both kernel
paths and several steps of the final reduction. With CUDA they run the compiled kernel.
"""

import numpy as np
import pytest
import torch
from conftest import requires_cuda
from hypothesis import given, settings
from hypothesis import strategies as st
from stats_reference import assert_matches_reference, reference_row, triggers_histogram, unscaled
from tensor_strategies import gradient_tensors, many_small_and_a_few_large
from tiers import examples

from gradscope import TensorStats
from gradscope.stats import layout, triton_backend
from gradscope.stats.inputs import flat_elements

SMALL_TILES = {"block": 64, "careful_block": 16, "chunk_numel": 256, "final_rows": 4}


def kernel_stats(tensors, device, inv_scale=None, **tiling) -> TensorStats:
    flats = [flat_elements(t.to(device)) for t in tensors]
    scale = None if inv_scale is None else torch.tensor([inv_scale], dtype=torch.float32, device=device)
    return TensorStats.from_rows(triton_backend.triton_rows(flats, inv_scale=scale, **tiling))


@settings(max_examples=examples(60))
@given(st.lists(gradient_tensors(max_numel=1500), min_size=1, max_size=4))
def test_matches_reference_small_tiles(kernel_device, tensors):
    assert_matches_reference(kernel_stats(tensors, kernel_device, **SMALL_TILES), tensors)


@settings(max_examples=examples(15))
@given(many_small_and_a_few_large(large_numel=1500))
def test_many_small_tensors_around_large_ones(kernel_device, tensors):
    """Mixed dtypes: one launch per dtype, all writing into one output buffer."""
    assert_matches_reference(kernel_stats(tensors, kernel_device, **SMALL_TILES), tensors)


@settings(max_examples=examples(20))
@given(st.lists(gradient_tensors(max_numel=3000), min_size=1, max_size=3))
def test_matches_reference_default_tiles(kernel_device, tensors):
    assert_matches_reference(kernel_stats(tensors, kernel_device), tensors)


@settings(max_examples=examples(20))
@given(
    tensors=st.lists(gradient_tensors(max_numel=1500), min_size=1, max_size=3),
    inv_scale=st.sampled_from([2.0**-16, 2.0**3, 1 / 3, 1e-30]),
)
def test_statistics_of_unscaled_gradients(kernel_device, tensors, inv_scale):
    """With inv_scale, the statistics are those of g * inv_scale computed as GradScaler does."""
    expected = [unscaled(t, inv_scale) for t in tensors]
    assert_matches_reference(kernel_stats(tensors, kernel_device, inv_scale=inv_scale, **SMALL_TILES), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_awkward_shapes(kernel_device, dtype):
    """Shapes that are not multiples of anything, many small tensors beside a larger one."""
    g = torch.Generator().manual_seed(1)
    tensors = [
        torch.randn(shape, generator=g).to(dtype) * 1e-2 for shape in [(5, 123, 3), (1,), (257,), (0, 3), (33, 31)]
    ]
    tensors += [torch.randn(7, generator=g).to(dtype) for _ in range(20)]
    assert_matches_reference(kernel_stats(tensors, kernel_device, **SMALL_TILES), tensors)


def test_careful_path_chunk_next_to_fast_path_chunks(kernel_device):
    """One non-finite value turns only its own chunk to the careful path; totals still add up."""
    x = torch.linspace(-1, 1, 2000)
    x[1500] = float("nan")
    x[10] = 1e30  # huge, in another chunk
    x[700] = 1e-42  # subnormal, in a third
    assert_matches_reference(kernel_stats([x], kernel_device, **SMALL_TILES), [x])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_final_reduction_follows_the_declared_combine_rule(kernel_device, dtype):
    """The kernel combines a tensor's chunk partials with its own arithmetic (it cannot call
    Python); that arithmetic must be the rule ``layout.COMBINE`` declares. The row of a whole
    tensor equals ``layout.combine_rows`` of the rows of its chunks measured one by one:
    counts, histogram and max_abs exactly, sums to float64 rounding."""
    assert [layout.SCALAR_FIELDS[c] for c in layout.MAX_COLUMNS] == ["max_abs"], (
        "the kernel takes the maximum of max_abs only and adds every other column: update it with COMBINE"
    )
    chunk = SMALL_TILES["chunk_numel"]
    g = torch.Generator().manual_seed(5)
    x = torch.randn(5 * chunk + 37, generator=g, dtype=torch.float64) * 10 ** torch.randn(5 * chunk + 37, generator=g)
    x[3] = x[chunk + 1] = 0.0
    x[chunk + 5] = float("nan")  # careful path in chunk 1
    x[2 * chunk + 9] = float("-inf")  # and in chunk 2
    x[3 * chunk + 2] = 2.0**-70  # tiny: careful path in chunk 3
    x[4 * chunk + 7] = 2.0**50  # huge: careful path in chunk 4
    x = x.to(dtype)
    whole = kernel_stats([x], kernel_device, **SMALL_TILES).to_rows()[0]
    pieces = kernel_stats(list(x.split(chunk)), kernel_device, **SMALL_TILES).to_rows()
    combined = layout.combine_rows(pieces)
    exact = [
        *layout.MAX_COLUMNS,
        layout.NUMEL,
        layout.ZEROS,
        layout.NANS,
        layout.INFS,
        *range(layout.HIST, layout.ROW_WIDTH),
    ]
    np.testing.assert_array_equal(whole[exact], combined[exact])
    np.testing.assert_allclose(whole[[layout.SUM, layout.SUMSQ]], combined[[layout.SUM, layout.SUMSQ]], rtol=1e-12)
    assert whole[layout.NANS] == 1 and whole[layout.INFS] == 1 and whole[layout.ZEROS] >= 2


def test_bit_identical_across_runs(kernel_device):
    g = torch.Generator().manual_seed(2)
    tensors = [torch.randn(3000, generator=g) * 10 ** torch.randn(3000, generator=g), torch.randn(77, generator=g)]
    first = kernel_stats(tensors, kernel_device, **SMALL_TILES).to_rows()
    again = kernel_stats(tensors, kernel_device, **SMALL_TILES).to_rows()
    assert first.tobytes() == again.tobytes()


def test_rows_do_not_depend_on_launch_companions(kernel_device):
    """A tensor's row is bit-identical whether it is launched alone or with others (the
    monitor's backward and step modes group gradients differently)."""
    g = torch.Generator().manual_seed(3)
    tensors = [torch.randn(n, generator=g) * 10 ** torch.randn(n, generator=g) for n in (9000, 130, 5000)]
    together = kernel_stats(tensors, kernel_device).to_rows()
    alone = np.concatenate([kernel_stats([t], kernel_device).to_rows() for t in tensors])
    assert together.tobytes() == alone.tobytes()


def test_writes_only_its_rows(kernel_device):
    """The launcher writes the requested rows of a shared buffer and nothing else."""
    out = torch.full((5, layout.ROW_WIDTH), -7.0, dtype=torch.float64, device=kernel_device)
    tensors = [torch.randn(300), torch.randn(40).double()]
    flats = [flat_elements(t.to(kernel_device)) for t in tensors]
    triton_backend.launch_rows(flats, out, [3, 1], **SMALL_TILES)
    rows = out.cpu().numpy()
    assert (rows[[0, 2, 4]] == -7.0).all()
    for row, tensor in zip(rows[[3, 1]], tensors, strict=True):
        ref = reference_row(tensor)
        assert row[layout.NUMEL] == ref["numel"]
        np.testing.assert_array_equal(row[layout.HIST :], ref["hist"])


def test_offsets_beyond_int32(kernel_device):
    """Element offsets past 2**31 are int64 all the way: a tensor whose last chunks start
    beyond 2**31 is read from its true addresses (its base address is moved back by 2**31
    elements, so only the real data is ever touched)."""
    from gradscope.kernels import launch as k

    data = torch.randn(700, device=kernel_device) * 3
    data[5] = 0
    skip = 2**31 + 64  # elements before the real data
    chunk = 256
    starts = np.arange(skip, skip + data.numel(), chunk, dtype=np.int64)
    table = np.concatenate(
        [
            [data.data_ptr() - skip * data.element_size()],  # base address
            [skip + data.numel()],  # numel
            [0],  # output row
            [0],  # first chunk
            [starts.size],  # chunks
            [chunk],  # chunk size
            np.zeros(starts.size, dtype=np.int64),  # chunk -> tensor
            starts,  # chunk -> start element
        ]
    ).astype(np.int64)
    out = torch.zeros((1, layout.ROW_WIDTH), dtype=torch.float64, device=kernel_device)
    k.launch_table(table, 1, torch.float32, out, block=64, careful_block=16, final_rows=4)
    row = out.cpu().numpy()[0]
    ref = reference_row(data)
    assert row[layout.NUMEL] == skip + data.numel()
    assert row[layout.ZEROS] == ref["zeros"]
    assert row[layout.MAX_ABS] == ref["max_abs"]
    assert row[layout.SUMSQ] == pytest.approx(ref["sumsq"], rel=1e-6)
    np.testing.assert_array_equal(row[layout.HIST :], ref["hist"])


def test_rejects_what_it_cannot_read(kernel_device):
    from gradscope.kernels import launch as k

    out = torch.zeros((2, layout.ROW_WIDTH), dtype=torch.float64, device=kernel_device)
    with pytest.raises(TypeError, match="int32"):
        k.grad_stats_launch([torch.zeros(3, dtype=torch.int32, device=kernel_device)], out, [0])
    with pytest.raises(ValueError, match="1-D and contiguous"):
        k.grad_stats_launch([torch.zeros(3, 3, device=kernel_device)], out, [0])
    with pytest.raises(ValueError, match="expected"):
        k.grad_stats_launch(
            [torch.zeros(3, device=kernel_device), torch.zeros(3, device=kernel_device).double()], out, [0, 1]
        )
    with pytest.raises(ValueError, match="out_rows"):
        k.grad_stats_launch([torch.zeros(3, device=kernel_device)], out, [2])
    with pytest.raises(ValueError, match="float64"):
        k.grad_stats_launch([torch.zeros(3, device=kernel_device)], out.float(), [0])


@requires_cuda
def test_no_host_sync_on_cuda():
    """Launching writes a device buffer without any synchronising CUDA call."""
    tensors = [torch.randn(100_000, device="cuda"), torch.randn(1000, device="cuda", dtype=torch.bfloat16)]
    flats = [flat_elements(t) for t in tensors]
    out = torch.empty((2, layout.ROW_WIDTH), dtype=torch.float64, device="cuda")
    triton_backend.launch_rows(flats, out, [0, 1])  # compile and allocate first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        triton_backend.launch_rows(flats, out, [0, 1])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_matches_reference(TensorStats.from_rows(out.cpu().numpy()), tensors)


def test_a_repeated_launch_reuses_its_work_table_and_reads_the_new_values(kernel_device):
    """The table cache keys the tensors' layout (addresses, sizes, rows), never their values:
    the second launch of the same gradients builds nothing and sees what they hold now."""
    from gradscope.kernels import launch as k

    k._tables.clear()
    grads = [torch.randn(700, device=kernel_device), torch.randn(33, device=kernel_device)]
    flats = [flat_elements(g) for g in grads]
    out = torch.empty((2, layout.ROW_WIDTH), dtype=torch.float64, device=kernel_device)
    triton_backend.launch_rows(flats, out, [0, 1], **SMALL_TILES)
    assert len(k._tables) == 1
    (cached,) = k._tables.values()
    grads[0].mul_(-3.0)
    grads[1][5] = float("nan")
    triton_backend.launch_rows(flats, out, [0, 1], **SMALL_TILES)
    assert len(k._tables) == 1 and next(iter(k._tables.values()))[1] is cached[1]  # the same device table
    assert_matches_reference(TensorStats.from_rows(out.cpu().numpy()), [g.cpu() for g in grads])
    # another layout (rows swapped; a shorter view at the same address) is another table
    triton_backend.launch_rows(flats, out, [1, 0], **SMALL_TILES)
    triton_backend.launch_rows([flat_elements(grads[0][:500]), flats[1]], out, [0, 1], **SMALL_TILES)
    assert len(k._tables) == 3
    assert_matches_reference(TensorStats.from_rows(out.cpu().numpy()), [grads[0][:500].cpu(), grads[1].cpu()])


def test_the_table_cache_is_bounded(kernel_device, monkeypatch):
    from gradscope.kernels import launch as k

    k._tables.clear()
    monkeypatch.setattr(k, "TABLE_CACHE", 3)
    grad = torch.randn(64, device=kernel_device)
    out = torch.empty((1, layout.ROW_WIDTH), dtype=torch.float64, device=kernel_device)
    for n in range(5, 10):
        triton_backend.launch_rows([flat_elements(grad[:n])], out, [0], **SMALL_TILES)
        assert out[0, layout.NUMEL] == n
    assert len(k._tables) == 3


def test_unchecked_launches_still_refuse_a_dtype_the_kernel_lacks(kernel_device):
    from gradscope.kernels import launch as k

    out = torch.empty((1, layout.ROW_WIDTH), dtype=torch.float64, device=kernel_device)
    with pytest.raises(TypeError, match=r"dtype torch\.int32"):
        k.grad_stats_launch([torch.zeros(3, dtype=torch.int32, device=kernel_device)], out, [0], checked=False)


@requires_cuda
@pytest.mark.parametrize("histogram", [True, False], ids=["full", "light"])
def test_the_monitors_launch_can_be_captured_in_a_cuda_graph(histogram):
    """No sync, no allocation, no copy once the table is cached: a captured launch, replayed
    after the gradients changed in place, gives the rows of the new values."""
    grads = [torch.randn(300_000, device="cuda"), torch.randn(5000, device="cuda", dtype=torch.bfloat16)]
    flats = [flat_elements(g) for g in grads]
    out = torch.zeros((2, layout.ROW_WIDTH), dtype=torch.float64, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (compile, cache the table) on the stream that captures
        triton_backend.launch_rows(flats, out, [0, 1], histogram=histogram)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        triton_backend.launch_rows(flats, out, [0, 1], histogram=histogram)
    with torch.no_grad():
        grads[0].mul_(2.0)
        grads[1][7] = float("inf")  # triggers its histogram in the light launch too
    graph.replay()
    torch.cuda.synchronize()
    rows = out.cpu().numpy()
    expected = triton_backend.triton_rows(flats, histogram=histogram)
    assert rows[:, : layout.HIST].tobytes() == expected[:, : layout.HIST].tobytes()
    np.testing.assert_array_equal(rows[:, layout.HIST :], expected[:, layout.HIST :])
    assert layout.histogram_known(rows).tolist() == [histogram, True]


@requires_cuda
def test_tensor_over_2_31_elements_on_cuda():
    free, _ = torch.cuda.mem_get_info()
    if free < 12 * 2**30:
        pytest.skip("needs 12 GiB of free GPU memory")
    x = torch.zeros(2**31 + 4096, dtype=torch.bfloat16, device="cuda")
    x[-3:] = torch.tensor([1.0, -2.0, float("inf")], dtype=torch.bfloat16)
    stats = kernel_stats([x], "cuda")
    assert stats.numel[0] == x.numel()
    assert stats.zeros[0] == x.numel() - 3
    assert stats.infs[0] == 1
    assert stats.max_abs[0] == 2.0
    assert stats.sumsq[0] == 5.0


# --------------------------------------------------------------------------------------
# Chunk sizes, alignment groups, the fast path's magnitude range, zeros and masked tails
# --------------------------------------------------------------------------------------


def _chunk_size_by_definition(numel: int, min_chunk: int) -> int:
    """The definition of a tensor's chunk size, as a plain loop: ``min_chunk`` doubled until
    the tensor has at most TARGET_CHUNKS chunks, but never past the cap."""
    cap = max(2**20, min_chunk)
    chunk = min_chunk
    while -(-numel // chunk) > 512 and chunk < cap:
        chunk *= 2
    return chunk


@settings(max_examples=examples(300))
@given(
    numels=st.lists(
        st.one_of(
            st.integers(0, 2**34),
            # around the thresholds where the chunk doubles: 512 * min_chunk * 2**k (+-1)
            st.builds(
                lambda k, m, d: max(0, (512 << k) * m + d),
                st.integers(0, 14),
                st.sampled_from([256, 4096, 65536]),
                st.integers(-1, 1),
            ),
        ),
        min_size=1,
        max_size=8,
    ),
    min_chunk=st.sampled_from([256, 4096, 65536]),
)
def test_chunk_sizes_follow_their_definition(numels, min_chunk):
    pytest.importorskip("triton")
    from gradscope.kernels import launch as k

    assert k.TARGET_CHUNKS == 512
    array = np.asarray(numels, dtype=np.int64)
    sizes = k.chunk_sizes(array, min_chunk)
    assert sizes.shape == array.shape
    expected = [_chunk_size_by_definition(n, min_chunk) for n in numels]
    assert sizes.tolist() == expected, (numels, min_chunk)
    for numel, size in zip(numels, sizes.tolist(), strict=True):
        assert size >= min_chunk and size & (size - 1) == 0, (numel, size)
        assert -(-numel // size) <= 512 or size == 2**20, (numel, size)
        # each tensor's chunk depends on its own numel only, not on the others in the array
        assert k.chunk_sizes(np.array([numel], dtype=np.int64), min_chunk).tolist() == [size]


GROWN_TILES = {"block": 256, "careful_block": 16, "chunk_numel": 256, "final_rows": 4}
"""Small tiles for a tensor whose chunk grows past the minimum: that takes over
``TARGET_CHUNKS * chunk_numel`` elements, so each tile holds 256 of them (SMALL_TILES' 64
would take the interpreter four times as long)."""


def test_large_tensor_with_grown_chunks_matches_reference_and_ignores_companions(kernel_device):
    """A tensor big enough that its chunk grows past the minimum (512 elements instead of
    256), with specials planted in different chunks: it matches the float64 reference and
    its row is bit-identical whether it is launched alone or between two small tensors."""
    from gradscope.kernels import launch as k

    n = 256 * 512 + 123
    assert k.chunk_sizes(np.array([n], dtype=np.int64), GROWN_TILES["chunk_numel"])[0] > GROWN_TILES["chunk_numel"]
    g = torch.Generator().manual_seed(11)
    x = torch.randn(n, generator=g) * 10 ** torch.randn(n, generator=g).clamp(-3, 3)
    x[5_000] = float("nan")
    x[40_000] = float("-inf")
    x[75_000:76_000] = 0.0  # a zero run across chunk boundaries
    x[100_000] = 2.0**-70  # tiny: careful path
    x[130_000] = 2.0**60  # huge: careful path
    x[-1] = 0.0  # in the masked tail
    x = x.to(kernel_device)
    small = [torch.randn(100, generator=g).to(kernel_device), torch.randn(3000, generator=g).to(kernel_device)]

    together = kernel_stats([small[0], x, small[1]], kernel_device, **GROWN_TILES)
    alone = kernel_stats([x], kernel_device, **GROWN_TILES)
    assert_matches_reference(alone, [x])
    assert_matches_reference(together, [small[0], x, small[1]])
    assert together.to_rows()[1].tobytes() == alone.to_rows()[0].tobytes()
    assert alone.nans[0] == 1 and alone.infs[0] == 1 and alone.zeros[0] >= 1001


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_misaligned_tensors_launched_beside_aligned_ones(kernel_device, dtype):
    """Tensors whose first element is not 16-byte aligned go in a launch of their own: each
    row matches the reference and equals (bitwise) the row of the same tensor launched alone;
    an aligned copy of it gets the same counts, max_abs and histogram (not always the same
    sums to the last bit: an aligned tile gives each lane contiguous elements, a misaligned
    one every LANES-th, so float32 sums are added in another order)."""
    g = torch.Generator().manual_seed(12)

    def noise(count):
        return (torch.randn(count, generator=g) * 10 ** torch.randn(count, generator=g).clamp(-2, 2)).to(dtype)

    misaligned = []
    for count in (1001, 2, 700):
        base = noise(count).to(kernel_device)
        misaligned.append(base[1:])
    misaligned[2][100:120] = 0.0
    misaligned[2][333] = float("nan")  # one misaligned chunk takes the careful path
    aligned = [noise(count).to(kernel_device) for count in (600, 33)]
    tensors = [aligned[0], misaligned[0], misaligned[1], aligned[1], misaligned[2]]
    for t in misaligned:
        assert flat_elements(t).values.data_ptr() % 16 != 0
    for t in aligned:
        assert flat_elements(t).values.data_ptr() % 16 == 0

    together = kernel_stats(tensors, kernel_device, **SMALL_TILES)
    assert_matches_reference(together, tensors)
    rows = together.to_rows()
    for i, t in enumerate(tensors):
        alone = kernel_stats([t], kernel_device, **SMALL_TILES).to_rows()[0]
        assert rows[i].tobytes() == alone.tobytes(), f"tensor {i}: row depends on its launch companions"
    exact = [
        layout.NUMEL,
        layout.MAX_ABS,
        layout.ZEROS,
        layout.NANS,
        layout.INFS,
        *range(layout.HIST, layout.ROW_WIDTH),
    ]
    for i, t in enumerate(tensors):
        copy = t.clone()
        assert flat_elements(copy).values.data_ptr() % 16 == 0
        aligned_row = kernel_stats([copy], kernel_device, **SMALL_TILES).to_rows()[0]
        np.testing.assert_array_equal(rows[i][exact], aligned_row[exact], err_msg=f"tensor {i}")

    # the same through launch_rows into a shared buffer, in a shuffled row order
    out = torch.full((len(tensors) + 1, layout.ROW_WIDTH), -7.0, dtype=torch.float64, device=kernel_device)
    out_rows = [4, 0, 5, 2, 1]
    triton_backend.launch_rows([flat_elements(t) for t in tensors], out, out_rows, **SMALL_TILES)
    buffer = out.cpu().numpy()
    assert (buffer[3] == -7.0).all()
    for i, r in enumerate(out_rows):
        assert buffer[r].tobytes() == rows[i].tobytes()


def _log_uniform(count, low_exponent, high_exponent, seed):
    """float32 values with random signs and magnitudes log-uniform in ``[2**low, 2**high)``."""
    rng = np.random.default_rng(seed)
    magnitudes = np.exp2(rng.uniform(low_exponent, high_exponent, count))
    x = torch.from_numpy(magnitudes * rng.choice([-1.0, 1.0], count)).float()
    # float32 rounding may land on the upper edge: keep the values inside the interval
    return x.clamp(-(2.0**high_exponent), 2.0**high_exponent)


@pytest.mark.parametrize("tiling", [SMALL_TILES, {}], ids=["small_tiles", "default_tiles"])
def test_fast_path_magnitude_range(kernel_device, tiling):
    """Magnitudes in [2**-63, 2**56) take the fast path (plain float32 sums), anything
    smaller (non-zero) or larger takes the careful path; both match the reference either
    side of each threshold. Squares of float32 values from 2**-63 up stay normal, so a
    chunk of magnitudes in [2**-62, 2**-41] (once careful, now fast) keeps its sum of squares
    to float32 accuracy."""
    count = 2000
    tiny_range = _log_uniform(count, -62, -41, seed=1)
    assert tiny_range.abs().min() >= 2.0**-62 and tiny_range.abs().max() <= 2.0**-41
    just_below_tiny = _log_uniform(count, -64, -63, seed=2)
    just_below_tiny = just_below_tiny[just_below_tiny.abs() < 2.0**-63]
    # float32 squares of these are deep subnormals (summed on the fast path they lose about
    # 2e-6 relative, or everything where denormals flush): only the careful path keeps them.
    # Narrow bands, so that the deep squares dominate their sums.
    far_below_tiny = _log_uniform(count, -70, -69, seed=3)
    deep_tiny = _log_uniform(count, -80, -79, seed=6)

    def below(edge):  # the largest float32 below ``edge``
        return torch.tensor(edge).view(torch.int32).sub(1).view(torch.float32).item()

    fast_edges = torch.tensor([2.0**-63, -(2.0**-63), below(2.0**56), -below(2.0**56), 1.0] * 50)
    careful_edges = torch.tensor([below(2.0**-63), -below(2.0**-63), 2.0**56, -(2.0**56), 1.0] * 50)
    near_huge = _log_uniform(count, 54.5, 55.99, seed=4)
    huge = _log_uniform(count, 56.5, 57.5, seed=5)
    huger = _log_uniform(count, 63, 64, seed=7)  # float32 squares: a few of them overflow
    assert near_huge.abs().max() < 2.0**56 and huge.abs().min() >= 2.0**56
    mixed = torch.cat([tiny_range[:1000], near_huge[:1000], torch.zeros(100), just_below_tiny[:10]])
    tensors = [tiny_range, just_below_tiny, far_below_tiny, deep_tiny]
    tensors += [fast_edges, careful_edges, near_huge, huge, huger, mixed]
    tensors = [t.to(kernel_device) for t in tensors]

    stats = kernel_stats(tensors, kernel_device, **tiling)
    assert_matches_reference(stats, tensors)
    for i in (0, 1, 2, 3):  # the fast path's tiny range, and the careful path's
        expected = float((tensors[i].cpu().double() ** 2).sum())
        assert abs(stats.sumsq[i] - expected) <= 1e-6 * expected, (
            f"tensor {i}: sumsq {stats.sumsq[i]!r} vs {expected!r}"
        )


@pytest.mark.parametrize("tiling", [SMALL_TILES, {}], ids=["small_tiles", "default_tiles"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_zeros_counted_exactly_with_masked_tails(kernel_device, dtype, tiling):
    """Zeros are counted apart and taken out of histogram bin 0, and the masked lanes of a
    tensor's last tile count as nothing: for lengths that are not multiples of a tile, all
    zeros or a few zeros (and values in bin 0) among normal values, on the fast path and
    (with a NaN and an Inf) on the careful path, ``zeros`` and the histogram are exact."""
    g = torch.Generator().manual_seed(13)
    lengths = (1, 63, 65, 257, 1000)
    all_zero = []
    mixed = []
    careful_mixed = []
    for n in lengths:
        z = torch.zeros(n, dtype=dtype)
        z[::3] = -0.0
        all_zero.append(z)
        x = torch.randn(n, generator=g, dtype=torch.float64)
        x[torch.randperm(n, generator=g)[: max(1, n // 10)]] = 0.0
        if n > 2:
            x[1] = 2.0**-50  # bin 0, fast path (0 in float16)
            x[-1] = -0.0
        mixed.append(x.to(dtype))
        careful = x.clone()
        careful[0] = float("nan")  # the chunk (and the tensor's tail) takes the careful path
        if n > 1:
            careful[n // 2] = float("inf")
        careful_mixed.append(careful.to(dtype))
    tensors = [t.to(kernel_device) for t in all_zero + mixed + careful_mixed]

    stats = kernel_stats(tensors, kernel_device, **tiling)
    assert_matches_reference(stats, tensors)
    for i, t in enumerate(tensors):
        ref = reference_row(t)
        assert stats.zeros[i] == ref["zeros"], f"tensor {i}"
        np.testing.assert_array_equal(stats.hist[i], ref["hist"], err_msg=f"tensor {i}")
        assert stats.hist[i].sum() == t.numel() - ref["zeros"] - ref["nans"] - ref["infs"], f"tensor {i}"
    for i, n in enumerate(lengths):
        assert stats.zeros[i] == n and not stats.hist[i].any()
        assert stats.nans[2 * len(lengths) + i] == 1


# --------------------------------------------------------------------------------------
# Light rows: the light launch, and the gated launch that completes the tensors that trigger
# --------------------------------------------------------------------------------------

SCALARS = slice(0, layout.HIST)


def _light_and_full(tensors, device, inv_scale=None, **tiling) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``tensors`` (on ``device`` already) in one launch of each kind: (light, full)."""
    flats = [flat_elements(t) for t in tensors]
    scale = None if inv_scale is None else torch.tensor([inv_scale], dtype=torch.float32, device=device)
    light = triton_backend.triton_rows(flats, inv_scale=scale, histogram=False, **tiling)
    full = triton_backend.triton_rows(flats, inv_scale=scale, histogram=True, **tiling)
    return light, full


def _awkward(dtype, device, seed):
    """Awkward shapes, aligned and misaligned, none of which triggers its histogram."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(5, 123, 3), (1,), (257,), (0, 3), (33, 31), (700,)]
    tensors = [(torch.randn(shape, generator=g) * 1e-2).to(dtype).to(device) for shape in shapes]
    tensors[2][[0, 100]] = 0.0
    tensors += [(torch.randn(7, generator=g)).to(dtype).to(device) for _ in range(6)]
    tensors += [(torch.randn(n + 1, generator=g)).to(dtype).to(device)[1:] for n in (1001, 3, 300)]  # misaligned
    return tensors


@pytest.mark.parametrize("inv_scale", [None, 2.0**-20, 1 / 3], ids=["no_scale", "pow2", "third"])
@pytest.mark.parametrize("tiling", [SMALL_TILES, {}], ids=["small_tiles", "default_tiles"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_light_rows_equal_full_rows_on_every_scalar_column(kernel_device, dtype, tiling, inv_scale):
    """Without a histogram, every other column is the full launch's bit for bit (the same code
    computes it, in the same order), and a tensor that does not trigger has a histogram of
    NaN (``layout.NO_HISTOGRAM``) only, empty tensors included."""
    tensors = _awkward(dtype, kernel_device, seed=21)
    expected = tensors if inv_scale is None else [unscaled(t.cpu(), inv_scale) for t in tensors]
    assert not any(triggers_histogram(t) for t in expected)
    light, full = _light_and_full(tensors, kernel_device, inv_scale, **tiling)
    assert light[:, SCALARS].tobytes() == full[:, SCALARS].tobytes()
    assert np.isnan(light[:, layout.HIST :]).all()
    assert not layout.histogram_known(light).any()
    assert layout.histogram_known(full).all()
    assert_matches_reference(TensorStats.from_rows(full), expected)


TRIGGERS = {
    "nan": float("nan"),
    "inf": float("-inf"),
    "tiny": 2.0**-70,
    "huge": 2.0**60,
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("special", list(TRIGGERS))
def test_a_tensor_that_triggers_gets_exactly_its_full_row(kernel_device, special, dtype):
    """One NaN, Inf, tiny (2**-70) or huge (2**60) value in one chunk of a many-chunk tensor,
    launched among tensors that do not trigger (aligned and misaligned): that tensor's light
    row is its full row, histogram included, bit for bit; the others keep a NaN histogram and
    the full scalars. For float64, tiny and huge values do not take the careful path, yet
    trigger all the same. (float16 cannot hold 2**-70 or 2**60: an unscaling takes it there.)"""
    value, inv_scale = TRIGGERS[special], None
    if dtype == torch.float16 and special in ("tiny", "huge"):
        value, inv_scale = (2.0**-14, 2.0**-56) if special == "tiny" else (2.0**12, 2.0**48)
    chunk = SMALL_TILES["chunk_numel"]
    g = torch.Generator().manual_seed(22)

    def usual(count):  # magnitudes in [1/16, 16): usual, even unscaled by 2**-56 or 2**48
        signs = torch.randint(0, 2, (count,), generator=g) * 2.0 - 1.0
        return signs * torch.exp2(torch.rand(count, generator=g) * 8 - 4)

    x = usual(5 * chunk + 37)
    x[3 * chunk + 17] = value  # chunk 3 of 6
    tensors = [t.to(dtype).to(kernel_device) for t in (usual(300), usual(301), x, usual(700))]
    tensors[1] = tensors[1][1:]  # misaligned
    expected = tensors if inv_scale is None else [unscaled(t.cpu(), inv_scale) for t in tensors]
    assert [triggers_histogram(t) for t in expected] == [False, False, True, False]

    light, full = _light_and_full(tensors, kernel_device, inv_scale, **SMALL_TILES)
    assert light[2].tobytes() == full[2].tobytes()
    assert light[:, SCALARS].tobytes() == full[:, SCALARS].tobytes()
    assert layout.histogram_known(light).tolist() == [False, False, True, False]
    assert_matches_reference(TensorStats.from_rows(full), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_the_trigger_edges_are_the_layouts(kernel_device, dtype):
    """``layout.TINY_BELOW`` and ``layout.HUGE_FROM`` either side: a tensor's histogram is
    computed exactly when the rule (written out in ``stats_reference``) says it triggers."""

    def below(edge):  # the largest value of ``dtype`` below ``edge``
        return float(torch.nextafter(torch.tensor(edge, dtype=dtype), torch.tensor(0.0, dtype=dtype)))

    values = [
        layout.TINY_BELOW,
        -below(layout.TINY_BELOW),
        below(layout.HUGE_FROM),
        -layout.HUGE_FROM,
        float(torch.finfo(dtype).smallest_normal) * 0.5,  # subnormal: tiny
        0.0,
    ]
    g = torch.Generator().manual_seed(23)
    tensors = []
    for value in values:
        t = torch.randn(600, generator=g, dtype=torch.float64)
        t[450] = value
        tensors.append(t.to(dtype).to(kernel_device))
    expected = [triggers_histogram(t) for t in tensors]
    assert expected == [False, True, False, True, True, False]
    light, full = _light_and_full(tensors, kernel_device, **SMALL_TILES)
    assert layout.histogram_known(light).tolist() == expected
    assert light[:, SCALARS].tobytes() == full[:, SCALARS].tobytes()
    assert light[expected].tobytes() == full[expected].tobytes()


def _spy_on_buffers(monkeypatch):
    """Record every arrival-counter and trigger buffer the launcher hands the kernel."""
    from gradscope.kernels import launch as k

    seen = {"arrival": [], "triggers": []}
    for name, key in (("_arrival", "arrival"), ("_triggers", "triggers")):
        real = getattr(k, name)

        def spy(device, count, real=real, key=key):
            buffer = real(device, count)
            seen[key].append(buffer)
            return buffer

        monkeypatch.setattr(k, name, spy)
    return seen


def test_the_light_launch_flags_exactly_the_tensors_that_trigger(kernel_device):
    """The light launch alone: each tensor's trigger is 1 where a chunk of it triggers (one
    chunk or several), 0 elsewhere; its rows have NaN histograms, even where it triggers."""
    from gradscope.kernels import grad_stats as kernel
    from gradscope.kernels import launch as k

    g = torch.Generator().manual_seed(24)
    tensors = [torch.randn(n, generator=g) for n in (1000, 300, 1300, 5, 900)]
    tensors[0][700] = float("nan")
    tensors[2][[10, 300, 1290]] = torch.tensor([2.0**-70, float("inf"), 2.0**60])  # three chunks
    tensors[4][899] = 2.0**-100  # in the masked tail
    tensors = [t.to(kernel_device) for t in tensors]
    block, careful, chunk, final = (SMALL_TILES[key] for key in ("block", "careful_block", "chunk_numel", "final_rows"))
    numels = np.array([t.numel() for t in tensors], dtype=np.int64)
    addresses = np.array([t.data_ptr() for t in tensors], dtype=np.int64)
    table = k.work_table(addresses, numels, np.arange(len(tensors), dtype=np.int64), chunk)
    num_chunks = (table.size - 6 * len(tensors)) // 2
    out = torch.zeros((len(tensors), layout.ROW_WIDTH), dtype=torch.float64, device=kernel_device)
    arrival = torch.zeros(len(tensors), dtype=torch.int32, device=kernel_device)
    triggers = torch.zeros(len(tensors), dtype=torch.int32, device=kernel_device)
    partial = torch.empty((num_chunks, kernel.PARTIAL_WIDTH), dtype=torch.float32, device=kernel_device)
    constants, options = k.kernel_meta(
        torch.float32, aligned=True, scale=False, histogram=False, block=block, careful_block=careful,
        final_rows=final, num_warps=4,
    )  # fmt: skip
    with np.errstate(over="ignore", invalid="ignore"):
        kernel._grad_stats_kernel[(num_chunks,)](
            torch.from_numpy(table).to(kernel_device), partial, arrival, triggers, out, out, len(tensors),
            **constants, **options,
        )  # fmt: skip
    assert triggers.cpu().tolist() == [1, 0, 1, 0, 1]
    assert arrival.cpu().tolist() == [0] * len(tensors)
    assert np.isnan(out.cpu().numpy()[:, layout.HIST :]).all()


def test_a_launch_pair_leaves_its_buffers_zeroed(kernel_device, monkeypatch):
    """After a light launch and its gated launch, every trigger and arrival counter is zero
    again, ready for the next launch on the stream (on CUDA the buffers are reused); the
    light launch did set triggers (the gated launch completed those rows)."""
    seen = _spy_on_buffers(monkeypatch)
    g = torch.Generator().manual_seed(25)
    tensors = [torch.randn(n, generator=g) for n in (1000, 77, 2000)]
    tensors[0][5] = float("inf")
    tensors[2][1500] = 2.0**-80
    misaligned = torch.randn(601, generator=g)[1:]
    misaligned[300] = float("nan")
    tensors = [t.to(kernel_device) for t in [*tensors, misaligned]]
    light, full = _light_and_full(tensors, kernel_device, **SMALL_TILES)
    assert layout.histogram_known(light).tolist() == [True, False, True, True]
    assert light.tobytes() != full.tobytes() and light[[0, 2, 3]].tobytes() == full[[0, 2, 3]].tobytes()
    assert len(seen["triggers"]) == 2  # the aligned group's launch pair and the misaligned one's
    for buffer in seen["triggers"] + seen["arrival"]:
        assert not buffer.cpu().any(), buffer
