"""Shared by the tests of acting on findings."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """The small models these tests train run fastest on one thread, above all on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
