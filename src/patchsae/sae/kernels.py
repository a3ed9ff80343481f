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

import math

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

ACTIVE_RUN = 8
"""On CPU, ``active_entries`` first finds the runs of this many adjacent latents holding an
active entry, then looks inside those runs only."""

LATENT_BLOCK = 512
"""On CPU, ``latent_sums_dm`` sums this many latents at a time, so that each block's (block, d)
sums are transposed into the (d, m) result while they are still in cache."""


class Scratch:
    """Work buffers one SAE's training step reuses instead of allocating them every step.

    A fresh (n, m) float32 tensor of a 2,048-token, 24,576-latent step is 200 MB, and the
    operating system hands it over page by page: on CPU that costs about as much time as a pass
    over it. Buffers are kept by name and grow when asked for more elements.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: Tensor, dtype=None) -> Tensor:
        """An uninitialised tensor of ``shape`` with ``like``'s device (and dtype unless given);
        its memory is reused by the next call with the same ``name``."""
        dtype = dtype or like.dtype
        numel = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != like.device:
            buf = self._buffers[name] = torch.empty(numel, dtype=dtype, device=like.device)
        return buf[:numel].view(shape)


def _scratch(scratch: Scratch | None, name: str, shape: tuple[int, ...], like: Tensor, dtype=None):
    """``scratch.get(...)``, or a fresh tensor when there is no scratch."""
    if scratch is None:
        return torch.empty(shape, dtype=dtype or like.dtype, device=like.device)
    return scratch.get(name, shape, like, dtype)


def density(t_nm: Tensor) -> float:
    """Fraction of nonzero entries of ``t_nm`` (n, m), estimated on evenly spaced rows."""
    n = t_nm.shape[0]
    sample = t_nm[:: max(1, n // DENSITY_SAMPLE_ROWS)]
    return int(torch.count_nonzero(sample)) / max(sample.numel(), 1)


def by_latent_order(cols: Tensor) -> Tensor:
    """The stable permutation (nnz,) that sorts latent ids ``cols`` (nnz,) ascending.

    Sorts them as int32 (latent ids are below 2**31): half the bytes of int64 keys, and about
    twice as fast on CPU.
    """
    return torch.argsort(cols.to(torch.int32), stable=True)


def active_entries(pre_nm: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Row ids, column ids and values (nnz,) of the entries of ``pre_nm`` (n, m) above zero, in
    row-major order (as ``nonzero`` lists them).

    On CPU a comparison that writes a bool tensor has no vectorised kernel (about three times a
    float pass over 200 MB) and ``nonzero`` over that tensor is slow too; at trained sparsity
    most runs of ``ACTIVE_RUN`` adjacent latents hold no active entry, so one vectorised
    ``max_pool1d`` pass finds the runs that do (a run holding a NaN counts as one) and only their
    entries are compared. Elsewhere, or when ``m`` is not a multiple of the run, a plain
    comparison and ``nonzero``.
    """
    n, m = pre_nm.shape
    if pre_nm.device.type != "cpu" or m % ACTIVE_RUN or not pre_nm.is_contiguous():
        rows, cols = (pre_nm > 0).nonzero(as_tuple=True)
        return rows, cols, pre_nm[rows, cols]
    run_max = F.max_pool1d(pre_nm.view(n, 1, m), ACTIVE_RUN).view(-1)
    run_ids = torch.le(run_max, 0).logical_not_().nonzero().squeeze(1)
    runs = pre_nm.view(-1, ACTIVE_RUN).index_select(0, run_ids)
    run_rows, offsets_in_run = (runs > 0).nonzero(as_tuple=True)
    flat = run_ids[run_rows] * ACTIVE_RUN + offsets_in_run
    return flat // m, flat % m, runs[run_rows, offsets_in_run]


