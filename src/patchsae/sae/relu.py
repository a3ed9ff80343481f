"""``relu``: the PatchSAE sparse autoencoder, trained with the PatchSAE objective.

``codes = ReLU((x - b_dec) @ W_enc + b_enc)``, ``x_hat = codes @ W_dec + b_dec``; the loss is
``recipe.patchsae_loss`` (normalised MSE + L1 + ghost grads), see docs/recipe.md.
"""

from __future__ import annotations

import torch
from torch import Tensor

from patchsae.sae import kernels, recipe
from patchsae.sae.base import SAE, LossOutput
from patchsae.sae.registry import register_sae


@register_sae("relu")
class ReluSAE(SAE):
    """ReLU SAE with untied weights (PatchSAE)."""

    def encode(self, x: Tensor) -> Tensor:
        """codes (..., d_sae) = ReLU(pre_acts(x))."""
        return torch.relu(self.pre_acts(x))

    def loss(self, x: Tensor, *, dead_mask: Tensor | None = None) -> LossOutput:
        """PatchSAE objective on x (B, T, d_in) or (N, d_in).

        The decoder and the encoder's weight gradient run sparse when the codes are sparse.
        Terms: mse, l1, ghost, total.
        """
        pre_nm = kernels.encode_pre(self._flat(x), self.W_enc, self.b_enc, self.b_dec)
        codes_nm, x_hat_nd, fire_counts = kernels.relu_decode(pre_nm, self.W_dec, self.b_dec)
        lead = x.shape[:-1]
        x_hat = x_hat_nd.reshape(*lead, self.cfg.d_in)
        total, terms = recipe.patchsae_loss(
            x.to(self.dtype),
            pre_nm.reshape(*lead, self.cfg.d_sae),
            codes_nm.reshape(*lead, self.cfg.d_sae),
            x_hat,
            self.W_dec,
            l1_coefficient=self.cfg.l1_coefficient,
            dead_mask=dead_mask,
            use_ghost_grads=self.cfg.use_ghost_grads,
            mse_cls_coefficient=self.cfg.mse_cls_coefficient,
            mse_normalization=self.cfg.mse_normalization,
        )
        return LossOutput(total, terms, x_hat.detach(), fire_counts)
