"""Geometric median (Weiszfeld) and the decoder-bias initialisations built on it.

``geometric_median`` follows the operation order of ``compute_geometric_median`` from
geom-median 0.1.0 (tensor input, ``per_component=False``), which PatchSAE uses to initialise
``b_dec``, so that the result and the objective log agree with it bit for bit:

- the points are the slices of ``points`` along dim 0; each may be a vector or a matrix, and
  distances are Euclidean norms of the flattened difference (Frobenius for matrices);
- the start is the weighted mean with float32 weights ``ones(n)`` divided by their sum, so
  ``1/n`` is rounded to float32 when ``n`` is not a power of two;
- each update re-weights the points by ``1 / clamp(distance, min=eps)`` and takes their weighted
  mean, accumulated point by point in order;
- the objective (mean distance, float64 through numpy) is logged after the start and after each
  update; the loop stops when ``|obj_prev - obj| <= ftol * obj`` (with the default ``ftol=1e-20``
  this means "bit-identical") or after ``maxiter`` updates, and the last iterate is returned.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from patchsae.shapes import shaped

InitMethod = Literal["geometric_median_images", "geometric_median_tokens", "mean", "zeros"]
INIT_METHODS: tuple[str, ...] = (
    "geometric_median_images",
    "geometric_median_tokens",
    "mean",
    "zeros",
)


def _weighted_mean(points: list[Tensor], weights: Tensor) -> Tensor:
    """Sum of ``points[i] * w[i]`` accumulated in order, with ``w = weights / weights.sum()``."""
    weights = weights / weights.sum()
    total = points[0] * weights[0]
    for i in range(1, len(points)):
        total += points[i] * weights[i]
    return total


def _distances(points: Tensor, median: Tensor) -> Tensor:
    """distances (n,): Euclidean norm of each flattened ``points[i] - median``."""
    return torch.linalg.vector_norm((points - median).reshape(points.shape[0], -1), dim=1)


def _objective(distances: Tensor, weights: Tensor) -> float:
    """Weighted mean distance in float64 (numpy), the quantity Weiszfeld decreases."""
    values = distances.to(torch.float64).cpu().numpy()
    return float(np.average(values, weights=weights.cpu().numpy()))


@torch.no_grad()
def geometric_median(
    points: Tensor, *, maxiter: int = 100, eps: float = 1e-6, ftol: float = 1e-20
) -> tuple[Tensor, Tensor]:
    """Geometric median of the slices of ``points`` along dim 0.

    points: (n, ...) with n >= 1; each ``points[i]`` is one point (vector or matrix).
    Returns ``(median, objective_log)``: median (...) in the dtype of ``points`` and
    objective_log (k,) float64 with the mean distance at the start and after each of the
    ``k - 1`` Weiszfeld updates (``k - 1 <= maxiter``).
    """
    if points.ndim < 1 or points.shape[0] == 0:
        raise ValueError(
            f"geometric_median needs at least one point along dim 0, got shape "
            f"{tuple(points.shape)}; pass a tensor of shape (n, ...) with n >= 1"
        )
    if maxiter < 0 or eps <= 0:
        raise ValueError(f"need maxiter >= 0 and eps > 0, got maxiter={maxiter}, eps={eps}")
    if not torch.isfinite(points).all():
        raise ValueError("geometric_median got NaN or inf in its points; clean the input first")
    point_list = list(points)
    weights = torch.ones(len(point_list), dtype=torch.float32, device=points.device)
    median = _weighted_mean(point_list, weights)
    distances = _distances(points, median)
    objective = _objective(distances, weights)
    log = [objective]
    for _ in range(maxiter):
        previous = objective
        median = _weighted_mean(point_list, weights / torch.clamp(distances, min=eps))
        distances = _distances(points, median)
        objective = _objective(distances, weights)
        log.append(objective)
        if abs(previous - objective) <= ftol * objective:
            break
    return median, torch.tensor(log, dtype=torch.float64)


@shaped
def init_b_dec(
    acts: Float[Tensor, "*batch d_model"], method: str, maxiter: int = 100
) -> Float[Tensor, " d_model"]:
    """Initial decoder bias (d,) from a batch of activations.

    - ``geometric_median_images`` (PatchSAE): acts (B, T, d); the geometric median of the B
      images, each one point in R^(T*d), gives a (T, d) matrix that is then averaged over the
      T positions (CLS included).
    - ``geometric_median_tokens``: acts (..., d); the geometric median of all tokens as points
      in R^d.
    - ``mean``: mean over all tokens of acts (..., d).
    - ``zeros``: zeros (d,) in the dtype of acts.

    The result has the dtype of acts; float16/bfloat16 activations are processed in float32.
    """
    if method not in INIT_METHODS:
        raise ValueError(f"unknown b_dec init method {method!r}; choose one of {INIT_METHODS}")
    if acts.ndim < 2 or acts.shape[-1] == 0:
        raise ValueError(f"init_b_dec needs activations of shape (..., d), got {tuple(acts.shape)}")
    d = acts.shape[-1]
    if method == "zeros":
        return torch.zeros(d, dtype=acts.dtype, device=acts.device)
    if method == "geometric_median_images" and acts.ndim != 3:
        raise ValueError(
            f"geometric_median_images needs acts of shape (B, T, d) (one row per image), got "
            f"{tuple(acts.shape)}; use geometric_median_tokens for a flat (N, d) batch"
        )
    work = acts.float() if acts.dtype in (torch.float16, torch.bfloat16) else acts
    if method == "mean":
        b_dec = work.reshape(-1, d).mean(dim=0)
    elif method == "geometric_median_tokens":
        b_dec = geometric_median(work.reshape(-1, d), maxiter=maxiter)[0]
    else:
        b_dec = geometric_median(work, maxiter=maxiter)[0].mean(dim=0)
    return b_dec.to(acts.dtype)