def latent_sums_dm(
    by_latent: Tensor,
    source_nd: Tensor,
    offsets: Tensor,
    weights: Tensor,
    extra: tuple[Tensor, Tensor] | None = None,
    block: int | None = None,
) -> Tensor:
    """A weight gradient laid out (d, m): column j is the sum of ``weights[i] *
    source_nd[by_latent[i]]`` over latent j's entries ``offsets[j] <= i < offsets[j + 1]``, plus,
    for ``extra = (extra_idx, extra_rows)``, ``extra_rows[r]`` (k, d) where ``extra_idx[r] == j``
    (k,) distinct latents.

    ``by_latent`` and ``weights`` (nnz,) are sorted by latent and ``offsets`` (m,) is where each
    latent starts. On CPU the latents go ``block`` at a time: each block's sums are made by
    ``embedding_bag`` and transposed while in cache (one transposed copy of the whole (m, d)
    tensor, into fresh memory, costs as much as the sums); elsewhere in one block.
    ``block`` defaults to ``LATENT_BLOCK``.
    """
    m, d, nnz = offsets.shape[0], source_nd.shape[1], by_latent.shape[0]
    block = (block or LATENT_BLOCK) if source_nd.device.type == "cpu" else m
    starts = list(range(0, m, block))
    bounds = [0, nnz]
    if len(starts) > 1:
        bounds = torch.cat([offsets[::block], offsets.new_tensor([nnz])]).tolist()
    extra_idx, extra_rows = extra if extra is not None else (None, None)
    extra_bounds = [0] * (len(starts) + 1)
    if extra_idx is not None and len(starts) == 1:
        extra_bounds = [0, extra_idx.shape[0]]
    elif extra_idx is not None:
        extra_idx, order = torch.sort(extra_idx)
        extra_rows = extra_rows[order]
        extra_bounds = torch.searchsorted(extra_idx, extra_idx.new_tensor([*starts, m])).tolist()
    out = source_nd.new_empty(d, m)
    for i, start in enumerate(starts):
        first, last = bounds[i], bounds[i + 1]
        sums = F.embedding_bag(
            by_latent[first:last],
            source_nd,
            offsets[start : start + block] - first,
            mode="sum",
            per_sample_weights=weights[first:last],
        )
        extra_first, extra_last = extra_bounds[i], extra_bounds[i + 1]
        if extra_last > extra_first:
            idx = extra_idx[extra_first:extra_last] - start
            add_rows_(sums, idx, extra_rows[extra_first:extra_last])
        out[:, start : start + block].copy_(sums.t())
    return out


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


def add_rows_(target: Tensor, idx: Tensor, rows: Tensor) -> Tensor:
    """``target[idx] += rows`` in place for distinct ``idx`` (k,), rows (k, d); returns target.

    The same sums as ``index_add_``, several times faster on CPU for a few thousand rows of a
    large matrix (``index_add_`` scatters element by element there).
    """
    return target.index_put_((idx,), rows, accumulate=True)


