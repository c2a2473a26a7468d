"""Which backend reads a tensor (``gradscope.stats.dispatch``): ``engine_for`` and ``check_backend``.

``triton_backend.serves`` is monkeypatched to decide for the rule independently of the
machine; a ``torch.device("cuda", 0)`` is only constructed, never used, so no GPU is needed.
"""

import pytest
import torch

import gradscope
from gradscope.stats import host_backend, host_kernels, triton_backend
from gradscope.stats.dispatch import BACKENDS, check_backend, engine_for, is_host

CPU = torch.device("cpu")
CUDA0 = torch.device("cuda", 0)
META = torch.device("meta")


def serving(monkeypatch, answer: bool) -> list:
    """Make ``triton_backend.serves`` answer ``answer``; returns the devices it was asked about."""
    asked = []

    def serves(device):
        asked.append(device)
        return answer

    monkeypatch.setattr(triton_backend, "serves", serves)
    return asked


def test_backends_are_the_four_documented_names():
    assert BACKENDS == ("auto", "triton", "numba", "numpy")


def needs_numba():
    if not host_backend.kernel_available("numba"):
        pytest.skip(f"numba cannot run here: {host_backend.why_unavailable('numba')}")


def test_auto_reads_cpu_tensors_with_numba_when_it_is_installed():
    needs_numba()
    assert engine_for(CPU, "auto") == "numba"
    assert is_host("numba") and is_host("numpy") and not is_host(CPU)


def test_auto_reads_cpu_tensors_with_numpy_when_numba_cannot_run(monkeypatch):
    needs_numba()
    monkeypatch.setitem(host_kernels._broken, "numba", "ImportError: pretend numba is missing")
    assert engine_for(CPU, "auto") == "numpy"


def test_numba_without_numba_is_an_error_that_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(host_kernels._broken, "numba", "ImportError: No module named 'numba'")
    with pytest.raises(ValueError, match=r"backend='numba' needs the numba package.*gradscope\[numba\].*No module"):
        engine_for(CPU, "numba", caller="watch")


@pytest.mark.parametrize("device", [CPU, CUDA0, META], ids=str)
@pytest.mark.parametrize("answer", [True, False])
def test_numpy_is_always_numpy_without_asking_triton(monkeypatch, device, answer):
    asked = serving(monkeypatch, answer)
    assert engine_for(device, "numpy") == "numpy"
    assert engine_for(device, "numpy", "tensor 2", caller="watch") == "numpy"
    assert asked == []  # "numpy" never depends on whether Triton could run


def test_auto_reads_cpu_tensors_on_the_cpu_even_when_triton_serves_the_cpu(monkeypatch):
    asked = serving(monkeypatch, True)  # as under TRITON_INTERPRET=1
    assert engine_for(CPU, "auto") == host_backend.fastest_kernel()
    assert asked == [CPU]


def test_auto_reads_cpu_tensors_on_the_cpu_in_this_session():
    assert engine_for(CPU, "auto") == host_backend.fastest_kernel()


def test_auto_gives_the_cuda_device_when_triton_serves_it(monkeypatch):
    serving(monkeypatch, True)
    engine = engine_for(CUDA0, "auto")
    assert isinstance(engine, torch.device)
    assert engine == CUDA0
    assert engine.index == 0


def test_auto_falls_back_to_the_cpu_for_cuda_when_triton_does_not_serve_it(monkeypatch):
    serving(monkeypatch, False)
    assert engine_for(CUDA0, "auto") == host_backend.fastest_kernel()


def test_auto_with_cuda_tensors_and_no_triton_says_how_to_install_it(monkeypatch):
    """Not a silent host fallback: that would copy every gradient to the host every step."""
    monkeypatch.setattr(triton_backend, "triton_importable", lambda: False)
    with pytest.raises(ValueError) as raised:
        engine_for(CUDA0, "auto", "parameters", caller="watch")
    message = str(raised.value)
    assert message.startswith("watch: parameters on cuda:0 need gradscope's Triton kernels. Triton is not installed")
    assert "pip install triton" in message and "backend='numpy'" in message
    # CPU tensors never needed Triton: auto reads them with a CPU kernel, no error.
    assert engine_for(CPU, "auto") == host_backend.fastest_kernel()
    assert engine_for(META, "auto") == host_backend.fastest_kernel()
    assert engine_for(CUDA0, "numpy") == "numpy"


