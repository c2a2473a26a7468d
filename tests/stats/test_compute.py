"""The public entry point: inputs as users pass them, backend choice, errors."""

import warnings

import numpy as np
import pytest
import torch
from stats_reference import assert_matches_reference

import gradscope
from gradscope.stats import compute, host_backend, triton_backend


def trained_mlp_gradients():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    loss = torch.nn.functional.cross_entropy(model(torch.randn(64, 16)), torch.randint(0, 4, (64,)))
    loss.backward()
    return model


def test_module_input_real_gradients():
    model = trained_mlp_gradients()
    stats = gradscope.grad_stats(model)
    assert stats.names == ("0.weight", "0.bias", "2.weight", "2.bias")
    grads = [p.grad for p in model.parameters()]
    assert_matches_reference(stats, grads)
    expected_total = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"), norm_type=2.0)
    assert stats.total_norm == pytest.approx(float(expected_total), rel=1e-6)


def test_list_tuple_generator_and_single_tensor_agree():
    x, y = torch.randn(10), torch.randn(3, 3)
    rows = gradscope.grad_stats([x, y]).to_rows()
    np.testing.assert_array_equal(gradscope.grad_stats((x, y)).to_rows(), rows)
    np.testing.assert_array_equal(gradscope.grad_stats(t for t in (x, y)).to_rows(), rows)
    np.testing.assert_array_equal(gradscope.grad_stats(x).to_rows(), rows[:1])


def test_empty_list_and_empty_tensors():
    assert len(gradscope.grad_stats([])) == 0
    stats = gradscope.grad_stats([torch.empty(0), torch.empty(3, 0, dtype=torch.bfloat16)])
    assert (stats.to_rows() == 0).all()


def test_sparse_embedding_gradient_equals_its_dense_form():
    embedding = torch.nn.Embedding(50, 8, sparse=True)
    embedding(torch.tensor([1, 1, 7, 30])).sum().backward()
    grad = embedding.weight.grad
    assert grad.is_sparse
    stats = gradscope.grad_stats([grad])
    dense = gradscope.grad_stats([grad.to_dense()])
    np.testing.assert_array_equal(stats.hist, dense.hist)
    assert stats.zeros[0] == dense.zeros[0] == 47 * 8
    assert stats.numel[0] == 400
    assert stats.sumsq[0] == pytest.approx(dense.sumsq[0])


