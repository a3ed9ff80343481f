"""The PatchSAE ReLU training recipe, reproduced exactly: loss, ghost grads, decoder constraints.
(The warm-up and dead-latent bookkeeping of the step live in ``patchsae.train.step``.)

Every formula and every quirk of the original is written out in ``docs/recipe.md``. Shapes:
x and x_hat are (B, T, d) (one row per image, token 0 is CLS) or (N, d) (flat tokens);
hidden_pre and codes are (..., m) with m = d_sae; W_dec is (m, d).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

MseNormalization = Literal["patchsae", "none"]
GhostRescale = Literal["elementwise", "total"]
MSE_NORMALIZATIONS: tuple[str, ...] = ("patchsae", "none")
GHOST_RESCALES: tuple[str, ...] = ("elementwise", "total")


def mse_elementwise(
    x: Tensor,
    x_hat: Tensor,
    *,
    normalization: MseNormalization = "patchsae",
    round_x_fp32: bool = True,
) -> Tensor:
    """Per-element squared error, (..., d) like x.

    ``patchsae``: ``(x_hat - fl32(x))**2 / ||x||`` with ||x|| the L2 norm (not squared) of the raw
    token over d. ``none``: plain ``(x_hat - x)**2``. ``round_x_fp32`` rounds x to float32 in the
    numerator as the original's ``x.float()`` does (a no-op for float32 x).
    """
    target = x.float() if round_x_fp32 else x
    error = (x_hat - target).pow(2)
    if normalization == "patchsae":
        error = error / (x**2).sum(dim=-1, keepdim=True).sqrt()
    return error


def sparsity_per_position(codes: Tensor) -> Tensor:
    """L1 of the codes summed over latents, averaged over dim 0.

    codes (B, T, m) -> (T,): mean over images per position; codes (N, m) -> () scalar.
    """
    return codes.abs().sum(dim=-1).mean(dim=0)


@dataclass
class GhostTerms:
    """Every intermediate of the ghost-grad term; per-token shapes are x's without d.

    residual (..., d); l2_norm_residual (...); exp_hidden_pre_dead (..., n_dead);
    ghost_out_unscaled (..., d); l2_norm_ghost_out (...); norm_scaling_factor (...);
    ghost_out (..., d); mse_ghost_elementwise_unscaled (..., d);
    mse_rescaling_factor (..., d) for ``elementwise`` or () for ``total``;
    mse_ghost_elementwise (..., d); loss () differentiable.
    """

    residual: Tensor
    l2_norm_residual: Tensor
    exp_hidden_pre_dead: Tensor
    ghost_out_unscaled: Tensor
    l2_norm_ghost_out: Tensor
    norm_scaling_factor: Tensor
    ghost_out: Tensor
    mse_ghost_elementwise_unscaled: Tensor
    mse_rescaling_factor: Tensor
    mse_ghost_elementwise: Tensor
    loss: Tensor


def ghost_terms(
    x: Tensor,
    x_hat: Tensor,
    hidden_pre: Tensor,
    W_dec: Tensor,
    dead_mask: Tensor,
    mse_e: Tensor,
    *,
    normalization: MseNormalization = "patchsae",
    round_residual_fp32: bool = True,
    rescale: GhostRescale = "elementwise",
) -> GhostTerms:
    """Ghost-grad term of the dead latents (``dead_mask`` (m,) bool, at least one True).

    The dead latents' ``exp(hidden_pre)`` decoded by their W_dec rows is scaled (detached
    factor) to half the residual norm per token and fitted to the detached residual with the
    same normalised MSE; the result is rescaled by a detached ratio to the main MSE ``mse_e``
    (before the CLS coefficient): per element (``elementwise``, the original) or by the ratio of
    the two means (``total``).
    """
    return dead_ghost_terms(
        x,
        x_hat,
        hidden_pre[..., dead_mask],
        W_dec[dead_mask, :],
        mse_e,
        normalization=normalization,
        round_residual_fp32=round_residual_fp32,
        rescale=rescale,
    )


def dead_ghost_terms(
    x: Tensor,
    x_hat: Tensor,
    hidden_pre_dead: Tensor,
    W_dec_dead: Tensor,
    mse_e: Tensor,
    *,
    normalization: MseNormalization = "patchsae",
    round_residual_fp32: bool = True,
    rescale: GhostRescale = "elementwise",
) -> GhostTerms:
    """``ghost_terms`` from the dead latents' pre-activations ``hidden_pre_dead`` (..., n_dead)
    and decoder rows ``W_dec_dead`` (n_dead, d) alone."""
    residual = x - x_hat
    l2_norm_residual = torch.norm(residual, dim=-1)
    exp_hidden_pre_dead = torch.exp(hidden_pre_dead)
    ghost_out_unscaled = exp_hidden_pre_dead @ W_dec_dead
    l2_norm_ghost_out = torch.norm(ghost_out_unscaled, dim=-1)
    norm_scaling_factor = (l2_norm_residual / (1e-6 + l2_norm_ghost_out * 2)).detach()
    ghost_out = ghost_out_unscaled * norm_scaling_factor[..., None]
    target = residual.detach()
    numerator_target = target.float() if round_residual_fp32 else target
    unscaled = (ghost_out - numerator_target).pow(2)
    if normalization == "patchsae":
        unscaled = unscaled / (target**2).sum(dim=-1, keepdim=True).sqrt()
    if rescale == "elementwise":
        factor = (mse_e / (unscaled + 1e-6)).detach()
    else:
        factor = (mse_e.mean() / (unscaled.mean() + 1e-6)).detach()
    scaled = factor * unscaled
    return GhostTerms(
        residual=residual.detach(),
        l2_norm_residual=l2_norm_residual.detach(),
        exp_hidden_pre_dead=exp_hidden_pre_dead.detach(),
        ghost_out_unscaled=ghost_out_unscaled.detach(),
        l2_norm_ghost_out=l2_norm_ghost_out.detach(),
        norm_scaling_factor=norm_scaling_factor,
        ghost_out=ghost_out.detach(),
        mse_ghost_elementwise_unscaled=unscaled.detach(),
        mse_rescaling_factor=factor,
        mse_ghost_elementwise=scaled.detach(),
        loss=scaled.mean(),
    )


def check_dead_mask(dead_mask: Tensor | None, d_sae: int) -> None:
    """ValueError unless ``dead_mask`` is None or a bool tensor of shape (d_sae,)."""
    if dead_mask is not None and (
        dead_mask.dtype != torch.bool or tuple(dead_mask.shape) != (d_sae,)
    ):
        raise ValueError(
            f"dead_mask must be a bool tensor of shape ({d_sae},), got "
            f"{dead_mask.dtype} {tuple(dead_mask.shape)}; build it with "
            "patchsae.train.step.dead_latents()"
        )


def _check_inputs(
    x: Tensor,
    hidden_pre: Tensor,
    codes: Tensor,
    x_hat: Tensor,
    W_dec: Tensor,
    dead_mask: Tensor | None,
    mse_normalization: str,
    ghost_rescale: str,
) -> None:
    if x.ndim not in (2, 3):
        raise ValueError(
            f"patchsae_loss takes x of shape (B, T, d) or (N, d), got {tuple(x.shape)}; "
            "flatten extra leading dimensions first"
        )
    if x_hat.shape != x.shape:
        raise ValueError(f"x_hat shape {tuple(x_hat.shape)} differs from x shape {tuple(x.shape)}")
    if W_dec.ndim != 2 or W_dec.shape[1] != x.shape[-1]:
        raise ValueError(
            f"W_dec must be (d_sae, d_in) = (m, {x.shape[-1]}), got {tuple(W_dec.shape)}"
        )
    expected = (*x.shape[:-1], W_dec.shape[0])
    for name, tensor in (("hidden_pre", hidden_pre), ("codes", codes)):
        if tuple(tensor.shape) != expected:
            raise ValueError(f"{name} must have shape {expected}, got {tuple(tensor.shape)}")
    check_dead_mask(dead_mask, W_dec.shape[0])
    if mse_normalization not in MSE_NORMALIZATIONS:
        raise ValueError(
            f"mse_normalization {mse_normalization!r} is not one of {MSE_NORMALIZATIONS}"
        )
    if ghost_rescale not in GHOST_RESCALES:
        raise ValueError(f"ghost_rescale {ghost_rescale!r} is not one of {GHOST_RESCALES}")


def patchsae_loss(
    x: Tensor,
    hidden_pre: Tensor,
    codes: Tensor,
    x_hat: Tensor,
    W_dec: Tensor,
    *,
    l1_coefficient: float,
    dead_mask: Tensor | None,
    use_ghost_grads: bool,
    mse_cls_coefficient: float = 1.0,
    mse_normalization: MseNormalization = "patchsae",
    round_residual_fp32: bool = True,
    ghost_rescale: GhostRescale = "elementwise",
) -> tuple[Tensor, dict[str, Tensor]]:
    """The PatchSAE training objective for one batch.

    x, x_hat (B, T, d) or (N, d); hidden_pre, codes (..., m); W_dec (m, d); dead_mask (m,) bool
    or None. ``round_residual_fp32`` reproduces the original's two float32 roundings in the
    numerators (x in the MSE, the detached residual in the ghost MSE; no-ops in float32).
    Returns ``(total, terms)``: total () differentiable; terms mse, l1, ghost, total detached ().
    The ghost term is computed only when ``use_ghost_grads`` and ``dead_mask`` has a True.
    """
    _check_inputs(x, hidden_pre, codes, x_hat, W_dec, dead_mask, mse_normalization, ghost_rescale)
    dead = None
    if use_ghost_grads and dead_mask is not None and bool(dead_mask.any()):
        dead = (hidden_pre[..., dead_mask], W_dec[dead_mask, :])
    return patchsae_objective(
        x,
        x_hat,
        l1_coefficient * sparsity_per_position(codes),
        dead,
        mse_cls_coefficient=mse_cls_coefficient,
        mse_normalization=mse_normalization,
        round_residual_fp32=round_residual_fp32,
        ghost_rescale=ghost_rescale,
    )


def patchsae_objective(
    x: Tensor,
    x_hat: Tensor,
    l1: Tensor,
    dead: tuple[Tensor, Tensor] | None,
    *,
    mse_cls_coefficient: float = 1.0,
    mse_normalization: MseNormalization = "patchsae",
    round_residual_fp32: bool = True,
    ghost_rescale: GhostRescale = "elementwise",
) -> tuple[Tensor, dict[str, Tensor]]:
    """``patchsae_loss`` from its parts: the weighted L1 ``l1`` (per position (T,) or ()),
    and ``dead = (hidden_pre_dead (..., n_dead), W_dec_dead (n_dead, d))`` for the ghost term
    (None: no ghost term). Inputs are not checked."""
    mse_e = mse_elementwise(
        x, x_hat, normalization=mse_normalization, round_x_fp32=round_residual_fp32
    )
    ghost = torch.zeros((), dtype=mse_e.dtype, device=mse_e.device)
    if dead is not None:
        ghost = dead_ghost_terms(
            x,
            x_hat,
            *dead,
            mse_e,
            normalization=mse_normalization,
            round_residual_fp32=round_residual_fp32,
            rescale=ghost_rescale,
        ).loss
    if x.ndim == 3 and mse_cls_coefficient != 1.0:
        position_weight = torch.ones(x.shape[1], dtype=mse_e.dtype, device=mse_e.device)
        position_weight[0] = mse_cls_coefficient
        mse_e = mse_e * position_weight[:, None]
    mse = mse_e.mean()
    total = (mse + l1 + ghost).mean()
    terms = {
        "mse": mse.detach(),
        "l1": l1.mean().detach(),
        "ghost": ghost.detach(),
        "total": total.detach(),
    }
    return total, terms


@torch.no_grad()
def normalize_rows_(W_dec: Tensor) -> Tensor:
    """Divide each row of W_dec (m, d) by its L2 norm, in place; returns W_dec."""
    W_dec /= torch.norm(W_dec, dim=1, keepdim=True)
    return W_dec


@torch.no_grad()
def remove_parallel_component_(grad: Tensor, W_dec: Tensor, work: Tensor | None = None) -> Tensor:
    """In place ``grad[i] -= (grad[i] . W_dec[i]) W_dec[i]`` for each row; grad, W_dec (m, d).

    Exactly tangent to the unit sphere only when the rows of W_dec have unit norm. ``work``, an
    (m, d) buffer, receives the elementwise products instead of a fresh tensor (same values as
    ``torch.linalg.vecdot``).
    """
    parallel = torch.mul(grad, W_dec, out=work).sum(-1).unsqueeze(-1)
    return grad.addcmul_(parallel, W_dec, value=-1)
