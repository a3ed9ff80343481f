"""The SAE base class: PatchSAE-shaped parameters, inference path, decoder constraint.

Parameters are named and oriented as in PatchSAE, registered in this order (which is also the
optimizer's): ``W_enc`` (d_in, d_sae), ``b_enc`` (d_sae,), ``W_dec`` (d_sae, d_in),
``b_dec`` (d_in,). Subclasses define ``encode`` (inference, per token) and ``loss`` (training).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from patchsae.sae import kernels, recipe
from patchsae.sae.config import SAEConfig
from patchsae.shapes import shaped


@dataclass
class LossOutput:
    """One training objective evaluation.

    total () differentiable; terms: detached scalars by name; x_hat: detached reconstruction,
    shaped like the input; fire_counts (d_sae,) int64: tokens on which each latent was > 0.
    """

    total: Tensor
    terms: dict[str, Tensor]
    x_hat: Tensor
    fire_counts: Tensor


class SAE(nn.Module):
    """Base sparse autoencoder; ``arch`` is set by ``register_sae``, which also registers
    ``config_class`` (the architecture's options) under the same name."""

    arch: str = ""
    config_class: type[SAEConfig] = SAEConfig
    # {"backbone": identity dict, "layer": block index} of the activations it was trained on, as
    # recorded in our checkpoint's cfg.json; None when unknown (other formats, older saves).
    trained_on: dict[str, Any] | None = None

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        dtype = getattr(torch, cfg.dtype)
        W_enc = torch.empty(cfg.d_in, cfg.d_sae, dtype=dtype)
        b_enc = torch.zeros(cfg.d_sae, dtype=dtype)
        W_dec = torch.empty(cfg.d_sae, cfg.d_in, dtype=dtype)
        b_dec = torch.zeros(cfg.d_in, dtype=dtype)
        if cfg.init == "patchsae":
            nn.init.kaiming_uniform_(W_enc)
            nn.init.kaiming_uniform_(W_dec)
            recipe.normalize_rows_(W_dec)
        else:
            nn.init.kaiming_uniform_(W_dec)
            recipe.normalize_rows_(W_dec)
            W_enc.copy_(W_dec.t())
        self.W_enc = nn.Parameter(W_enc)
        self.b_enc = nn.Parameter(b_enc)
        self.W_dec = nn.Parameter(W_dec)
        self.b_dec = nn.Parameter(b_dec)
        self.scratch = kernels.Scratch()

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @shaped
    def _flat(self, x: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "n d_in"]:
        """x (..., d_in) -> (n, d_in) in the parameters' dtype; clear error on a wrong width."""
        if x.shape[-1] != self.cfg.d_in:
            raise ValueError(
                f"SAE input has width {x.shape[-1]} but d_in={self.cfg.d_in}; "
                "check the layer/model the activations come from"
            )
        return x.reshape(-1, self.cfg.d_in).to(self.dtype)

    @shaped
    def pre_acts(self, x: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch d_sae"]:
        """hidden_pre (..., d_sae) = (x - b_dec) @ W_enc + b_enc for x (..., d_in)."""
        pre = kernels.encode_pre(self._flat(x), self.W_enc, self.b_enc, self.b_dec)
        return pre.reshape(*x.shape[:-1], self.cfg.d_sae)

    def encode(self, x: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch d_sae"]:
        """codes (..., d_sae) for x (..., d_in); pure inference, each token on its own."""
        raise NotImplementedError

    @shaped
    def decode(self, codes: Float[Tensor, "*batch d_sae"]) -> Float[Tensor, "*batch d_in"]:
        """x_hat (..., d_in) = codes @ W_dec + b_dec for codes (..., d_sae).

        Without autograd on the codes, sparse codes only touch their active decoder rows.
        """
        codes_nm = codes.reshape(-1, self.cfg.d_sae).to(self.dtype)
        if torch.is_grad_enabled() and codes.requires_grad:
            x_hat = torch.addmm(self.b_dec, codes_nm, self.W_dec)
        else:
            x_hat = kernels.decode(codes_nm, self.W_dec, self.b_dec)
        return x_hat.reshape(*codes.shape[:-1], self.cfg.d_in)

    @shaped
    def forward(self, x: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch d_in"]:
        """x_hat (..., d_in): decode(encode(x))."""
        return self.decode(self.encode(x))

    def loss(self, x: Tensor, *, dead_mask: Tensor | None = None) -> LossOutput:
        """Training objective on x (B, T, d_in) or (N, d_in); dead_mask (d_sae,) bool or None."""
        raise NotImplementedError

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale every W_dec row to unit norm (no-op unless cfg.normalize_decoder)."""
        if self.cfg.normalize_decoder:
            recipe.normalize_rows_(self.W_dec.data)

    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        """Remove from W_dec.grad its component along each W_dec row (no-op unless
        cfg.normalize_decoder or without a gradient)."""
        if self.cfg.normalize_decoder and self.W_dec.grad is not None:
            work = self.scratch.get("w_dec_products", tuple(self.W_dec.shape), self.W_dec)
            recipe.remove_parallel_component_(self.W_dec.grad, self.W_dec.data, work)

    def _check_dead_mask(self, dead_mask: Tensor | None) -> None:
        recipe.check_dead_mask(dead_mask, self.cfg.d_sae)
