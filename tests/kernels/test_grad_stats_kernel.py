"""The Triton kernel against the float64 reference.

Without CUDA these run in Triton's interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1), with tiny tiles so small inputs still span many chunks, both kernel
paths and several steps of the final reduction. With CUDA they run the compiled kernel.
"""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import requires_cuda
from hypothesis import given, settings
from hypothesis import strategies as st
from stats_reference import assert_matches_reference, reference_row, unscaled
from tensor_strategies import gradient_tensors, many_small_and_a_few_large

from gradscope import TensorStats
from gradscope.stats import layout, triton_backend
from gradscope.stats.inputs import flat_elements

SMALL_TILES = {"block": 64, "careful_block": 16, "chunk_numel": 256, "final_rows": 4}


def kernel_stats(tensors, device, inv_scale=None, **tiling) -> TensorStats:
    flats = [flat_elements(t.to(device)) for t in tensors]
    scale = None if inv_scale is None else torch.tensor([inv_scale], dtype=torch.float32, device=device)
    return TensorStats.from_rows(triton_backend.triton_rows(flats, inv_scale=scale, **tiling))


@settings(max_examples=60)
@given(st.lists(gradient_tensors(max_numel=1500), min_size=1, max_size=4))
def test_matches_reference_small_tiles(kernel_device, tensors):
    assert_matches_reference(kernel_stats(tensors, kernel_device, **SMALL_TILES), tensors)


@settings(max_examples=15)
@given(many_small_and_a_few_large(large_numel=1500))
def test_many_small_tensors_around_large_ones(kernel_device, tensors):
    """Mixed dtypes: one launch per dtype, all writing into one output buffer."""
    assert_matches_reference(kernel_stats(tensors, kernel_device, **SMALL_TILES), tensors)


@settings(max_examples=20)
@given(st.lists(gradient_tensors(max_numel=3000), min_size=1, max_size=3))
def test_matches_reference_default_tiles(kernel_device, tensors):
    assert_matches_reference(kernel_stats(tensors, kernel_device), tensors)


@settings(max_examples=20)
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
    from gradscope.kernels import grad_stats as k

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
    from gradscope.kernels import grad_stats as k

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


def _kernel_static():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "kernel_static.py"
    spec = importlib.util.spec_from_file_location("kernel_static", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


REGISTER_BUDGET = {True: 128, False: 255}
"""Registers per thread, by 16-byte alignment: aligned variants (every real gradient) fit
four 4-warp programs per SM (64 KB of 4-byte registers each); misaligned ones (scalar
loads, rare) stay within the hardware's 255. No variant may spill."""


@pytest.mark.parametrize(
    "variant",
    _kernel_static().variants([90]),
    ids=lambda v: f"{v['dtype']}-scale{v['scale']:d}-aligned{v['aligned']:d}",
)
def test_every_launched_variant_compiles_for_sm90_within_the_register_budget(variant, tmp_path):
    """Each variant the launcher launches (dtype x GradScaler x alignment, with its real
    tile sizes and options, and the one-tensor launch not specialised into a constant) lowers
    to sm_90 machine code within the register budget and without spills: proven on machines
    without a GPU, where the interpreter cannot catch compile-time errors."""
    pytest.importorskip("triton.backends.nvidia")
    static = _kernel_static()
    try:
        static.cuobjdump()
    except SystemExit:
        pytest.skip("Triton ships no cuobjdump here")
    report = static.analyse(variant, sys.executable, tmp_path)
    assert "error" not in report, report.get("error")
    assert report["spills"] == 0, report
    assert 0 < report["registers"] <= REGISTER_BUDGET[variant["aligned"]], report
    assert "num_tensors" in report["do_not_specialize"]  # a one-tensor launch compiles the same kernel
    if variant["aligned"]:
        assert report["loop_loads"] >= 1 and report["load_bytes_per_thread"] >= 32, report
    assert report["final_steps_262m"] <= 32, report


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
