"""Suite-wide settings: every test runs with one torch thread; the shared golden step fixture.

Equality tests compare runs made in this process with runs made in subprocesses started with
OMP_NUM_THREADS=1; a different thread count changes float summation order, so a test that
wants more threads must not leak its setting to the tests after it.
"""

import os

os.environ["PATCHSAE_CHECK_SHAPES"] = "1"  # before patchsae is imported: see patchsae.shapes

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from assets import GOLDEN_STEP


@pytest.fixture(autouse=True)
def one_torch_thread():
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    """Every tensor of the golden step file recorded from the original PatchSAE code."""
    if not GOLDEN_STEP.is_file():
        pytest.skip(f"golden file {GOLDEN_STEP} is absent")
    return load_file(GOLDEN_STEP)
