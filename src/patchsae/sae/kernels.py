"""Sparsity-aware encoder and decoder kernels with exact gradients.

An SAE step at trained sparsity has a dense encoder forward (every pre-activation is needed)
but everything after it only involves the active latents: the decoder forward, the decoder
backward and the encoder's weight gradient. These kernels measure the density of their input
and switch between a dense GEMM path and a sparse path built on ``embedding_bag``; both paths
give the same values and gradients (up to summation order).

Shapes: ``x_nd`` (n tokens, d_in), ``pre_nm`` / ``codes_nm`` (n, m = d_sae), ``W_enc`` (d, m),
``W_dec`` (m, d), ``b_enc`` (m,), ``b_dec`` (d,).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

SPARSE_MAX_DENSITY = 0.05
"""A (n, m) tensor with at most this fraction of nonzeros takes the sparse path."""

DENSE_COLUMN_DENSITY = 0.25
"""In a sparse gradient, a column with more nonzeros than this fraction of n (e.g. a dead latent
with ghost grads) is handled by a small dense GEMM instead."""

DENSITY_SAMPLE_ROWS = 64
"""Rows of a (n, m) tensor inspected to choose a path (the choice never changes the results)."""


def density(t_nm: Tensor) -> float:
    """Fraction of nonzero entries of ``t_nm`` (n, m), estimated on evenly spaced rows."""
    n = t_nm.shape[0]
    sample = t_nm[:: max(1, n // DENSITY_SAMPLE_ROWS)]
    return int(torch.count_nonzero(sample)) / max(sample.numel(), 1)


def _offsets(sorted_bags: Tensor, n_bags: int) -> Tensor:
    """Start offset of each bag (n_bags,) for bag ids ``sorted_bags`` sorted ascending."""
    counts = torch.bincount(sorted_bags, minlength=n_bags)
    return torch.cumsum(counts, 0) - counts


def decode_entries(rows: Tensor, cols: Tensor, values: Tensor, W_dec: Tensor, n: int) -> Tensor:
    """Sum of ``values[i] * W_dec[cols[i]]`` into token ``rows[i]``: (n, d), without b_dec.

    ``rows`` must be sorted ascending (as ``nonzero`` returns them). Differentiable in ``values``
    and ``W_dec``; the backward touches only the listed entries and rows of W_dec.
    """
    return F.embedding_bag(cols, W_dec, _offsets(rows, n), mode="sum", per_sample_weights=values)


def decode_topk(indices_nk: Tensor, values_nk: Tensor, W_dec: Tensor) -> Tensor:
    """Sum of ``values_nk[i, j] * W_dec[indices_nk[i, j]]`` over j: (n, d), without b_dec."""
    return F.embedding_bag(indices_nk, W_dec, mode="sum", per_sample_weights=values_nk)


def dense_fire_counts(codes_nm: Tensor) -> Tensor:
    """(m,) int64: positive entries per column of non-negative ``codes_nm`` (n, m).

    A matrix-vector product of the signs, exact while n < 2**24.
    """
    signs = torch.sign(codes_nm)
    if signs.dtype not in (torch.float32, torch.float64):
        signs = signs.float()
    return torch.mv(signs.t(), signs.new_ones(signs.shape[0])).round().long()


def decode(codes_nm: Tensor, W_dec: Tensor, b_dec: Tensor) -> Tensor:
    """``codes_nm @ W_dec + b_dec`` (n, d); sparse codes only touch their nonzero entries.

    Differentiable only on the dense path: use it for inference, or a plain matmul under autograd.
    """
    n = codes_nm.shape[0]
    if density(codes_nm) > SPARSE_MAX_DENSITY:
        return torch.addmm(b_dec, codes_nm, W_dec)
    rows, cols = codes_nm.nonzero(as_tuple=True)
    return decode_entries(rows, cols, codes_nm[rows, cols], W_dec, n) + b_dec


class _ReluDecode(torch.autograd.Function):
    """``codes = ReLU(pre)``, ``x_hat = codes @ W_dec + b_dec`` and fire counts, in one node.

    The backward masks the incoming code gradient once, adds the decoder's contribution on the
    active entries only (sparse path) or inside the GEMM (dense path).
    """

    @staticmethod
    def forward(ctx, pre_nm: Tensor, W_dec: Tensor, b_dec: Tensor):
        n, m = pre_nm.shape
        codes = torch.relu(pre_nm)
        ctx.sparse = density(codes) <= SPARSE_MAX_DENSITY
        if ctx.sparse:
            rows, cols = codes.nonzero(as_tuple=True)
            values = codes[rows, cols]
            x_hat = decode_entries(rows, cols, values, W_dec, n) + b_dec
            fire_counts = torch.bincount(cols, minlength=m)
            ctx.save_for_backward(codes, W_dec, rows, cols, values)
        else:
            x_hat = torch.addmm(b_dec, codes, W_dec)
            fire_counts = dense_fire_counts(codes)
            ctx.save_for_backward(codes, W_dec)
        ctx.mark_non_differentiable(fire_counts)
        return codes, x_hat, fire_counts

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_codes: Tensor, grad_x_hat: Tensor, _):
        codes, W_dec = ctx.saved_tensors[:2]
        n, m = codes.shape
        if not ctx.sparse:
            grad_pre = torch.addmm(grad_codes, grad_x_hat, W_dec.t())
            torch.ops.aten.threshold_backward.grad_input(grad_pre, codes, 0, grad_input=grad_pre)
            return grad_pre, codes.t() @ grad_x_hat, grad_x_hat.sum(0)
        rows, cols, values = ctx.saved_tensors[2:]
        grad_pre = torch.ops.aten.threshold_backward(grad_codes, codes, 0)
        with torch.enable_grad():
            values = values.detach().requires_grad_()
            weight = W_dec.detach().requires_grad_()
            out = decode_entries(rows, cols, values, weight, n)
            grad_values, grad_w = torch.autograd.grad(out, (values, weight), grad_x_hat)
        grad_pre.view(-1).index_add_(0, rows * m + cols, grad_values)
        return grad_pre, grad_w, grad_x_hat.sum(0)


def relu_decode(pre_nm: Tensor, W_dec: Tensor, b_dec: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(codes (n, m), x_hat (n, d), fire_counts (m,) int64)`` for ``codes = ReLU(pre_nm)``.

    Exact gradients with respect to ``pre_nm``, ``W_dec`` and ``b_dec``. At code density <=
    ``SPARSE_MAX_DENSITY`` the decoder forward and backward touch only the active entries and
    the W_dec rows they use.
    """
    return _ReluDecode.apply(pre_nm, W_dec, b_dec)


