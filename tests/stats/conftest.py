"""Fixtures shared by the statistics tests: each CPU kernel, and work items small enough for
small test tensors to take every path of the CPU backend."""

import pytest

from gradscope.stats import host_backend, numpy_kernels


@pytest.fixture(params=host_backend.KERNELS)
def kernel(request):
    """Each CPU kernel; numba's skips only where numba is not installed (a kernel that is
    installed but was found broken fails here, not skips)."""
    if request.param == "numba":
        pytest.importorskip("numba", reason="numba is not installed (pip install 'gradscope[numba]')")
        assert host_backend.kernel_available("numba"), host_backend.why_unavailable("numba")
    return request.param


@pytest.fixture
def small_work_items(monkeypatch):
    """Shrink work items so small test tensors take every code path: slices of one tensor
    (512 elements each), packs of many (tensors under 96 elements), paired bin counting and
    several threads."""
    monkeypatch.setattr(host_backend, "CHUNK", 512)
    monkeypatch.setattr(host_backend, "PACK_BELOW", 96)
    monkeypatch.setattr(host_backend, "PARALLEL_ABOVE", 600)
    monkeypatch.setattr(numpy_kernels, "PAIRS_FROM", 128)
