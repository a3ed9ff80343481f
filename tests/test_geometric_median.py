"""Geometric median: golden cases recorded with geom-median 0.1.0, brute force, b_dec inits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compare import rel_err
from patchsae.sae.geometric_median import geometric_median, init_b_dec


def objective(points: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Mean Euclidean distance from each candidate (k, d) to points (n, d), in float64."""
    return torch.cdist(candidates.double(), points.double()).mean(dim=1)


@pytest.mark.shared
@pytest.mark.parametrize("name", ["generic", "collinear"])
def test_golden_points(golden, name):
    median, log = geometric_median(golden[f"gm.{name}.points"])
    assert rel_err(median, golden[f"gm.{name}.median"]) <= 1e-12
    expected_log = golden[f"gm.{name}.objective_log"]
    assert log.dtype == torch.float64
    assert log.shape == expected_log.shape
    assert rel_err(log, expected_log) <= 1e-12


@pytest.mark.shared
def test_golden_collinear_is_exact_data_point(golden):
    median, _ = geometric_median(golden["gm.collinear.points"])
    assert torch.equal(median, torch.tensor([2.0, 2.0], dtype=torch.float64))


@pytest.mark.shared
def test_golden_maxiter(golden):
    median, log = geometric_median(golden["gm.generic.points"], maxiter=3)
    assert len(log) == 4
    assert rel_err(median, golden["gm.generic_maxiter3.median"]) <= 1e-12
    assert not torch.allclose(median, golden["gm.generic.median"], rtol=1e-9, atol=0)


@pytest.mark.shared
def test_golden_matrix_points(golden):
    points = golden["gm.bt.points"]
    median, log = geometric_median(points)
    assert median.shape == (3, 4)
    assert rel_err(median, golden["gm.bt.median_per_position"]) <= 1e-12
    assert rel_err(log, golden["gm.bt.objective_log"]) <= 1e-12
    b_dec = init_b_dec(points, "geometric_median_images")
    assert rel_err(b_dec, golden["gm.bt.b_dec"]) <= 1e-12


@pytest.mark.shared
@pytest.mark.parametrize(
    ("case", "rtol"), [("ghost", 1e-12), ("noghost", 1e-12), ("f32_ghost", 1e-5)]
)
def test_golden_b_dec_init(golden, case, rtol):
    x = golden[f"{case}.x"]
    median, log = geometric_median(x, maxiter=100)
    assert median.dtype == x.dtype
    assert rel_err(median, golden[f"{case}.b_dec_init.gm_median_per_position"]) <= rtol
    expected_log = golden[f"{case}.b_dec_init.gm_objective_log"]
    assert log.shape == expected_log.shape
    assert rel_err(log, expected_log) <= rtol
    assert rel_err(init_b_dec(x, "geometric_median_images"), golden[f"{case}.init.b_dec"]) <= rtol


