"""``topk`` (Gao et al. 2024) and ``batchtopk`` (Bussmann et al. 2024) SAEs with the AuxK loss.

Both use the per-token normalised MSE ``mean_n ||x_hat_n - x_n||^2 / ||x_n||^2`` (OpenAI's
``normalized_mean_squared_error``), plus ``aux_coefficient`` times the AuxK loss on the dead
latents, normalised per token the same way. Both terms are means over tokens, so the loss of a
batch is the mean of the losses of equal slices of it (data parallel training is exact for
``topk``; ``batchtopk`` selects over the whole batch, so its codes are not).
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from patchsae.sae import kernels
from patchsae.sae.base import SAE, LossOutput
from patchsae.sae.config import BatchTopKConfig, TopKConfig
from patchsae.sae.registry import register_sae
from patchsae.shapes import shaped


@shaped
def normalized_mse(
    x_hat_nd: Float[Tensor, "n d_in"], x_nd: Float[Tensor, "n d_in"]
) -> Float[Tensor, ""]:
    """``mean_n ||x_hat_n - x_n||^2 / ||x_n||^2`` over the n tokens of (n, d) inputs.

    A token with ``x_n = 0`` contributes 0 (and still counts in the mean).
    """
    norm_n = x_nd.pow(2).sum(-1)
    error_n = (x_hat_nd - x_nd).pow(2).sum(-1)
    ratio_n = error_n / norm_n.clamp_min(torch.finfo(x_nd.dtype).tiny)
    return torch.where(norm_n > 0, ratio_n, 0).mean()


@shaped
def auxk_loss(
    pre_dead: Float[Tensor, "n n_dead"],
    W_dec_dead: Float[Tensor, "n_dead d_in"],
    residual_nd: Float[Tensor, "n d_in"],
    aux_k: int,
) -> Float[Tensor, ""]:
    """AuxK: reconstruct the detached residual ``x - x_hat`` (n, d) from dead latents only.

    ``pre_dead`` (n, n_dead) and ``W_dec_dead`` (n_dead, d) are the dead latents'
    pre-activations and decoder rows. Per token, the top ``min(aux_k, n_dead)`` of them (ReLU
    applied) are decoded without b_dec and scored with ``normalized_mse`` against the residual
    (each token's error divided by its residual's squared norm). Returns a differentiable
    scalar, 0 when no latent is dead.
    """
    n_dead = pre_dead.shape[-1]
    if n_dead == 0:
        return pre_dead.new_zeros(())
    values, indices = pre_dead.topk(min(aux_k, n_dead), dim=-1, sorted=False)
    recon = kernels.decode_topk(indices, torch.relu(values), W_dec_dead)
    return normalized_mse(recon, residual_nd)


class _KSparseSAE(SAE):
    """Shared training loss of the k-sparse architectures."""

    config_class = TopKConfig
    cfg: TopKConfig

    def _train_codes(self, x_nd: Tensor, dead_idx: Tensor) -> tuple[Tensor, ...]:
        """Training-time forward of x_nd (n, d): x_hat (n, d), pre_dead (n, n_dead), W_dec_dead
        (n_dead, d) and fire_counts (m,) int64; pre_dead and W_dec_dead belong to the latents
        ``dead_idx``."""
        raise NotImplementedError

    def loss(self, x: Tensor, *, dead_mask: Tensor | None = None) -> LossOutput:
        """Normalised MSE + aux_coefficient * AuxK on x (B, T, d_in) or (N, d_in).

        Terms: mse, aux, total.
        """
        self._check_dead_mask(dead_mask)
        x_nd = self._flat(x)
        dead_idx = x_nd.new_zeros(0, dtype=torch.int64)
        if dead_mask is not None:
            dead_idx = dead_mask.nonzero().squeeze(1)
        x_hat_nd, pre_dead, W_dec_dead, fire_counts = self._train_codes(x_nd, dead_idx)
        mse = normalized_mse(x_hat_nd, x_nd)
        residual = (x_nd - x_hat_nd).detach()
        aux = auxk_loss(pre_dead, W_dec_dead, residual, self.cfg.aux_k)
        total = mse + self.cfg.aux_coefficient * aux
        terms = {"mse": mse.detach(), "aux": aux.detach(), "total": total.detach()}
        return LossOutput(total, terms, x_hat_nd.detach().reshape(x.shape), fire_counts)


@register_sae("topk")
class TopKSAE(_KSparseSAE):
    """Per-token TopK: the k largest pre-activations of each token, ReLU applied."""

    @shaped
    def encode(self, x: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch d_sae"]:
        """codes (..., d_sae) with at most k nonzeros per token."""
        pre = self.pre_acts(x)
        values, indices = pre.topk(self.cfg.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, indices, torch.relu(values))

    def _train_codes(self, x_nd: Tensor, dead_idx: Tensor) -> tuple[Tensor, ...]:
        return kernels.topk_train(
            x_nd, self.W_enc, self.b_enc, self.b_dec, self.W_dec, self.cfg.k, dead_idx, self.scratch
        )


@register_sae("batchtopk")
class BatchTopKSAE(_KSparseSAE):
    """BatchTopK: training keeps the k * n largest activations of a batch of n tokens.

    Each training step (module in training mode) updates the buffer ``threshold`` with an EMA
    (``threshold_momentum``) of the smallest activation kept; the first step sets it directly.
    Inference keeps the activations above it, so one token's codes do not depend on its batch.
    Training codes do, so the loss of a batch is not the mean of its slices' losses: train it in
    a single process.
    """

    config_class = BatchTopKConfig
    cfg: BatchTopKConfig

    def __init__(self, cfg: BatchTopKConfig):
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros((), dtype=self.dtype))
        self.register_buffer("threshold_steps", torch.zeros((), dtype=torch.int64))

    @shaped
    def encode(self, x: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch d_sae"]:
        """codes (..., d_sae) = a * (a > threshold) with a = ReLU(pre_acts(x))."""
        acts = torch.relu(self.pre_acts(x))
        return acts * (acts > self.threshold)

    def _train_codes(self, x_nd: Tensor, dead_idx: Tensor) -> tuple[Tensor, ...]:
        pre_nm = kernels.encode_pre(x_nd, self.W_enc, self.b_enc, self.b_dec)
        n, m = pre_nm.shape
        acts = torch.relu(pre_nm).reshape(-1)
        values, flat = acts.topk(min(self.cfg.k * n, n * m), sorted=False)
        flat = flat[values > 0].sort().values
        values = acts[flat]
        rows, cols = flat // m, flat % m
        x_hat = kernels.decode_entries(rows, cols, values, self.W_dec, n) + self.b_dec
        if self.training and values.numel() > 0:
            self._update_threshold(values.detach().min())
        fire_counts = torch.bincount(cols, minlength=m)
        return x_hat, pre_nm[:, dead_idx], self.W_dec[dead_idx], fire_counts

    @torch.no_grad()
    def _update_threshold(self, smallest_kept: Tensor) -> None:
        momentum = self.cfg.threshold_momentum if int(self.threshold_steps) > 0 else 0.0
        self.threshold.mul_(momentum).add_((1 - momentum) * smallest_kept)
        self.threshold_steps += 1
