"""Shared by the tests of acting on findings."""

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here trains small models: one thread (tests/conftest.py's ``one_thread``)."""