def test_start_uses_float32_weights():
    points = torch.randn(12, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    start, log = geometric_median(points, maxiter=0)
    w = float(np.float32(1.0) / np.float32(12.0))
    expected = points[0] * w
    for p in points[1:]:
        expected = expected + p * w
    assert torch.equal(start, expected)
    assert len(log) == 1
    assert log[0].item() == pytest.approx(objective(points, start[None]).item(), rel=1e-12)
    assert not torch.equal(start, points.mean(dim=0))


@pytest.mark.parametrize("seed", range(4))
def test_brute_force_grid_2d(seed):
    g = torch.Generator().manual_seed(seed)
    points = torch.randn(7, 2, dtype=torch.float64, generator=g) * torch.tensor([1.0, 3.0])
    median, log = geometric_median(points)
    lo, hi = points.min(dim=0).values, points.max(dim=0).values
    axes = [torch.linspace(lo[i].item(), hi[i].item(), 301, dtype=torch.float64) for i in range(2)]
    grid = torch.cartesian_prod(*axes)
    best_grid = objective(points, grid).min().item()
    found = objective(points, median[None]).item()
    assert found <= best_grid + 1e-9
    assert log[-1].item() == pytest.approx(found, rel=1e-12)
    assert torch.all(log[1:] <= log[:-1] + 1e-12 * log[0])


@pytest.mark.parametrize("seed", range(3))
def test_brute_force_random_search_high_dim(seed):
    g = torch.Generator().manual_seed(100 + seed)
    points = torch.randn(9, 6, dtype=torch.float64, generator=g)
    points[0] += 20.0
    median, _ = geometric_median(points)
    found = objective(points, median[None]).item()
    near = median + 1e-3 * torch.randn(4000, 6, dtype=torch.float64, generator=g)
    far = points.mean(dim=0) + torch.randn(4000, 6, dtype=torch.float64, generator=g)
    assert found <= objective(points, torch.cat([near, far, points])).min().item() + 1e-12
    assert (median - points[1:].mean(dim=0)).norm() < (points.mean(dim=0) - median).norm()


@pytest.mark.parametrize("n", [3, 5, 7, 9, 11])
def test_one_dimensional_odd_is_sample_median(n):
    g = torch.Generator().manual_seed(n)
    points = 3.0 * torch.randn(n, 1, dtype=torch.float64, generator=g)
    median, _ = geometric_median(points)
    assert median.item() == pytest.approx(points.median().item(), abs=1e-9)


def test_matrix_points_use_frobenius_distance():
    g = torch.Generator().manual_seed(5)
    points = torch.randn(6, 3, 4, dtype=torch.float64, generator=g)
    median, log = geometric_median(points)
    flat_median, flat_log = geometric_median(points.reshape(6, 12))
    assert torch.allclose(median.reshape(12), flat_median, rtol=0, atol=1e-14)
    assert torch.allclose(log, flat_log, rtol=1e-14, atol=0)
    per_position = torch.stack([geometric_median(points[:, t])[0] for t in range(3)])
    assert not torch.allclose(median, per_position, atol=1e-6)


def test_single_point_and_bad_input():
    point = torch.tensor([[1.5, -2.0]], dtype=torch.float64)
    median, log = geometric_median(point)
    assert torch.equal(median, point[0])
    assert log[-1].item() == 0.0
    with pytest.raises(ValueError, match="at least one point"):
        geometric_median(torch.zeros(0, 3))
    with pytest.raises(ValueError, match="NaN or inf"):
        geometric_median(torch.tensor([[1.0, float("nan")], [0.0, 0.0]]))


def test_init_b_dec_methods():
    g = torch.Generator().manual_seed(11)
    acts = torch.randn(5, 4, 3, dtype=torch.float64, generator=g)
    acts[0, 1:] += 30.0
    images = init_b_dec(acts, "geometric_median_images")
    assert torch.equal(images, geometric_median(acts)[0].mean(dim=0))
    tokens = init_b_dec(acts, "geometric_median_tokens")
    assert torch.equal(tokens, geometric_median(acts.reshape(-1, 3))[0])
    assert (images - tokens).abs().max() > 1e-3
    assert torch.allclose(init_b_dec(acts, "mean"), acts.reshape(-1, 3).mean(dim=0))
    zeros = init_b_dec(acts, "zeros")
    assert zeros.dtype == acts.dtype and torch.equal(zeros, torch.zeros(3, dtype=acts.dtype))
    assert torch.equal(init_b_dec(acts.reshape(-1, 3), "geometric_median_tokens"), tokens)


def test_init_b_dec_half_precision_runs_in_float32():
    acts = torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(2)).bfloat16()
    b_dec = init_b_dec(acts, "geometric_median_images")
    assert b_dec.dtype == torch.bfloat16
    expected = geometric_median(acts.float())[0].mean(dim=0).bfloat16()
    assert torch.equal(b_dec, expected)


def test_init_b_dec_bad_input():
    with pytest.raises(ValueError, match="geometric_median_tokens"):
        init_b_dec(torch.randn(8, 3), "geometric_median_images")
    with pytest.raises(ValueError, match="unknown b_dec init method"):
        init_b_dec(torch.randn(2, 3, 4), "median")
