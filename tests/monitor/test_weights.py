"""Weight reading (``watch(..., compression=True)``, ``gradscope.monitor.weights``) in real runs.

What the run records is checked against float64 references computed here from the weights
and gradients just before each ``optimizer.step()``: the weights' statistics rows (exact
counts, maximum and histogram; sums to float64 rounding), ``Σ g·w`` and ``Σ (g·w)²`` per
tensor; only sampled steps are read; the run log carries the same readings and the same
report; a failing read leaves training and the gradient statistics alone.
"""

import json

import numpy as np
import pytest
import torch

import gradscope
from gradscope.stats import layout


class BeforeStep:
    """Copies every weight and gradient just before ``optimizer.step()`` (a pre-hook
    registered first, so it runs before gradscope's), keyed by call number."""

    def __init__(self, optimizer, model):
        self.model, self.seen = model, []
        optimizer.register_step_pre_hook(self._hook)

    def _hook(self, optimizer, args, kwargs):
        self.seen.append([(p.detach().clone(), p.grad.detach().clone()) for p in self.model.parameters()])


def model_and_optimizer(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    return model, torch.optim.SGD(model.parameters(), lr=0.05)


def train(model, opt, mon, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        loss = model(torch.randn(32, 6, generator=g)).square().mean()
        opt.zero_grad()
        loss.backward()
        mon.step(loss)
        opt.step()


def test_readings_match_float64_references_on_sampled_steps_only(tmp_path):
    model, opt = model_and_optimizer()
    before = BeforeStep(opt, model)
    seen = []
    with gradscope.watch(model, every=2, optimizer=opt, compression=True, log_dir=tmp_path / "run") as mon:
        original = mon._run.apply

        def spy(record):
            if type(record).__name__ == "Weights":
                seen.append(record)
            original(record)

        mon._run.apply = spy
        train(model, opt, mon, 5)
    assert [r.step for r in seen] == [0, 2, 4]
    for record in seen:
        tensors = before.seen[record.step]
        for t, (w, g) in enumerate(tensors):
            w64, g64 = w.double(), g.double()
            row = record.rows[t]
            assert row[layout.NUMEL] == w.numel() and row[layout.MAX_ABS] == float(w.abs().max())
            assert row[layout.SUMSQ] == pytest.approx(float((w64**2).sum()), rel=1e-12)
            exponents = np.frexp(w64.abs().numpy().ravel())[1] - 1
            expected = np.bincount(np.clip(exponents - layout.HIST_MIN_EXPONENT, 0, 63), minlength=64)
            assert (row[layout.HIST :] == expected).all()
            assert record.grad_dot_weight[t] == pytest.approx(float((g64 * w64).sum()), rel=1e-5, abs=1e-9)
            assert record.grad_weight_sq[t] == pytest.approx(float(((g64 * w64) ** 2).sum()), rel=1e-5)
        assert record.row_of.tolist() == [0, 0, 1, 1] and record.ndim.tolist() == [2, 1, 2, 1]
    live = mon.report()
    fisher = [
        sum(float(((g.double() * w.double()) ** 2).sum()) for w, g in before.seen[s][2 * r : 2 * r + 2])
        for r in range(2)
        for s in (0, 2, 4)
    ]
    assert live.compression.layers[0].fisher == pytest.approx(sum(fisher[:3]), rel=1e-5)
    assert live.compression.readings == 3 and live.compression.step == 4
    loaded = gradscope.load_run(tmp_path / "run").report()
    assert json.dumps(loaded.to_dict()["compression"]) == json.dumps(live.to_dict()["compression"])


def test_compression_needs_an_optimizer_and_a_bool():
    model, _ = model_and_optimizer()
    with pytest.raises(ValueError, match="compression=True needs optimizer="):
        gradscope.watch(model, compression=True)
    with pytest.raises(TypeError, match="compression must be True or False"):
        gradscope.watch(model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), compression="yes")


def test_report_without_compression_has_none():
    model, opt = model_and_optimizer()
    with gradscope.watch(model, optimizer=opt) as mon:
        train(model, opt, mon, 2)
    assert mon.report().compression is None and mon.report().to_dict()["compression"] is None


def test_a_failing_read_costs_its_reading_only(monkeypatch):
    model, opt = model_and_optimizer()
    with gradscope.watch(model, optimizer=opt, compression=True) as mon:
        import gradscope.monitor.weights as weights

        real = weights._taylor_terms
        calls = {"n": 0}

        def flaky(params):
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("boom")
            return real(params)

        monkeypatch.setattr(weights, "_taylor_terms", flaky)
        with pytest.warns(gradscope.GradscopeWarning, match="reading the weights failed"):
            train(model, opt, mon, 4)
    assert mon.report().compression.readings == 3
    assert len(mon.history("norm").steps) == 4  # every gradient statistic stands
    assert any("reading the weights failed (RuntimeError: boom)" in e for e in mon.errors)


def test_gradient_accumulation_reads_the_accumulated_gradient():
    model, opt = model_and_optimizer()
    before = BeforeStep(opt, model)
    got = []
    with gradscope.watch(model, optimizer=opt, compression=True, accumulation_steps=2) as mon:
        original = mon._run.apply
        mon._run.apply = lambda r: (got.append(r) if type(r).__name__ == "Weights" else None, original(r))
        g = torch.Generator().manual_seed(3)
        for _ in range(2):
            opt.zero_grad()
            for _ in range(2):
                model(torch.randn(8, 6, generator=g)).square().mean().backward()
            mon.step()
            opt.step()
    for record in got:
        (w, grad) = before.seen[record.step][0]
        assert record.grad_dot_weight[0] == pytest.approx(float((grad.double() * w.double()).sum()), rel=1e-5)


def test_kernel_path_rows_equal_the_cpu_kernels_rows(kernel_device):
    """backend="triton": the weights are read by the Triton kernels into a device buffer (on
    CUDA: pinned copy and an event; here possibly Triton's CPU interpreter), the same rows as
    the NumPy kernel's and the same Taylor terms."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 2)).to(kernel_device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = BeforeStep(opt, model)
    got = []
    with gradscope.watch(model, optimizer=opt, compression=True, backend="triton") as mon:
        original = mon._run.apply
        mon._run.apply = lambda r: (got.append(r) if type(r).__name__ == "Weights" else None, original(r))
        train_on(model, opt, mon, 2, kernel_device)
    assert [r.step for r in got] == [0, 1]
    for record in got:
        tensors = before.seen[record.step]
        reference = gradscope.grad_stats([w.cpu() for w, _ in tensors], backend="numpy").to_rows()
        exact = [layout.NUMEL, layout.MAX_ABS, layout.ZEROS, layout.NANS, layout.INFS]
        assert (record.rows[:, exact] == reference[:, exact]).all()
        assert (record.rows[:, layout.HIST :] == reference[:, layout.HIST :]).all()
        assert record.rows[:, layout.SUMSQ] == pytest.approx(reference[:, layout.SUMSQ], rel=1e-6)
        dots = [float((g.double() * w.double()).sum()) for w, g in tensors]
        assert record.grad_dot_weight == pytest.approx(dots, rel=1e-5, abs=1e-9)


def train_on(model, opt, mon, steps, device):
    g = torch.Generator().manual_seed(4)
    for _ in range(steps):
        loss = model(torch.randn(8, 5, generator=g).to(device)).square().mean()
        opt.zero_grad()
        loss.backward()
        mon.step(loss)
        opt.step()


def test_sparse_gradients_are_read():
    torch.manual_seed(0)
    model = torch.nn.Embedding(50, 4, sparse=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = BeforeStep(opt, model)
    got = []
    with gradscope.watch(model, optimizer=opt, compression=True) as mon:
        original = mon._run.apply
        mon._run.apply = lambda r: (got.append(r) if type(r).__name__ == "Weights" else None, original(r))
        loss = model(torch.tensor([1, 2, 2, 7])).square().sum()
        opt.zero_grad()
        loss.backward()
        mon.step(loss)
        opt.step()
    ((w, g),) = before.seen[0]
    assert g.is_sparse
    dense = g.to_dense().double()
    assert got[0].grad_dot_weight[0] == pytest.approx(float((dense * w.double()).sum()), rel=1e-6)
    assert got[0].grad_weight_sq[0] == pytest.approx(float(((dense * w.double()) ** 2).sum()), rel=1e-6)


def test_taylor_terms_in_pieces_equal_the_whole(monkeypatch):
    from gradscope.monitor import weights

    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(1000))
    p.grad = torch.randn(1000)
    whole = weights._taylor_terms([p])
    monkeypatch.setattr(weights, "TAYLOR_CHUNK", 64)  # 16 pieces, the last one short
    pieces = weights._taylor_terms([p])
    reference = (p.grad.double() * p.detach().double()).sum(), ((p.grad.double() * p.detach().double()) ** 2).sum()
    assert pieces[0, 0] == pytest.approx(float(reference[0]), rel=1e-5)
    assert pieces[0, 1] == pytest.approx(float(reference[1]), rel=1e-5)
    assert torch.allclose(whole, pieces, rtol=1e-5)


def test_taylor_terms_of_float64_parameters_are_float64_and_no_gradient_gives_zeros():
    from gradscope.monitor import weights

    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(300, dtype=torch.float64) * 1e3)
    p.grad = torch.randn(300, dtype=torch.float64) * 1e-3
    p.grad[0] = 1e-12  # a term float32 products would round differently
    frozen = torch.nn.Parameter(torch.randn(5))
    terms = weights._taylor_terms([p, frozen])
    product = p.grad * p.detach()
    assert terms[0, 0] == product.sum() and terms[0, 1] == torch.dot(product, product)
    assert terms[1].tolist() == [0.0, 0.0] and terms.dtype == torch.float64
    assert weights._taylor_terms([]).shape == (0, 2)
