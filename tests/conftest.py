"""Test set-up shared by every test module.

Without CUDA, the Triton kernels are tested in Triton's CPU interpreter: TRITON_INTERPRET
must be set before ``gradscope.kernels`` is first imported, which is why it is set here, at
collection time. With CUDA (a GPU machine), the kernels are compiled and tested on the GPU.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

settings.register_profile(
    "ci",
    deadline=None,
    max_examples=60,
    # Our function-scoped fixtures (monkeypatched constants, the kernel device) are the same
    # for every generated example, so sharing them across examples is intended.
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def kernel_device() -> str:
    """Where the Triton kernels run in this session: CUDA if compiled, CPU if interpreted."""
    from gradscope.stats import triton_backend

    if not triton_backend.triton_importable():
        pytest.skip("Triton is not installed")
    return "cpu" if triton_backend.kernels().is_interpreted() else "cuda"


@pytest.fixture
def one_thread():
    """The small models many tests train run fastest on one thread, above all on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
