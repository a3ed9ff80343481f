"""Shape annotations are checked in the tests and cost nothing outside them."""

import os
import subprocess
import sys

import pytest
import torch
from jaxtyping import TypeCheckError

from patchsae.metrics.firing import FiringWindow
from patchsae.sae.config import SAEConfig
from patchsae.sae.registry import make_sae
from patchsae.sae.topk import normalized_mse
from patchsae.shapes import CHECK_SHAPES


def test_the_suite_runs_with_shape_checks() -> None:
    assert CHECK_SHAPES


def test_mismatched_dimensions_are_caught_by_the_annotations() -> None:
    with pytest.raises(TypeCheckError):
        normalized_mse(torch.zeros(4, 3), torch.zeros(4, 5))  # d_in 3 vs 5
    with pytest.raises(TypeCheckError):
        normalized_mse(torch.zeros(4, 3), torch.zeros(5, 3))  # n 4 vs 5
    with pytest.raises(TypeCheckError):
        FiringWindow(8, 10).update(torch.ones(8), 4)  # float counts, not integers


def test_the_sae_keeps_its_one_line_width_error() -> None:
    sae = make_sae(SAEConfig(d_in=6, d_sae=12))
    assert sae.encode(torch.zeros(2, 3, 6)).shape == (2, 3, 12)
    with pytest.raises(ValueError, match="SAE input has width 5 but d_in=6"):
        sae.encode(torch.zeros(2, 5))


def test_outside_the_tests_functions_are_left_undecorated() -> None:
    code = (
        "import patchsae.sae.topk as t, patchsae.shapes as s; "
        "print(s.CHECK_SHAPES, hasattr(t.normalized_mse, '__wrapped__'))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PATCHSAE_CHECK_SHAPES"}
    run = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
    )
    assert run.stdout.split() == ["False", "False"], run.stderr
