"""Weights with the sparsity of a trained SAE, shared by the training benches.

Random init gives dense ReLU codes (half the latents fire on every token), which is neither
what a real run spends its time on nor what the sparse kernels are for. ``trained_sparsity``
sets the encoder biases so that latent firing frequencies on a batch are log-normal over about
three decades (as in trained SAEs) with a chosen mean L0, and a chosen fraction of latents
never fire (dead: ghost grads or AuxK work on them).
"""

from __future__ import annotations

import torch

LOG10_FREQ_SPREAD = 0.7
"""Standard deviation of log10(firing frequency) across live latents."""


@torch.no_grad()
def trained_sparsity(sae, x_nd: torch.Tensor, l0: float, dead_frac: float, seed: int = 7):
    """Set ``b_dec`` to the mean token of ``x_nd`` (n, d_in) and ``b_enc`` per latent so that
    latent j fires on about a fraction f_j of ``x_nd``'s tokens, f log-normal with
    ``sum f = l0``; a random ``dead_frac`` of latents sit 10 standard deviations below zero.
    Returns the dead mask (d_sae,) bool on the SAE's device."""
    g = torch.Generator().manual_seed(seed)
    m = sae.cfg.d_sae
    x_nd = x_nd.to(sae.b_dec.device, sae.b_dec.dtype)
    sae.b_dec.copy_(x_nd.mean(0))
    product = ((x_nd - sae.b_dec) @ sae.W_enc).float()
    mean, std = product.mean(0).cpu(), product.std(0).cpu()
    dead = torch.zeros(m, dtype=torch.bool)
    dead[torch.randperm(m, generator=g)[: round(dead_frac * m)]] = True
    freq = 10 ** (LOG10_FREQ_SPREAD * torch.randn(m, generator=g))
    freq = (freq / freq[~dead].sum() * l0).clamp(max=0.5)
    z = torch.special.ndtri(1 - freq)
    z[dead] = 10.0
    sae.b_enc.copy_(-(mean + std * z))
    return dead.to(sae.b_enc.device)
