"""Tensor comparison used against the golden files."""

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b| in float64 (absolute when b is all zeros)."""
    a, b = a.detach().to(torch.float64), b.to(torch.float64)
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)