def test_auto_never_sends_other_device_types_to_triton(monkeypatch):
    serving(monkeypatch, True)
    assert engine_for(META, "auto") == host_backend.fastest_kernel()


@pytest.mark.parametrize("device", [CPU, CUDA0], ids=str)
def test_triton_gives_the_device_when_served(monkeypatch, device):
    serving(monkeypatch, True)
    engine = engine_for(device, "triton", "tensor 0")
    assert isinstance(engine, torch.device)
    assert engine == device


def test_triton_that_cannot_run_names_caller_tensor_device_and_why(monkeypatch):
    serving(monkeypatch, False)
    monkeypatch.setattr(triton_backend, "triton_importable", lambda: True)
    with pytest.raises(ValueError) as raised:
        engine_for(CPU, "triton", "tensor 3 ('fc.weight')", caller="my_caller")
    message = str(raised.value)
    assert message.startswith("my_caller: backend='triton' cannot read tensor 3 ('fc.weight') on cpu: ")
    assert "TRITON_INTERPRET=1" in message  # the reason for a CPU tensor: how to make it work


def test_triton_error_defaults_name_grad_stats_and_a_tensor(monkeypatch):
    serving(monkeypatch, False)
    with pytest.raises(ValueError, match=r"^grad_stats: backend='triton' cannot read a tensor on cpu: \S"):
        engine_for(CPU, "triton")


@pytest.mark.parametrize(
    ("device", "importable", "reason"),
    [
        (CPU, False, "Triton is not installed"),
        (CUDA0, False, "Triton is not installed"),
        (CPU, True, "Triton reads CPU tensors only in its interpreter"),
        (CUDA0, True, "imported in Triton's interpreter"),
        (META, True, "Triton has no kernels for meta tensors"),
    ],
    ids=["cpu-no-triton", "cuda-no-triton", "cpu", "cuda", "meta"],
)
def test_triton_error_reason_per_device(monkeypatch, device, importable, reason):
    serving(monkeypatch, False)
    monkeypatch.setattr(triton_backend, "triton_importable", lambda: importable)
    with pytest.raises(ValueError, match=f"watch: backend='triton' cannot read parameters on {device}: .*{reason}"):
        engine_for(device, "triton", "parameters", caller="watch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_check_backend_accepts_the_known_names(backend):
    assert check_backend(backend, "somebody") is None


@pytest.mark.parametrize("backend", ["cupy", "Triton", "NUMPY", "", None])
def test_check_backend_rejects_unknown_names_naming_the_caller(backend):
    expected = f"some_caller: backend must be one of ('auto', 'triton', 'numba', 'numpy'), got {backend!r}"
    with pytest.raises(ValueError) as raised:
        check_backend(backend, "some_caller")
    assert str(raised.value) == expected


def test_watch_with_triton_that_cannot_run_raises_like_grad_stats(monkeypatch):
    """One rule for both entry points: the same check, naming each its own caller."""
    serving(monkeypatch, False)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"^watch: backend='triton' cannot read parameters on cpu: \S"):
        gradscope.watch(model, backend="triton")
    with pytest.raises(ValueError, match=r"^grad_stats: backend='triton' cannot read tensor 0 on cpu: \S"):
        gradscope.grad_stats([torch.ones(2)], backend="triton")
    # The failed watch left no hooks behind and does not count as watching the model.
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())
    with gradscope.watch(model, backend="numpy") as mon:
        assert list(mon._engines.captures) == ["numpy"]


def test_watch_auto_puts_cpu_parameters_on_numpy_even_when_triton_serves_the_cpu(monkeypatch):
    serving(monkeypatch, True)
    with gradscope.watch(torch.nn.Linear(3, 2), backend="auto") as mon:
        assert list(mon._engines.captures) == [host_backend.fastest_kernel()]
