"""``jumprelu`` (Rajamanoharan et al. 2024): a learned threshold per latent, trained with
straight-through estimators.

``a = ReLU(pre)``, ``codes = a * H(a - theta)`` with ``theta = exp(log_threshold)``. The Heaviside
step H has zero derivative almost everywhere; its pseudo-derivative with respect to theta uses
the rectangle kernel ``K(u) = 1[|u| < 1/2]`` of bandwidth ``eps = jumprelu_bandwidth``:

- output:  d codes / d theta = -(theta / eps) K((a - theta) / eps); d codes / d a = H(a - theta)
- L0:      d H(a - theta) / d theta = -(1 / eps) K((a - theta) / eps); nothing flows to a.

Loss: ``mean_tokens ||x_hat - x||^2 + l0_coefficient * mean_tokens sum_latents H(a - theta)``.
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float
from torch import Tensor, nn

from patchsae.sae import kernels
from patchsae.sae.base import SAE, LossOutput
from patchsae.sae.config import JumpReLUConfig
from patchsae.sae.registry import register_sae
from patchsae.shapes import shaped


def _rectangle(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, acts: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(acts, theta)
        ctx.bandwidth = bandwidth
        return acts * (acts > theta)

    @staticmethod
    def backward(ctx, grad: Tensor):
        acts, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_acts = grad * (acts > theta)
        kernel = _rectangle((acts - theta) / eps)
        grad_theta = (-(theta / eps) * kernel * grad).reshape(-1, theta.numel()).sum(0)
        return grad_acts, grad_theta, None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, acts: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(acts, theta)
        ctx.bandwidth = bandwidth
        return (acts > theta).to(acts.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        acts, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        kernel = _rectangle((acts - theta) / eps)
        grad_theta = (-(1.0 / eps) * kernel * grad).reshape(-1, theta.numel()).sum(0)
        return None, grad_theta, None


@shaped
def jumprelu(
    acts: Float[Tensor, "*batch d_sae"], theta: Float[Tensor, " d_sae"], bandwidth: float
) -> Float[Tensor, "*batch d_sae"]:
    """``acts * H(acts - theta)``; acts (..., m), theta (m,); STE gradient for theta."""
    return _JumpReLU.apply(acts, theta, bandwidth)


@shaped
def step(
    acts: Float[Tensor, "*batch d_sae"], theta: Float[Tensor, " d_sae"], bandwidth: float
) -> Float[Tensor, "*batch d_sae"]:
    """``H(acts - theta)`` as acts' dtype; STE gradient for theta, none for acts."""
    return _Step.apply(acts, theta, bandwidth)


@register_sae("jumprelu")
class JumpReLUSAE(SAE):
    """JumpReLU SAE; extra parameter ``log_threshold`` (d_sae,), registered after b_dec."""

    config_class = JumpReLUConfig
    cfg: JumpReLUConfig

    def __init__(self, cfg: JumpReLUConfig):
        super().__init__(cfg)
        init = math.log(cfg.jumprelu_threshold_init)
        self.log_threshold = nn.Parameter(torch.full((cfg.d_sae,), init, dtype=self.dtype))

    @shaped
    def encode(self, x: Float[Tensor, "*batch d_in"]) -> Float[Tensor, "*batch d_sae"]:
        """codes (..., d_sae) = a * (a > theta), a = ReLU(pre_acts(x))."""
        acts = torch.relu(self.pre_acts(x))
        return acts * (acts > self.log_threshold.exp())

    def loss(self, x: Tensor, *, dead_mask: Tensor | None = None) -> LossOutput:
        """Squared error summed over d + l0_coefficient * L0, both averaged over tokens.

        ``dead_mask`` is accepted for a uniform interface and not used. Terms: mse, l0, total.
        """
        self._check_dead_mask(dead_mask)
        x_nd = self._flat(x)
        acts = torch.relu(kernels.encode_pre(x_nd, self.W_enc, self.b_enc, self.b_dec))
        theta = self.log_threshold.exp()
        eps = self.cfg.jumprelu_bandwidth
        codes = jumprelu(acts, theta, eps)
        x_hat_nd = torch.addmm(self.b_dec, codes, self.W_dec)
        mse = (x_hat_nd - x_nd).pow(2).sum(-1).mean()
        l0 = step(acts, theta, eps).sum(-1).mean()
        total = mse + self.cfg.l0_coefficient * l0
        terms = {"mse": mse.detach(), "l0": l0.detach(), "total": total.detach()}
        fire_counts = kernels.dense_fire_counts(codes.detach())
        return LossOutput(total, terms, x_hat_nd.detach().reshape(x.shape), fire_counts)
