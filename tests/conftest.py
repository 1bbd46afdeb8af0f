"""Suite-wide setup: import kimitune before torch so its OpenMP settings apply to every test."""

import kimitune  # noqa: F401  (sets OpenMP's spin count before torch starts its thread pool)

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: each op is microseconds of work, and a second intra-op thread only adds synchronisation, which
    stalls whenever the other core is busy. Modules opt in with ``pytestmark = pytest.mark.usefixtures(...)``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
