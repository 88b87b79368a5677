"""An autouse fixture for tests of tiny models: run torch on one thread.

Import it into a test module (`from tests.single_thread import one_torch_thread`) to apply
it there. Small matmuls and convs gain nothing from splitting across threads, and on a
loaded 2-core machine two threads made the quantization tests 3x (training 7x) slower.
"""

import contextlib

import pytest
import torch


@contextlib.contextmanager
def single_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def one_torch_thread():
    with single_thread():
        yield
