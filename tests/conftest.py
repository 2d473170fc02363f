"""Fixtures shared by several test files."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run many small steps: on shared cores, intra-op thread hand-offs cost more
    than the arithmetic (measured: 0.6 ms per decode step on 1 thread, 15-35 ms on 2)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