def weight_grad(x_nd: Tensor, grad_nm: Tensor) -> Tensor:
    """``x_nd.T @ grad_nm`` (d, m), using only the nonzero entries of a sparse ``grad_nm``.

    Columns of ``grad_nm`` denser than ``DENSE_COLUMN_DENSITY`` (dead latents under ghost grads)
    go through a dense GEMM over those columns; the other entries through ``embedding_bag``.
    """
    n, m = grad_nm.shape
    if density(grad_nm) > SPARSE_MAX_DENSITY:
        return x_nd.t() @ grad_nm
    rows, cols = grad_nm.nonzero(as_tuple=True)
    values = grad_nm[rows, cols]
    col_counts = torch.bincount(cols, minlength=m)
    dense_cols = (col_counts > DENSE_COLUMN_DENSITY * n).nonzero().squeeze(1)
    if dense_cols.numel() > 0:
        keep = col_counts[cols] <= DENSE_COLUMN_DENSITY * n
        rows, cols, values = rows[keep], cols[keep], values[keep]
    order = torch.argsort(cols, stable=True)
    cols = cols[order]
    grad_md = F.embedding_bag(
        rows[order], x_nd, _offsets(cols, m), mode="sum", per_sample_weights=values[order]
    )
    if dense_cols.numel() > 0:
        grad_md[dense_cols] = grad_nm[:, dense_cols].t() @ x_nd
    return grad_md.t().contiguous()


class _Encode(torch.autograd.Function):
    """``pre = (x - b_dec) @ W_enc + b_enc`` with a sparsity-aware weight gradient."""

    @staticmethod
    def forward(ctx, x_nd: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor) -> Tensor:
        x_centred = x_nd - b_dec
        ctx.save_for_backward(x_centred, W_enc)
        return torch.addmm(b_enc, x_centred, W_enc)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_nm: Tensor):
        x_centred, W_enc = ctx.saved_tensors
        need_x, need_w, need_b_enc, need_b_dec = ctx.needs_input_grad
        grad_b_enc = grad_nm.sum(0)
        grad_x = grad_nm @ W_enc.t() if need_x else None
        grad_w = weight_grad(x_centred, grad_nm) if need_w else None
        grad_b_dec = -(W_enc @ grad_b_enc) if need_b_dec else None
        return grad_x, grad_w, grad_b_enc if need_b_enc else None, grad_b_dec


def encode_pre(x_nd: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor) -> Tensor:
    """Pre-activations ``(x_nd - b_dec) @ W_enc + b_enc``: (n, m).

    The backward gets b_dec's gradient from a matrix-vector product instead of the full input
    gradient, and W_enc's gradient from only the nonzero entries when the incoming gradient is
    sparse (ReLU, TopK).
    """
    return _Encode.apply(x_nd, W_enc, b_enc, b_dec)