def test_auto_uses_numpy_for_cpu_tensors(monkeypatch):
    """Recorded, not raised: grad_stats turns a kernel failure into a NumPy fallback, so a spy
    that raised would be swallowed. A call to the kernels here is a failure of this test."""
    calls = []

    def spy(flats, **kwargs):
        calls.append(len(flats))
        raise RuntimeError("auto sent CPU tensors to Triton")

    monkeypatch.setattr(triton_backend, "triton_rows", spy)
    monkeypatch.setattr(compute, "_warned_fallback", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback warning would mean the kernels were tried
        stats = gradscope.grad_stats([torch.randn(5)])
    assert calls == []
    assert int(stats.numel[0]) == 5


def test_triton_backend_on_cpu_tensors_in_the_interpreter(kernel_device):
    if kernel_device != "cpu":
        pytest.skip("kernels are compiled for CUDA in this session")
    tensors = [torch.randn(300), torch.randn(20, dtype=torch.float16)]
    triton_rows = gradscope.grad_stats(tensors, backend="triton").to_rows()
    numpy_rows = gradscope.grad_stats(tensors, backend="numpy").to_rows()
    np.testing.assert_array_equal(triton_rows[:, gradscope.layout.HIST :], numpy_rows[:, gradscope.layout.HIST :])
    np.testing.assert_allclose(triton_rows, numpy_rows, rtol=1e-6)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        gradscope.grad_stats([torch.ones(1)], backend="cupy")


def test_bad_inputs_name_index_and_dtype():
    with pytest.raises(TypeError, match=r"tensor 1 has dtype torch\.int64"):
        gradscope.grad_stats([torch.ones(2), torch.ones(2, dtype=torch.int64)])
    with pytest.raises(TypeError, match=r"tensor 0 has dtype torch\.bool"):
        gradscope.grad_stats([torch.ones(2, dtype=torch.bool)])
    with pytest.raises(ValueError, match="tensor 0 is on the 'meta' device"):
        gradscope.grad_stats([torch.ones(2, device="meta")])
    with pytest.raises(TypeError, match="tensor 1 is NoneType"):
        gradscope.grad_stats([torch.ones(2), None])


def test_explicit_triton_that_cannot_run_raises(monkeypatch):
    monkeypatch.setattr(triton_backend, "serves", lambda device: False)
    with pytest.raises(ValueError, match="backend='triton' cannot read tensor 0"):
        gradscope.grad_stats([torch.ones(2)], backend="triton")


@pytest.mark.parametrize("histogram", [True, False])
def test_auto_falls_back_to_the_cpu_when_the_kernels_fail(monkeypatch, histogram):
    """A Triton failure never stops training under backend='auto': one warning, CPU numbers
    (light ones when light statistics were asked for)."""
    # Pretend the kernels serve the CPU tensor, then make them fail.
    monkeypatch.setattr(compute, "engine_for", lambda device, backend, what, caller="grad_stats": device)
    monkeypatch.setattr(compute, "_warned_fallback", False)

    def broken(flats, **tiling):
        raise RuntimeError("no kernel image for this GPU")

    monkeypatch.setattr(triton_backend, "triton_rows", broken)
    x = [torch.randn(100)]
    with pytest.warns(RuntimeWarning, match="falling back to a CPU kernel"):
        stats = gradscope.grad_stats(x, histogram=histogram)
    cpu = gradscope.grad_stats(x, backend=host_backend.fastest_kernel(), histogram=histogram)
    np.testing.assert_array_equal(stats.to_rows(), cpu.to_rows())
    assert stats.hist_known[0] == histogram
    with pytest.raises(RuntimeError, match="no kernel image"):
        gradscope.grad_stats(x, backend="triton")


def test_does_not_modify_or_require_grad_inputs():
    x = torch.randn(50, requires_grad=True)
    before = x.detach().clone()
    gradscope.grad_stats([x])
    assert torch.equal(x.detach(), before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mixed_devices_and_dtypes_in_one_call():
    tensors = [torch.randn(1000, device="cuda"), torch.randn(10), torch.randn(500, device="cuda", dtype=torch.bfloat16)]
    assert_matches_reference(gradscope.grad_stats(tensors), tensors)


def light_inputs() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    loud = torch.randn(300, generator=g)
    loud[7] = float("nan")
    tiny = torch.randn(20, generator=g, dtype=torch.float64) * 1e-3
    tiny[3] = 2.0**-80
    return [torch.randn(3000, generator=g), loud, torch.randn(4, 5, generator=g).to(torch.bfloat16), tiny]


def test_light_statistics_on_each_cpu_kernel(kernel):
    """histogram=False: every field but the histogram as histogram=True gives it, bit for bit;
    the histograms of the tensors that trigger (a NaN, a value 2**-80) and no others."""
    tensors = light_inputs()
    light = gradscope.grad_stats(tensors, backend=kernel, histogram=False)
    full = gradscope.grad_stats(tensors, backend=kernel)
    assert light.hist_known.tolist() == [False, True, False, True]
    assert full.hist_known.all()
    for name in gradscope.layout.SCALAR_FIELDS:
        np.testing.assert_array_equal(getattr(light, name), getattr(full, name), err_msg=name)
    np.testing.assert_array_equal(light.hist[light.hist_known], full.hist[light.hist_known])
    assert (light.hist[~light.hist_known] == 0).all()
    model = trained_mlp_gradients()
    named = gradscope.grad_stats(model, backend=kernel, histogram=False)
    assert named.names == ("0.weight", "0.bias", "2.weight", "2.bias")
    assert not named.hist_known.any()


def test_light_statistics_reach_the_triton_backend(monkeypatch):
    """grad_stats hands ``histogram`` to the kernels (here a stand-in serving CPU tensors)."""
    monkeypatch.setattr(compute, "engine_for", lambda device, backend, what, caller="grad_stats": device)
    asked = []

    def kernels(flats, inv_scale=None, histogram=True, **tiling):
        asked.append(histogram)
        return host_backend.host_rows([flat.values for flat in flats], "numpy", histogram=histogram)

    monkeypatch.setattr(triton_backend, "triton_rows", kernels)
    stats = gradscope.grad_stats(light_inputs(), histogram=False)
    assert asked == [False]
    assert stats.hist_known.tolist() == [False, True, False, True]


def test_triton_light_rows_in_the_interpreter_are_the_cpu_light_rows(kernel_device):
    if kernel_device != "cpu":
        pytest.skip("kernels are compiled for CUDA in this session")
    tensors = [*light_inputs(), torch.randn(20, dtype=torch.float16), torch.empty(0)]
    triton = gradscope.grad_stats(tensors, backend="triton", histogram=False)
    numpy = gradscope.grad_stats(tensors, backend="numpy", histogram=False)
    np.testing.assert_array_equal(triton.hist_known, numpy.hist_known)
    np.testing.assert_array_equal(triton.hist, numpy.hist)
    for name in ("numel", "max_abs", "zeros", "nans", "infs"):
        np.testing.assert_array_equal(getattr(triton, name), getattr(numpy, name), err_msg=name)
    np.testing.assert_allclose(triton.sumsq, numpy.sumsq, rtol=1e-6)


def test_parameters_stand_for_their_gradients_as_in_clip_grad_norm():
    """``grad_stats(model.parameters())`` is what users pass (as to ``clip_grad_norm_``): it must
    measure the gradients, never the weights."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    frozen = torch.nn.Parameter(torch.ones(3))  # no gradient: skipped, as clip_grad_norm_ does
    (model(torch.randn(4, 8)) * 1000).square().mean().backward()
    reference = torch.nn.utils.clip_grad_norm_([*model.parameters(), frozen], float("inf"))
    for given in (model.parameters(), [*model.parameters(), frozen]):
        stats = gradscope.grad_stats(given)
        assert len(stats) == 4
        assert float(np.sqrt(stats.sumsq.sum())) == pytest.approx(float(reference), rel=1e-6)
    weights = [p.detach() for p in model.parameters()]  # the values, when that is what is wanted
    expected = float(torch.sqrt(sum(w.double().square().sum() for w in weights)))
    assert float(np.sqrt(gradscope.grad_stats(weights).sumsq.sum())) == pytest.approx(expected, rel=1e-6)
    single = next(model.parameters())
    np.testing.assert_array_equal(gradscope.grad_stats(single).to_rows(), gradscope.grad_stats(single.grad).to_rows())
    # activations (non-leaf tensors that require grad) are measured as they are
    hidden = model[0](torch.ones(1, 8))
    assert gradscope.grad_stats([hidden]).numel.tolist() == [16]
