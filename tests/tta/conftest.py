"""Every test here runs tiny models on one thread."""

import pytest


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny models: one thread is fastest on shared CPUs."""