def entry_dots(grad_nd: Tensor, W_dec: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """``(grad_nd[rows[i]] * W_dec[cols[i]]).sum()`` for every entry i: (nnz,).

    The gradient of ``decode_entries`` with respect to its values, without an (nnz, d) tensor.
    ``rows`` sorted ascending.
    """
    offsets = _offsets(rows, grad_nd.shape[0])
    return torch.ops.aten._embedding_bag_per_sample_weights_backward(
        grad_nd, W_dec, cols, offsets, rows, 0
    )


def _sparse_grads(ctx, grad_x_hat: Tensor, grad_values: Tensor, grads_dead: tuple) -> tuple:
    """Gradients of (x, W_enc, b_enc, b_dec, W_dec) of a sparse SAE step.

    ``ctx`` holds ``x_centred`` (n, d), ``W_enc``, ``W_dec``, the active entries ``rows``,
    ``cols`` (nnz,) with their activations ``acts`` (nnz,) and ``dead_idx`` (n_dead,);
    ``grad_values`` (nnz,) is the gradient of the pre-activations on the active entries and
    ``grads_dead`` those of ``(pre_dead, W_dec_dead)`` (each None when unused). One sort of the
    entries by latent serves both weight gradients.
    """
    x_centred, W_enc, W_dec, rows, cols, acts, dead_idx = ctx.saved_tensors
    n, m = x_centred.shape[0], W_enc.shape[1]
    order = by_latent_order(cols)
    by_latent, offsets = rows[order], _offsets(cols[order], m)
    grad_w_dec = F.embedding_bag(
        by_latent, grad_x_hat, offsets, mode="sum", per_sample_weights=acts[order]
    )
    grad_b_enc = grad_values.new_zeros(m).index_add_(0, cols, grad_values)
    grad_pre_dead, grad_w_dec_dead = grads_dead
    dead = None
    if grad_pre_dead is not None:
        dead = (dead_idx, grad_pre_dead.t() @ x_centred)
        grad_b_enc.index_add_(0, dead_idx, grad_pre_dead.sum(0))
    grad_w_enc = latent_sums_dm(by_latent, x_centred, offsets, grad_values[order], dead)
    if grad_w_dec_dead is not None:
        add_rows_(grad_w_dec, dead_idx, grad_w_dec_dead)
    grad_x = None
    if ctx.needs_input_grad[0]:
        W_enc_md = W_enc.t().contiguous()
        grad_x = F.embedding_bag(
            cols, W_enc_md, _offsets(rows, n), mode="sum", per_sample_weights=grad_values
        )
        if grad_pre_dead is not None:
            grad_x += grad_pre_dead @ W_enc_md[dead_idx]
    grad_b_dec = grad_x_hat.sum(0) - W_enc @ grad_b_enc
    return grad_x, grad_w_enc, grad_b_enc, grad_b_dec, grad_w_dec


def _dense_grads(ctx, grad_x_hat: Tensor, grad_l1: Tensor | None, grads_dead: tuple) -> tuple:
    """Gradients of (x, W_enc, b_enc, b_dec, W_dec) of a dense ReLU step (plain GEMMs);
    ``grad_l1`` is added to the gradient of every code."""
    x_centred, W_enc, W_dec, codes, dead_idx = ctx.saved_tensors
    grad_pre = grad_x_hat @ W_dec.t()
    if grad_l1 is not None:
        grad_pre += grad_l1
    torch.ops.aten.threshold_backward.grad_input(grad_pre, codes, 0, grad_input=grad_pre)
    grad_pre_dead, grad_w_dec_dead = grads_dead
    if grad_pre_dead is not None:
        grad_pre.index_add_(1, dead_idx, grad_pre_dead)
    grad_b_enc = grad_pre.sum(0)
    grad_x = grad_pre @ W_enc.t() if ctx.needs_input_grad[0] else None
    grad_b_dec = grad_x_hat.sum(0) - W_enc @ grad_b_enc
    grad_w_dec = codes.t() @ grad_x_hat
    if grad_w_dec_dead is not None:
        add_rows_(grad_w_dec, dead_idx, grad_w_dec_dead)
    return grad_x, x_centred.t() @ grad_pre, grad_b_enc, grad_b_dec, grad_w_dec


class _ReluTrain(torch.autograd.Function):
    """The ReLU SAE's training forward in one node: encoder, ReLU, decoder, the sum of the codes
    (L1), and the dead latents' pre-activations and decoder rows (ghost grads).

    At code density <= ``SPARSE_MAX_DENSITY`` the pre-activations (the GEMM's output plus
    ``b_enc``, in place) are only searched for the active entries (``active_entries``; no ReLU
    or L1 pass over them); the backward never builds an (n, m) tensor: the pre-activations'
    gradient is the active entries' values plus the dead columns' block.
    """

    @staticmethod
    def forward(ctx, x_nd, W_enc, b_enc, b_dec, W_dec, dead_idx, scratch):
        ctx.set_materialize_grads(False)
        n, m = x_nd.shape[0], W_enc.shape[1]
        x_centred = x_nd - b_dec
        pre = torch.mm(x_centred, W_enc, out=_scratch(scratch, "n_by_m", (n, m), x_nd))
        pre.add_(b_enc)
        pre_dead = pre.index_select(1, dead_idx)
        sample = pre[:: max(1, n // DENSITY_SAMPLE_ROWS)]
        ctx.sparse = density(sample > 0) <= SPARSE_MAX_DENSITY
        if ctx.sparse:
            rows, cols, acts = active_entries(pre)
            x_hat = decode_entries(rows, cols, acts, W_dec, n) + b_dec
            fire_counts = torch.bincount(cols, minlength=m)
            l1 = acts.sum()
            ctx.save_for_backward(x_centred, W_enc, W_dec, rows, cols, acts, dead_idx)
        else:
            codes = torch.relu(pre)
            x_hat = torch.addmm(b_dec, codes, W_dec)
            fire_counts = dense_fire_counts(codes)
            l1 = codes.sum()
            ctx.save_for_backward(x_centred, W_enc, W_dec, codes, dead_idx)
        ctx.mark_non_differentiable(fire_counts)
        return x_hat, l1, pre_dead, W_dec.index_select(0, dead_idx), fire_counts

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_x_hat, grad_l1, grad_pre_dead, grad_w_dec_dead, _):
        x_centred, _, W_dec = ctx.saved_tensors[:3]
        if grad_x_hat is None:
            grad_x_hat = torch.zeros_like(x_centred)
        grads_dead = (grad_pre_dead, grad_w_dec_dead)
        if not ctx.sparse:
            return (*_dense_grads(ctx, grad_x_hat, grad_l1, grads_dead), None, None)
        rows, cols = ctx.saved_tensors[3:5]
        grad_values = entry_dots(grad_x_hat, W_dec, rows, cols)
        if grad_l1 is not None:
            grad_values += grad_l1
        return (*_sparse_grads(ctx, grad_x_hat, grad_values, grads_dead), None, None)


def relu_train(
    x_nd: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor,
    W_dec: Tensor,
    dead_idx: Tensor,
    scratch: Scratch | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """A ReLU SAE's training forward, with exact gradients with respect to every tensor input.

    Returns ``x_hat (n, d)``, ``l1 ()``, ``pre_dead (n, n_dead)``, ``W_dec_dead (n_dead, d)``
    and ``fire_counts (m,) int64``: ``codes = ReLU((x_nd - b_dec) @ W_enc + b_enc)``,
    ``x_hat = codes @ W_dec + b_dec``, ``l1 = codes.sum()``, ``pre_dead`` the pre-activations
    and ``W_dec_dead`` the decoder rows of the latents ``dead_idx`` (n_dead,) int64. At trained
    sparsity only the active entries, the dead columns and the W_dec rows they use are touched.
    ``scratch`` holds the (n, m) work buffers between calls (None: fresh ones each call).
    """
    return _ReluTrain.apply(x_nd, W_enc, b_enc, b_dec, W_dec, dead_idx, scratch)


class _TopKTrain(torch.autograd.Function):
    """Per-token TopK SAE training forward in one node: encoder, top k, ReLU, decoder, and the
    dead latents' pre-activations and decoder rows (AuxK); the backward touches the n * k
    entries and the dead columns only."""

    @staticmethod
    def forward(ctx, x_nd, W_enc, b_enc, b_dec, W_dec, k, dead_idx, scratch):
        ctx.set_materialize_grads(False)
        n, m = x_nd.shape[0], W_enc.shape[1]
        x_centred = x_nd - b_dec
        pre = torch.addmm(b_enc, x_centred, W_enc, out=_scratch(scratch, "n_by_m", (n, m), x_nd))
        pre_dead = pre.index_select(1, dead_idx)
        values, indices = pre.topk(k, dim=-1, sorted=False)
        acts = torch.relu(values).reshape(-1)
        cols = indices.reshape(-1)
        rows = torch.arange(n, device=cols.device).repeat_interleave(k)
        x_hat = decode_topk(indices, acts.view(n, k), W_dec) + b_dec
        fire_counts = torch.bincount(cols[acts > 0], minlength=m)
        ctx.save_for_backward(x_centred, W_enc, W_dec, rows, cols, acts, dead_idx)
        ctx.mark_non_differentiable(fire_counts)
        return x_hat, pre_dead, W_dec.index_select(0, dead_idx), fire_counts

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_x_hat, grad_pre_dead, grad_w_dec_dead, _):
        x_centred, _, W_dec, rows, cols, acts, _ = ctx.saved_tensors
        if grad_x_hat is None:
            grad_x_hat = torch.zeros_like(x_centred)
        grad_values = entry_dots(grad_x_hat, W_dec, rows, cols) * (acts > 0)
        grads_dead = (grad_pre_dead, grad_w_dec_dead)
        return (*_sparse_grads(ctx, grad_x_hat, grad_values, grads_dead), None, None, None)


def topk_train(
    x_nd: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor,
    W_dec: Tensor,
    k: int,
    dead_idx: Tensor,
    scratch: Scratch | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A TopK SAE's training forward, with exact gradients with respect to every tensor input.

    Returns ``x_hat (n, d)``, ``pre_dead (n, n_dead)``, ``W_dec_dead (n_dead, d)`` and
    ``fire_counts (m,) int64``; codes keep the k largest pre-activations of each token, ReLU
    applied; ``pre_dead`` and ``W_dec_dead`` belong to the latents ``dead_idx`` (n_dead,) int64.
    ``scratch`` holds the (n, m) work buffer between calls (None: a fresh one each call).
    """
    return _TopKTrain.apply(x_nd, W_enc, b_enc, b_dec, W_dec, k, dead_idx, scratch)


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
    dense = None
    if dense_cols.numel() > 0:
        keep = col_counts[cols] <= DENSE_COLUMN_DENSITY * n
        rows, cols, values = rows[keep], cols[keep], values[keep]
        dense = (dense_cols, grad_nm[:, dense_cols].t() @ x_nd)
    order = by_latent_order(cols)
    return latent_sums_dm(rows[order], x_nd, _offsets(cols[order], m), values[order], dense)


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
