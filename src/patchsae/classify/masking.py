"""Top-k class-latent masking on SAE codes (PatchSAE Section 4, Fig. 5b).

For an image whose target class is ``c`` and a set ``S_c`` of ``k`` latents, with codes ``z``
(T, m), decoder ``W_dec`` (m, d) and ``b_dec`` (d,):

* ``on``: only ``S_c`` kept, ``x_hat = z[:, S_c] @ W_dec[S_c] + b_dec``;
* ``off``: ``S_c`` zeroed, ``x_hat = decode(z) - z[:, S_c] @ W_dec[S_c]``.

Both cost O(T k d) once ``decode(z)`` is known, instead of a full O(T m d) decode per
condition. ``k >= m`` ("all") gives the plain reconstruction (on) or ``b_dec`` alone (off).
Latent sets come from a plain (n_classes, d_sae) statistics tensor (``top_latents``), so any
source of per-class statistics (an atlas, an adapted model's atlas, a test) can drive them.
"""

from __future__ import annotations

import torch
from torch import Tensor

SORT_CHUNK = 64


def top_latents(stats_cm: Tensor, k: int) -> Tensor:
    """(n_rows, min(k, m)) int64: per row of stats_cm (n_rows, m), the latents with the largest
    statistic first; ties go to the lower latent id. Sorted in chunks of rows (bounded memory)."""
    if stats_cm.ndim != 2:
        raise ValueError(f"stats must be (n_classes, d_sae), got {tuple(stats_cm.shape)}")
    k = min(k, stats_cm.shape[1])
    chunks = [
        torch.sort(-torch.as_tensor(stats_cm[i : i + SORT_CHUNK]).double(), dim=-1, stable=True)
        .indices[:, :k]
        .contiguous()
        for i in range(0, stats_cm.shape[0], SORT_CHUNK)
    ]
    return torch.cat(chunks) if chunks else torch.empty(0, k, dtype=torch.int64)


def random_latents(n_rows: int, d_sae: int, k: int, seed: int) -> Tensor:
    """(n_rows, min(k, d_sae)) int64: for each row, the first k of a seeded random permutation."""
    gen = torch.Generator().manual_seed(seed)
    k = min(k, d_sae)
    return torch.stack([torch.randperm(d_sae, generator=gen)[:k] for _ in range(n_rows)])


def partial_decode(codes_btm: Tensor, W_dec: Tensor, ids_bk: Tensor) -> Tensor:
    """(B, T, d): ``codes[i, :, ids[i]] @ W_dec[ids[i]]`` for each image i, without bias.

    codes_btm: (B, T, m); W_dec: (m, d); ids_bk: (B, k) latent ids (distinct within a row).
    Images sharing a latent set are computed in one product.
    """
    out = codes_btm.new_zeros(*codes_btm.shape[:2], W_dec.shape[1])
    if ids_bk.shape[1] == 0:
        return out
    sets, group = torch.unique(ids_bk, dim=0, return_inverse=True)
    for g, ids in enumerate(sets):
        rows = (group == g).nonzero().squeeze(1)
        out[rows] = codes_btm[rows][:, :, ids] @ W_dec[ids]
    return out


def masked_reconstruction(
    codes_btm: Tensor,
    recon_btd: Tensor,
    W_dec: Tensor,
    b_dec: Tensor,
    ids_bk: Tensor | None,
    mode: str,
) -> Tensor:
    """(B, T, d) decoded codes with, per image, only its latent set kept (``on``) or zeroed
    (``off``). recon_btd: ``decode(codes)``; ids_bk (B, k), or None for every latent."""
    if mode not in ("on", "off"):
        raise ValueError(f"mode must be 'on' or 'off', got {mode!r}")
    if ids_bk is None or ids_bk.shape[1] >= W_dec.shape[0]:
        return recon_btd if mode == "on" else b_dec.expand_as(recon_btd)
    part = partial_decode(codes_btm, W_dec, ids_bk)
    return part + b_dec if mode == "on" else recon_btd - part
