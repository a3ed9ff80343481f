"""``relu``: the PatchSAE sparse autoencoder, trained with the PatchSAE objective.

``codes = ReLU((x - b_dec) @ W_enc + b_enc)``, ``x_hat = codes @ W_dec + b_dec``; the loss is
``recipe.patchsae_loss`` (normalised MSE + L1 + ghost grads), see docs/recipe.md.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from patchsae.sae import kernels, recipe
from patchsae.sae.base import SAE, LossOutput
from patchsae.sae.config import ReluConfig
from patchsae.sae.registry import register_sae
from patchsae.shapes import shaped


@register_sae("relu")
class ReluSAE(SAE):
    """ReLU SAE with untied weights (PatchSAE)."""

    config_class = ReluConfig
    cfg: ReluConfig

    @shaped
    def encode(self, x: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch d_sae"]:
        """codes (..., d_sae) = ReLU(pre_acts(x))."""
        return torch.relu(self.pre_acts(x))

    def loss(self, x: Tensor, *, dead_mask: Tensor | None = None) -> LossOutput:
        """PatchSAE objective on x (B, T, d_in) or (N, d_in).

        One fused node (``kernels.relu_train``) computes the reconstruction, the L1 sum and the
        dead latents' pre-activations; at trained sparsity the step only touches the active
        entries and the dead columns. Terms: mse, l1, ghost, total.
        """
        if x.ndim not in (2, 3):
            raise ValueError(
                f"the relu loss takes x of shape (B, T, d) or (N, d), got {tuple(x.shape)}; "
                "flatten extra leading dimensions first"
            )
        self._check_dead_mask(dead_mask)
        x_nd = self._flat(x)
        dead_idx = x_nd.new_zeros(0, dtype=torch.int64)
        if self.cfg.use_ghost_grads and dead_mask is not None:
            dead_idx = dead_mask.nonzero().squeeze(1)
        x_hat_nd, l1_sum, pre_dead, W_dec_dead, fire_counts = kernels.relu_train(
            x_nd, self.W_enc, self.b_enc, self.b_dec, self.W_dec, dead_idx, self.scratch
        )
        x_hat = x_hat_nd.reshape(x.shape)
        dead = None
        if dead_idx.numel() > 0:
            dead = (pre_dead.reshape(*x.shape[:-1], -1), W_dec_dead)
        total, terms = recipe.patchsae_objective(
            x_nd.reshape(x.shape),
            x_hat,
            self.cfg.l1_coefficient * l1_sum / x_nd.shape[0],
            dead,
            mse_cls_coefficient=self.cfg.mse_cls_coefficient,
            mse_normalization=self.cfg.mse_normalization,
        )
        return LossOutput(total, terms, x_hat.detach(), fire_counts)
