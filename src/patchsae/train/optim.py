"""The optimiser every training run builds: Adam, fused into one kernel per step where torch
has one (CPU and CUDA), the plain per-tensor loop elsewhere. Same update rule either way."""

from __future__ import annotations

from collections.abc import Iterable

import torch

FUSED_DEVICES = ("cpu", "cuda")
FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def adam(
    params: Iterable[torch.nn.Parameter],
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Adam:
    """``torch.optim.Adam`` over ``params`` (no weight decay), fused when every parameter sits
    on a CPU or CUDA device in a floating dtype."""
    params = list(params)
    fused = all(p.device.type in FUSED_DEVICES and p.dtype in FUSED_DTYPES for p in params)
    return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, fused=fused or None)
