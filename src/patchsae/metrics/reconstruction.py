"""Reconstruction quality of an SAE over a whole held-out slice of activations.

All sums are accumulated in float64 and merged batch by batch (per-dimension means and centred
sums of squares combined with Chan's update), so the result equals a single pass over the
concatenated slice, whatever the batching.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from tqdm import tqdm

from patchsae.metrics.firing import MetricsError, firing_fractions
from patchsae.shapes import shaped

if TYPE_CHECKING:
    from patchsae.backbones import TokenLayout
    from patchsae.sae import SAE


class _Sums:
    """float64 running sums over tokens. x_nd, x_hat_nd: (n, d) float64."""

    def __init__(self) -> None:
        self.n = 0
        self.mean_d: torch.Tensor | None = None
        self.m2_d: torch.Tensor | None = None
        self.sse = 0.0
        self.sum_sq = 0.0
        self.cos_sum = 0.0

    @shaped
    def update(
        self, x_nd: Float[torch.Tensor, "n d"], x_hat_nd: Float[torch.Tensor, "n d"]
    ) -> None:
        n_b = x_nd.shape[0]
        mean_b = x_nd.mean(0)
        m2_b = (x_nd - mean_b).square().sum(0)
        if self.mean_d is None:
            self.mean_d, self.m2_d = mean_b, m2_b
        else:
            n_new = self.n + n_b
            delta = mean_b - self.mean_d
            self.mean_d = self.mean_d + delta * (n_b / n_new)
            self.m2_d = self.m2_d + m2_b + delta.square() * (self.n * n_b / n_new)
        self.n += n_b
        self.sse += (x_nd - x_hat_nd).square().sum().item()
        self.sum_sq += x_nd.square().sum().item()
        norms = x_nd.norm(dim=-1) * x_hat_nd.norm(dim=-1)
        dots = (x_nd * x_hat_nd).sum(-1)
        cos = torch.where(norms > 0, dots / norms.clamp_min(torch.finfo(norms.dtype).tiny), 0.0)
        self.cos_sum += cos.sum().item()


def _position_groups(layout: TokenLayout) -> dict[str, list[int]]:
    """Token positions per group: cls (if any), patches, registers and prompts (if any)."""
    groups = {"patch": list(layout.patch_indices)}
    if layout.cls_index is not None:
        groups["cls"] = [layout.cls_index]
    if layout.extra_indices:
        groups["register"] = list(layout.extra_indices)
    if layout.n_prompts:
        groups["prompt"] = list(layout.prompt_indices)
    return groups


@torch.no_grad()
def reconstruction_metrics(
    sae: SAE,
    batches: Iterable[torch.Tensor],
    token_layout: TokenLayout | None,
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
    n_batches: int | None = None,
) -> dict[str, float]:
    """Reconstruction and sparsity metrics of ``sae`` over every token of ``batches``.

    batches: (B, T, D) activations (or (N, D) tokens when ``token_layout`` is None); the SAE is
    moved to ``device`` and run in eval mode (its previous mode is restored). ``n_batches``, when
    known, is the progress bar's total.

    Returns, over all tokens of the slice:
    - ``fvu``: sum ||x - x_hat||^2 / sum ||x - mean||^2, mean = per-dimension mean of the slice;
      ``explained_variance`` = 1 - fvu; ``explained_variance_uncentred`` = 1 - sum ||x - x_hat||^2
      / sum ||x||^2 (the quantity PatchSAE logged);
    - ``cosine``: mean over tokens of cos(x, x_hat) (0 where either is the zero vector);
    - ``mse``: mean over elements of (x - x_hat)^2;
    - ``l0``: mean number of nonzero codes per token over CLS and patch tokens (registers
      excluded), ``l0_cls``, ``l0_patch`` and ``l0_register`` per group (only groups the layout
      has; without a layout ``l0`` covers all tokens);
    - ``frac_dead``, ``frac_almost_dead`` (< 1e-7), ``frac_dense`` (> 1e-2) of latents from
      token-level firing frequencies (code > 0) over all tokens;
    - ``n_tokens``.
    """
    device = torch.device(device)
    was_training = sae.training
    sae.to(device).eval()
    dtype = sae.dtype
    sums = _Sums()
    fire_counts_m: torch.Tensor | None = None
    nnz_t: torch.Tensor | None = None  # nonzero codes per token position (T,), or in total (1,)
    nonfinite = torch.zeros((), dtype=torch.int64, device=device)  # NaN/inf inputs, summed
    try:
        for batch in tqdm(
            batches, desc="reconstruction", unit="batch", total=n_batches, disable=not progress
        ):
            x = torch.as_tensor(batch)
            if token_layout is not None:
                if x.ndim != 3 or x.shape[1] != token_layout.n_tokens:
                    raise MetricsError(
                        f"batches must be (B, T={token_layout.n_tokens}, D) to match the token "
                        f"layout, got {tuple(x.shape)}; pass token_layout=None for (N, D) tokens"
                    )
            elif x.ndim not in (2, 3):
                raise MetricsError(f"batches must be (B, T, D) or (N, D), got {tuple(x.shape)}")
            if x.shape[-1] != sae.cfg.d_in:
                raise MetricsError(
                    f"activations have width {x.shape[-1]} but the SAE expects d_in="
                    f"{sae.cfg.d_in}: evaluate on activations of the layer it was trained on"
                )
            if x.numel() == 0:
                continue
            x = x.to(device=device, dtype=dtype)
            nonfinite = nonfinite + (~torch.isfinite(x)).sum()
            codes = sae.encode(x)
            x_hat = sae.decode(codes)
            d = x.shape[-1]
            sums.update(x.reshape(-1, d).double(), x_hat.reshape(-1, d).double())
            fired = codes > 0  # codes are >= 0 (every arch rectifies), so also the nonzeros
            fired_m = fired.reshape(-1, codes.shape[-1]).sum(0, dtype=torch.int64)
            fire_counts_m = fired_m if fire_counts_m is None else fire_counts_m + fired_m
            nnz = fired.sum(-1, dtype=torch.int64)
            nnz = nnz.sum(0) if token_layout is not None else nnz.sum().reshape(1)
            nnz_t = nnz if nnz_t is None else nnz_t + nnz
    finally:
        sae.train(was_training)
    if sums.n == 0 or fire_counts_m is None or nnz_t is None:
        raise MetricsError("no activations to evaluate: the slice of images is empty")
    if nonfinite.item():
        raise MetricsError(
            f"the activations hold {nonfinite.item()} NaN or infinite values: the store is "
            "damaged (check it with patchsae verify STORE) or the backbone overflowed"
        )
    if not math.isfinite(sums.sse):
        raise MetricsError(
            "the SAE's reconstructions hold NaN or infinite values on finite activations: its "
            "weights are damaged or diverged (check it with patchsae verify SAE)"
        )
    total_var = sums.m2_d.sum().item()
    fvu = sums.sse / total_var if total_var > 0 else float("nan")
    fvu_uncentred = sums.sse / sums.sum_sq if sums.sum_sq > 0 else float("nan")
    out = {
        "fvu": fvu,
        "explained_variance": 1.0 - fvu,
        "explained_variance_uncentred": 1.0 - fvu_uncentred,
        "cosine": sums.cos_sum / sums.n,
        "mse": sums.sse / (sums.n * sae.cfg.d_in),
    }
    nnz_t = nnz_t.double().cpu()
    if token_layout is None:
        out["l0"] = nnz_t.sum().item() / sums.n
    else:
        n_images = sums.n // token_layout.n_tokens
        groups = _position_groups(token_layout)
        for name, positions in sorted(groups.items()):
            out[f"l0_{name}"] = nnz_t[positions].sum().item() / (n_images * len(positions))
        kept = groups["patch"] + groups.get("cls", [])
        out["l0"] = nnz_t[kept].sum().item() / (n_images * len(kept))
    out.update(firing_fractions(fire_counts_m.double().cpu() / sums.n))
    out["n_tokens"] = sums.n
    return out
