"""Suite-wide settings: every test runs with one torch thread.

Equality tests compare runs made in this process with runs made in subprocesses started with
OMP_NUM_THREADS=1; a different thread count changes float summation order, so a test that
wants more threads must not leak its setting to the tests after it.
"""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)
