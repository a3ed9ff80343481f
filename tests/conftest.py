"""Suite-wide settings: every test runs with one torch thread and with the jaxtyping shape
annotations checked (``patchsae.shapes``); the shared golden step fixture; under ``CI=true`` a
missing ../shared fails the run instead of skipping the tests that need it.

Equality tests compare runs made in this process with runs made in subprocesses started with
OMP_NUM_THREADS=1; a different thread count changes float summation order, so a test that
wants more threads must not leak its setting to the tests after it.
"""

import os

os.environ["PATCHSAE_CHECK_SHAPES"] = "1"  # before patchsae is imported: see patchsae.shapes

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from assets import CLIP_TOKENIZER, DINOV2, FASHION_MNIST, GOLDEN_CHECKPOINT, GOLDEN_STEP, SHARED


def pytest_sessionstart(session: pytest.Session) -> None:
    """Under CI=true every shared asset must be present: CI must not pass by skipping."""
    if os.environ.get("CI", "").lower() != "true":
        return
    needed = (GOLDEN_STEP, GOLDEN_CHECKPOINT, DINOV2, FASHION_MNIST, CLIP_TOKENIZER)
    missing = [str(path) for path in needed if not path.exists()]
    if missing:
        raise pytest.UsageError(
            f"CI=true but the shared assets {missing} are absent: run CI from a clone beside "
            f"{SHARED} (the tests that need them would otherwise skip)"
        )


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
