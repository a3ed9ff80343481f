"""SAE architectures, registry, sparse kernels and the golden PatchSAE init and step."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from patchsae.config import ConfigError, from_dict
from patchsae.sae import config as sae_config
from patchsae.sae import kernels, recipe, registry
from patchsae.sae.base import SAE
from patchsae.sae.config import SAEConfig
from patchsae.sae.registry import available_archs, make_sae, register_sae

ARCHS = ("relu", "topk", "batchtopk", "jumprelu")


def small(arch: str, dtype: str = "float64", **kw) -> SAE:
    torch.manual_seed(0)
    if arch in ("topk", "batchtopk"):
        kw = {"k": 4, "aux_k": 6, **kw}
    return make_sae(SAEConfig(arch=arch, d_in=8, d_sae=32, dtype=dtype, **kw))


def dense_reference(sae: SAE, x: torch.Tensor, dead_mask: torch.Tensor | None):
    """The relu objective with plain autograd: every matmul dense."""
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    codes = torch.relu(pre)
    x_hat = codes @ sae.W_dec + sae.b_dec
    return recipe.patchsae_loss(
        x,
        pre,
        codes,
        x_hat,
        sae.W_dec,
        l1_coefficient=sae.cfg.l1_coefficient,
        dead_mask=dead_mask,
        use_ghost_grads=sae.cfg.use_ghost_grads,
    )


def grads(sae: SAE, total: torch.Tensor) -> dict[str, torch.Tensor]:
    sae.zero_grad(set_to_none=True)
    total.backward()
    return {name: p.grad.clone() for name, p in sae.named_parameters()}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).detach())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("shape", [(6, 8), (2, 3, 8)])
def test_shapes_and_gradients_every_arch(arch, shape):
    sae = small(arch)
    x = torch.randn(shape, dtype=torch.float64)
    codes = sae.encode(x)
    assert codes.shape == (*shape[:-1], 32)
    assert sae.decode(codes).shape == shape
    assert torch.allclose(sae(x), sae.decode(codes))
    dead = torch.zeros(32, dtype=torch.bool)
    dead[:5] = True
    out = sae.loss(x, dead_mask=dead)
    assert out.total.shape == () and out.x_hat.shape == shape
    assert out.fire_counts.dtype == torch.int64 and out.fire_counts.shape == (32,)
    out.total.backward()
    for name, p in sae.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert [n for n, _ in sae.named_parameters()][:4] == ["W_enc", "b_enc", "W_dec", "b_dec"]


def test_registry_and_config_errors():
    assert set(ARCHS) <= set(available_archs())
    assert type(make_sae(SAEConfig(arch="topk", d_in=4, d_sae=8, k=2))).__name__ == "TopKSAE"
    with pytest.raises(ConfigError, match="choose one of.*batchtopk.*jumprelu.*relu.*topk"):
        SAEConfig(arch="gated", d_in=4, d_sae=8)
    with pytest.raises(ValueError, match="k=9 must be between 1 and d_sae=8"):
        SAEConfig(arch="topk", d_in=4, d_sae=8, k=9)
    with pytest.raises(ConfigError, match="d_sae must be >= 1"):
        SAEConfig(d_in=4, d_sae=0)
    with pytest.raises(ConfigError, match="dtype"):
        from_dict(SAEConfig, {"d_in": 4, "d_sae": 8, "dtype": "int8"})
    assert type(SAEConfig(arch="relu", d_in=4, d_sae=8)).__name__ == "ReluConfig"


def test_register_custom_arch(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(sae_config, "_CONFIGS", dict(sae_config._CONFIGS))

    @register_sae("relu_test_double")
    class Doubled(type(small("relu"))):
        def encode(self, x):
            return 2 * super().encode(x)

    sae = make_sae(SAEConfig(arch="relu_test_double", d_in=4, d_sae=8))
    x = torch.randn(3, 4)
    assert torch.allclose(sae.encode(x), 2 * torch.relu(sae.pre_acts(x)))
    assert "relu_test_double" in available_archs()
    assert type(sae.cfg).__name__ == "ReluConfig" and sae.cfg.arch == "relu_test_double"


def test_bad_inputs_are_clear():
    sae = small("relu")
    with pytest.raises(ValueError, match="width 5 but d_in=8"):
        sae.encode(torch.randn(2, 5))
    with pytest.raises(ValueError, match="dead_mask must be a bool tensor of shape"):
        sae.loss(torch.randn(2, 8, dtype=torch.float64), dead_mask=torch.zeros(32))


def test_topk_keeps_exactly_k_largest():
    sae = small("topk")
    with torch.no_grad():
        sae.b_enc.fill_(10.0)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    codes = sae.encode(x)
    assert ((codes != 0).sum(-1) == 4).all()
    pre = sae.pre_acts(x)
    kth = pre.topk(4, dim=-1).values[..., -1:]
    assert torch.equal(codes != 0, pre >= kth)
    assert torch.equal(codes[codes != 0], pre[codes != 0])
    out = sae.loss(x)
    assert int(out.fire_counts.sum()) == 10 * 4
    assert torch.allclose(out.x_hat, sae.decode(codes))


def test_batchtopk_threshold_and_batch_independence():
    sae = small("batchtopk", threshold_momentum=0.5)
    with torch.no_grad():
        sae.b_enc.fill_(3.0)
    sae.train()
    x = torch.randn(10, 8, dtype=torch.float64)
    acts = torch.relu(sae.pre_acts(x)).detach()
    kept = acts.flatten().topk(4 * 10).values
    out = sae.loss(x)
    assert int(out.fire_counts.sum()) == 40
    assert float(sae.threshold) == pytest.approx(float(kept.min()), rel=1e-12)
    first = float(sae.threshold)
    sae.loss(x[:5])
    kept2 = torch.relu(sae.pre_acts(x[:5])).detach().flatten().topk(20).values.min()
    assert float(sae.threshold) == pytest.approx(0.5 * first + 0.5 * float(kept2), rel=1e-12)
    sae.eval()
    codes = sae.encode(x).detach()
    for alone, together in (
        (sae.encode(x[:3]), codes[:3]),
        (sae.encode(torch.cat([x[7:], 5 * x[:4]]))[:3], codes[7:]),
    ):
        assert torch.equal(alone != 0, together != 0)
        assert torch.allclose(alone, together, rtol=1e-12, atol=0)
    assert torch.equal(codes != 0, acts > sae.threshold)
    assert 0 < int((codes != 0).sum()) < 10 * 32


def test_jumprelu_ste_gradients_by_hand():
    sae = small("jumprelu", jumprelu_bandwidth=0.5, jumprelu_threshold_init=0.3, l0_coefficient=0.7)
    x = torch.randn(12, 8, dtype=torch.float64)
    out = sae.loss(x)
    out.total.backward()
    with torch.no_grad():
        acts = torch.relu(sae.pre_acts(x))
        theta = sae.log_threshold.exp()
        eps = 0.5
        active = acts > theta
        codes = acts * active
        x_hat = codes @ sae.W_dec + sae.b_dec
        grad_x_hat = 2 * (x_hat - x) / 12
        grad_codes = grad_x_hat @ sae.W_dec.t()
        kernel = ((acts - theta).abs() < eps / 2).double()
        grad_theta = (grad_codes * -(theta / eps) * kernel).sum(0)
        grad_theta += 0.7 * (-(1 / eps) * kernel / 12).sum(0)
        grad_pre = grad_codes * active * (acts > 0)
    assert kernel.sum() > 0 and active.any() and not active.all()
    assert rel_err(sae.log_threshold.grad, grad_theta * theta) < 1e-12
    assert rel_err(sae.b_enc.grad, grad_pre.sum(0)) < 1e-12
    mse = ((x_hat - x) ** 2).sum(-1).mean()
    assert float(out.terms["mse"]) == pytest.approx(float(mse), rel=1e-12)
    assert float(out.terms["l0"]) == pytest.approx(float(active.sum(-1).double().mean()))


def test_auxk_against_brute_force():
    sae = small("topk", aux_coefficient=0.25)
    x = torch.randn(7, 8, dtype=torch.float64)
    dead = torch.zeros(32, dtype=torch.bool)
    dead[[1, 4, 9, 16, 20, 25, 31]] = True
    out = sae.loss(x, dead_mask=dead)
    with torch.no_grad():
        pre = sae.pre_acts(x)
        codes = sae.encode(x)
        x_hat = codes @ sae.W_dec + sae.b_dec
        residual = x - x_hat
        recon = torch.zeros_like(x)
        for n in range(7):
            dead_pre = sorted(((float(pre[n, j]), j) for j in range(32) if dead[j]), reverse=True)
            for value, j in dead_pre[:6]:
                recon[n] += max(value, 0.0) * sae.W_dec[j]
        aux = sum(
            ((recon[n] - residual[n]) ** 2).sum() / (residual[n] ** 2).sum() for n in range(7)
        )
        mse = sum(((x_hat[n] - x[n]) ** 2).sum() / (x[n] ** 2).sum() for n in range(7))
        aux, mse = aux / 7, mse / 7
    assert float(out.terms["aux"]) == pytest.approx(float(aux), rel=1e-12)
    assert float(out.terms["mse"]) == pytest.approx(float(mse), rel=1e-12)
    assert float(out.total.detach()) == pytest.approx(float(mse + 0.25 * aux), rel=1e-12)
    assert float(sae.loss(x, dead_mask=torch.zeros(32, dtype=torch.bool)).terms["aux"]) == 0.0


def per_token_nmse(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """mean over tokens of ||x_hat_n - x_n||^2 / ||x_n||^2, a token with x_n = 0 counting 0."""
    ratios = [
        ((x_hat[n] - x[n]) ** 2).sum() / (x[n] ** 2).sum() if x[n].any() else x.new_zeros(())
        for n in range(len(x))
    ]
    return torch.stack(ratios).mean()


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_k_sparse_loss_is_per_token_normalised(arch):
    sae = small(arch, aux_coefficient=0.5)
    sae.train()
    with torch.no_grad():
        sae.b_dec.normal_()
    x = torch.randn(9, 8, dtype=torch.float64)
    x[4] = 0.0
    dead = torch.zeros(32, dtype=torch.bool)
    dead[::3] = True
    out = sae.loss(x, dead_mask=dead)
    with torch.no_grad():
        x_hat = out.x_hat
        pre = sae.pre_acts(x).masked_fill(~dead, float("-inf"))
        values, indices = pre.topk(6, dim=-1)
        recon = torch.zeros(9, 32, dtype=torch.float64).scatter(-1, indices, torch.relu(values))
        mse = per_token_nmse(x_hat, x)
        aux = per_token_nmse(recon @ sae.W_dec, x - x_hat)
    assert (x_hat[4] != 0).any() and mse > 0 and aux > 0
    assert float(out.terms["mse"]) == pytest.approx(float(mse), rel=1e-12)
    assert float(out.terms["aux"]) == pytest.approx(float(aux), rel=1e-12)
    assert float(out.total.detach()) == pytest.approx(float(mse + 0.5 * aux), rel=1e-12)
    out.total.backward()
    assert all(torch.isfinite(p.grad).all() for p in sae.parameters())


def test_topk_loss_of_batch_is_mean_of_halves():
    """Data parallel training averages the ranks' gradients: exact for a per-token mean loss."""
    sae = small("topk", aux_coefficient=0.25)
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    with torch.no_grad():
        x[1] += 3.0 * torch.randn(8, dtype=torch.float64)
    dead = torch.zeros(32, dtype=torch.bool)
    dead[[0, 5, 11, 17, 23, 30]] = True
    full_out = sae.loss(x, dead_mask=dead)
    full = grads(sae, full_out.total)
    halves = [sae.loss(half, dead_mask=dead) for half in (x[:1], x[1:])]
    parts = [grads(sae, h.total) for h in halves]
    assert float(full_out.terms["aux"]) > 0
    for key in ("mse", "aux", "total"):
        mean = (halves[0].terms[key] + halves[1].terms[key]) / 2
        assert rel_err(full_out.terms[key], mean) < 1e-12, key
    for name in full:
        assert rel_err(full[name], (parts[0][name] + parts[1][name]) / 2) < 1e-12, name
    assert torch.equal(full_out.fire_counts, halves[0].fire_counts + halves[1].fire_counts)


def _relu_sae(dtype: str, l0_offset: float, ghost: bool) -> SAE:
    torch.manual_seed(3)
    sae = make_sae(
        SAEConfig(d_in=16, d_sae=512, dtype=dtype, use_ghost_grads=ghost, l1_coefficient=1e-2)
    )
    with torch.no_grad():
        sae.b_enc.fill_(l0_offset)
        sae.b_dec.normal_()
    return sae


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("float32", 1e-5)])
@pytest.mark.parametrize("regime", ["sparse", "dense"])
@pytest.mark.parametrize("ghost", [False, True])
def test_relu_sparse_kernels_match_dense_autograd(dtype, tol, regime, ghost):
    sae = _relu_sae(dtype, -0.8 if regime == "sparse" else 0.0, ghost)
    if ghost and dtype == "float32":
        tol = 3e-5  # the elementwise ghost rescaling (factors up to ~1e5) amplifies rounding
    x = torch.randn(4, 16, 16, dtype=getattr(torch, dtype))
    dead = torch.zeros(512, dtype=torch.bool)
    dead[[3, 100, 200, 333, 500]] = True
    with torch.no_grad():
        d = kernels.density(torch.relu(sae.pre_acts(x)).reshape(-1, 512))
    assert (d <= kernels.SPARSE_MAX_DENSITY) == (regime == "sparse")
    out = sae.loss(x, dead_mask=dead)
    ours = grads(sae, out.total)
    ref_total, ref_terms = dense_reference(sae, x, dead)
    ref = grads(sae, ref_total)
    assert rel_err(out.total.detach(), ref_total.detach()) < tol
    for key in ("mse", "l1", "ghost"):
        assert float(out.terms[key]) == pytest.approx(float(ref_terms[key]), rel=tol, abs=1e-30)
    for name in ref:
        assert rel_err(ours[name], ref[name]) < tol, name
    codes = torch.relu(sae.pre_acts(x)).detach()
    assert torch.equal(out.fire_counts, (codes > 0).reshape(-1, 512).sum(0))


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("float32", 1e-5)])
def test_topk_sparse_kernels_match_dense_autograd(dtype, tol):
    torch.manual_seed(5)
    sae = make_sae(SAEConfig(arch="topk", d_in=16, d_sae=512, k=8, aux_k=16, dtype=dtype))
    x = torch.randn(40, 16, dtype=getattr(torch, dtype))
    dead = torch.zeros(512, dtype=torch.bool)
    dead[::7] = True
    out = sae.loss(x, dead_mask=dead)
    ours = grads(sae, out.total)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    values, indices = pre.topk(8, dim=-1)
    codes = torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))
    x_hat = codes @ sae.W_dec + sae.b_dec
    residual = (x - x_hat).detach()
    aux_values, aux_indices = pre.masked_fill(~dead, float("-inf")).topk(16, dim=-1)
    aux_codes = torch.zeros_like(pre).scatter(-1, aux_indices, torch.relu(aux_values))
    aux = (((aux_codes @ sae.W_dec - residual) ** 2).sum(-1) / (residual**2).sum(-1)).mean()
    mse = (((x_hat - x) ** 2).sum(-1) / (x**2).sum(-1)).mean()
    ref_total = mse + sae.cfg.aux_coefficient * aux
    ref = grads(sae, ref_total)
    assert rel_err(out.total.detach(), ref_total.detach()) < tol
    for name in ref:
        assert rel_err(ours[name], ref[name]) < tol, name


@pytest.fixture(params=[None, 16], ids=["one_latent_block", "latent_blocks_of_16"])
def latent_block(request, monkeypatch):
    """Runs a test with the kernels' default latent block (one block at these sizes) and with
    blocks of 16 latents (many blocks, dead or dense latents in several of them)."""
    if request.param:
        monkeypatch.setattr(kernels, "LATENT_BLOCK", request.param)


@pytest.mark.parametrize("dense_columns", [0, 3])
def test_weight_grad_sparse_paths(dense_columns, latent_block):
    torch.manual_seed(1)
    x = torch.randn(64, 16, dtype=torch.float64)
    grad = torch.randn(64, 300, dtype=torch.float64) * (torch.rand(64, 300) < 0.01)
    dense = torch.tensor([7, 150, 299])[:dense_columns]
    grad[:, dense] = torch.randn(64, dense_columns, dtype=torch.float64)
    assert kernels.density(grad) <= kernels.SPARSE_MAX_DENSITY
    assert rel_err(kernels.weight_grad(x, grad), x.t() @ grad) < 1e-12


def _fused_inputs(m: int, offset: float, n_dead: int, seed: int = 2):
    """x (64, 8), W_enc, b_enc, b_dec, W_dec in float64 (leaves needing grad) and dead_idx."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 8, dtype=torch.float64, generator=g)
    W_enc = torch.randn(8, m, dtype=torch.float64, generator=g) / 3
    b_enc = torch.randn(m, dtype=torch.float64, generator=g) * 0.1 + offset
    b_dec = torch.randn(8, dtype=torch.float64, generator=g)
    W_dec = torch.randn(m, 8, dtype=torch.float64, generator=g)
    dead_idx = torch.randperm(m, generator=g)[:n_dead].sort().values
    params = [t.requires_grad_() for t in (x, W_enc, b_enc, b_dec, W_dec)]
    return params, dead_idx


def _objective(x_hat, extra, pre_dead, W_dec_dead, seed: int = 3):
    """A weighted sum of every output, so each one's gradient is exercised."""
    g = torch.Generator().manual_seed(seed)
    probe = torch.randn(x_hat.shape, dtype=torch.float64, generator=g)
    ghost = torch.exp(pre_dead) @ W_dec_dead
    probe_dead = torch.randn(ghost.shape, dtype=torch.float64, generator=g)
    return (x_hat * probe).sum() + 0.7 * extra + (ghost * probe_dead).sum()


@pytest.mark.parametrize("offset", [-2.5, 0.0])
@pytest.mark.parametrize("n_dead", [0, 9])
def test_relu_train_matches_dense_autograd(offset, n_dead, latent_block):
    (x, W_enc, b_enc, b_dec, W_dec), dead_idx = _fused_inputs(200, offset, n_dead)
    x_hat, l1, pre_dead, W_dead, fire_counts = kernels.relu_train(
        x, W_enc, b_enc, b_dec, W_dec, dead_idx
    )
    leaves = (x, W_enc, b_enc, b_dec, W_dec)
    ours = torch.autograd.grad(_objective(x_hat, l1, pre_dead, W_dead), leaves)
    pre = (x - b_dec) @ W_enc + b_enc
    codes = torch.relu(pre)
    ref_x_hat = codes @ W_dec + b_dec
    ref = torch.autograd.grad(
        _objective(ref_x_hat, codes.sum(), pre[:, dead_idx], W_dec[dead_idx]), leaves
    )
    assert (kernels.density(codes) <= kernels.SPARSE_MAX_DENSITY) == (offset < 0)
    assert torch.equal(fire_counts, (codes > 0).sum(0))
    assert rel_err(x_hat, ref_x_hat) < 1e-12 and rel_err(l1, codes.sum()) < 1e-12
    assert torch.equal(pre_dead, pre[:, dead_idx])
    for a, b in zip(ours, ref, strict=True):
        assert rel_err(a, b) < 1e-12


def test_relu_train_dead_latents_that_fire(latent_block):
    """A dead latent active in this batch gets both its sparse and its ghost gradient."""
    (x, W_enc, b_enc, b_dec, W_dec), _ = _fused_inputs(200, -2.5, 0)
    with torch.no_grad():
        b_enc[:3] = 3.0
    dead_idx = torch.tensor([0, 1, 2, 50])
    leaves = (W_enc, b_enc, b_dec, W_dec)
    x_hat, l1, pre_dead, W_dead, _ = kernels.relu_train(x, W_enc, b_enc, b_dec, W_dec, dead_idx)
    ours = torch.autograd.grad(_objective(x_hat, l1, pre_dead, W_dead), leaves)
    pre = (x - b_dec) @ W_enc + b_enc
    codes = torch.relu(pre)
    assert (codes[:, :3] > 0).any()
    ref = torch.autograd.grad(
        _objective(codes @ W_dec + b_dec, codes.sum(), pre[:, dead_idx], W_dec[dead_idx]), leaves
    )
    for a, b in zip(ours, ref, strict=True):
        assert rel_err(a, b) < 1e-12


@pytest.mark.parametrize("n_dead", [0, 9])
def test_topk_train_matches_dense_autograd(n_dead, latent_block):
    (x, W_enc, b_enc, b_dec, W_dec), dead_idx = _fused_inputs(200, 0.0, n_dead)
    with torch.no_grad():
        b_enc[:40] -= 5.0  # some tokens keep negative pre-activations among their top k
    leaves = (x, W_enc, b_enc, b_dec, W_dec)
    x_hat, pre_dead, W_dead, fire_counts = kernels.topk_train(
        x, W_enc, b_enc, b_dec, W_dec, 6, dead_idx
    )
    ours = torch.autograd.grad(_objective(x_hat, 0, pre_dead, W_dead), leaves)
    pre = (x - b_dec) @ W_enc + b_enc
    values, indices = pre.topk(6, dim=-1)
    codes = torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))
    ref_x_hat = codes @ W_dec + b_dec
    ref = torch.autograd.grad(_objective(ref_x_hat, 0, pre[:, dead_idx], W_dec[dead_idx]), leaves)
    assert torch.equal(fire_counts, (codes > 0).sum(0))
    assert rel_err(x_hat, ref_x_hat) < 1e-12
    for a, b in zip(ours, ref, strict=True):
        assert rel_err(a, b) < 1e-12


@pytest.mark.parametrize("arch", ["relu", "topk"])
@pytest.mark.parametrize("offset", [-2.5, 0.0])
def test_reused_scratch_gives_the_fresh_buffers_results(arch, offset):
    """Two forwards through one Scratch (a smaller batch second) before either backward: each
    gives the values and gradients of a call with fresh buffers, in both regimes."""
    scratch = kernels.Scratch()

    def run(x, W_enc, b_enc, b_dec, W_dec, dead_idx, scratch):
        if arch == "relu":
            x_hat, extra, pre_dead, W_dead, fires = kernels.relu_train(
                x, W_enc, b_enc, b_dec, W_dec, dead_idx, scratch
            )
        else:
            x_hat, pre_dead, W_dead, fires = kernels.topk_train(
                x, W_enc, b_enc, b_dec, W_dec, 6, dead_idx, scratch
            )
            extra = 0
        return _objective(x_hat, extra, pre_dead, W_dead), x_hat, fires

    (x, W_enc, b_enc, b_dec, W_dec), dead_idx = _fused_inputs(200, offset, 9)
    leaves = (x, W_enc, b_enc, b_dec, W_dec)
    batches = (x, x[:40] * 1.5)
    shared = [run(xb, W_enc, b_enc, b_dec, W_dec, dead_idx, scratch) for xb in batches]
    for xb, (loss, x_hat, fires) in zip(batches, shared, strict=True):
        fresh_loss, fresh_x_hat, fresh_fires = run(xb, W_enc, b_enc, b_dec, W_dec, dead_idx, None)
        assert torch.equal(x_hat, fresh_x_hat) and torch.equal(fires, fresh_fires)
        got = torch.autograd.grad(loss, leaves, retain_graph=True, allow_unused=True)
        want = torch.autograd.grad(fresh_loss, leaves, allow_unused=True)
        for a, b in zip(got, want, strict=True):
            assert (a is None and b is None) or torch.equal(a, b)


def test_parallel_component_with_a_work_buffer_gives_the_same_projection():
    g = torch.Generator().manual_seed(5)
    W_dec = recipe.normalize_rows_(torch.randn(40, 9, generator=g))
    grad = torch.randn(40, 9, generator=g)
    want = grad - torch.linalg.vecdot(grad, W_dec)[:, None] * W_dec
    work = torch.full((40, 9), float("nan"))
    plain = recipe.remove_parallel_component_(grad.clone(), W_dec)
    assert torch.equal(recipe.remove_parallel_component_(grad.clone(), W_dec, work), plain)
    assert torch.allclose(plain, want, atol=1e-6)


def test_add_rows_equals_index_add():
    g = torch.Generator().manual_seed(4)
    target = torch.randn(50, 7, dtype=torch.float64, generator=g)
    idx = torch.randperm(50, generator=g)[:12]
    rows = torch.randn(12, 7, dtype=torch.float64, generator=g)
    want = target.clone().index_add_(0, idx, rows)
    assert torch.equal(kernels.add_rows_(target, idx, rows), want) and torch.equal(target, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [64, 200, 203])
def test_active_entries_are_nonzeros_in_order(dtype, m):
    """The runs-of-8 search (m a multiple of 8) and the plain one (203, a transposed view) list
    exactly ``nonzero``'s entries: values at zero, -0.0, tiny, infinite and NaN, a NaN beside an
    active entry in the same run, whole rows and runs active or empty."""
    g = torch.Generator().manual_seed(m)
    pre = torch.randn(37, m, generator=g).to(dtype) - 2.0
    pre[3] = 1.0
    pre[5, :16] = 0.5
    pre[7, 0:4] = torch.tensor([float("nan"), 2.0, 0.0, -0.0])
    pre[8, 8:12] = torch.tensor([float("inf"), float("-inf"), 1e-30, -1e-30])
    pre[9, -1] = float("nan")
    pre[10, -2] = 3.0
    for tensor in (pre, pre.t().contiguous().t()):
        rows, cols, values = kernels.active_entries(tensor)
        want_rows, want_cols = (pre > 0).nonzero(as_tuple=True)
        assert torch.equal(rows, want_rows) and torch.equal(cols, want_cols)
        assert torch.equal(values, pre[want_rows, want_cols])
    empty = kernels.active_entries(torch.full((4, 64), -1.0, dtype=dtype))
    assert all(t.numel() == 0 for t in empty)


@pytest.mark.parametrize("block", [1, 3, 16, 512])
def test_latent_sums_dm_equals_brute_force_for_any_block(block):
    """Column j of ``latent_sums_dm`` is the weighted sum of latent j's rows plus its extra row;
    blocks of any size (empty latents, empty blocks, extras in unsorted order at the first and
    last latents) give bit-identical results."""
    g = torch.Generator().manual_seed(8)
    n, d, m = 30, 5, 40
    source = torch.randn(n, d, dtype=torch.float64, generator=g)
    cols = torch.randint(3, 20, (90,), generator=g)
    rows = torch.randint(0, n, (90,), generator=g)
    weights = torch.randn(90, dtype=torch.float64, generator=g)
    extra_idx = torch.tensor([39, 0, 17, 25])
    extra_rows = torch.randn(4, d, dtype=torch.float64, generator=g)
    order = kernels.by_latent_order(cols)
    offsets = kernels._offsets(cols[order], m)
    args = (rows[order], source, offsets, weights[order], (extra_idx, extra_rows))
    got = kernels.latent_sums_dm(*args, block=block)
    want = torch.zeros(d, m, dtype=torch.float64)
    for r, c, w in zip(rows.tolist(), cols.tolist(), weights.tolist(), strict=True):
        want[:, c] += w * source[r]
    want[:, extra_idx] += extra_rows.t()
    assert got.shape == (d, m) and got.is_contiguous()
    assert rel_err(got, want) < 1e-14
    assert torch.equal(got, kernels.latent_sums_dm(*args, block=m))
    no_entries = kernels.latent_sums_dm(
        rows[:0], source, torch.zeros(m, dtype=torch.int64), weights[:0], block=block
    )
    assert torch.equal(no_entries, torch.zeros(d, m, dtype=torch.float64))


def test_kernels_with_nothing_active():
    x = torch.randn(8, 4, dtype=torch.float64)
    W_enc = torch.randn(4, 6, dtype=torch.float64)
    b_enc = torch.full((6,), -100.0, dtype=torch.float64, requires_grad=True)
    W_dec = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    b_dec = torch.randn(4, dtype=torch.float64, requires_grad=True)
    none = torch.zeros(0, dtype=torch.int64)
    x_hat, l1, _, _, fire_counts = kernels.relu_train(x, W_enc, b_enc, b_dec, W_dec, none)
    assert torch.equal(x_hat, b_dec.expand(8, 4)) and not fire_counts.any() and l1 == 0
    (x_hat.sum() + l1).backward()
    assert not b_enc.grad.any() and not W_dec.grad.any()
    assert torch.equal(b_dec.grad, torch.full((4,), 8.0, dtype=torch.float64))
    assert torch.equal(kernels.decode(torch.zeros(8, 6, dtype=torch.float64), W_dec, b_dec), x_hat)
    assert not kernels.weight_grad(x, torch.zeros(8, 6, dtype=torch.float64)).any()


def test_inference_decode_sparse_equals_dense():
    sae = small("topk")
    codes = sae.encode(torch.randn(5, 8, dtype=torch.float64)).detach()
    codes_big = torch.zeros(5, 32, dtype=torch.float64)
    codes_big[:, :1] = codes[:, :1]
    for c in (codes, codes_big):
        with torch.no_grad():
            assert rel_err(sae.decode(c), c @ sae.W_dec + sae.b_dec) < 1e-12


def test_decoder_constraint_switch():
    sae = small("relu", normalize_decoder=False)
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    before = sae.W_dec.detach().clone()
    sae.normalize_decoder_()
    assert torch.equal(sae.W_dec, before)
    on = small("relu")
    with torch.no_grad():
        on.W_dec.mul_(3.0)
    on.normalize_decoder_()
    assert torch.allclose(on.W_dec.norm(dim=1), torch.ones(32, dtype=torch.float64))
    on.loss(torch.randn(3, 8, dtype=torch.float64)).total.backward()
    on.remove_parallel_grad_()
    assert (on.W_dec.grad * on.W_dec).sum(1).abs().max() < 1e-12


def test_tied_init():
    sae = small("relu", init="tied")
    assert torch.equal(sae.W_enc, sae.W_dec.t())
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(32, dtype=torch.float64))


@pytest.mark.shared
def test_golden_init_reproduced(golden):
    torch.manual_seed(42)
    sae = make_sae(SAEConfig(d_in=16, d_sae=64, dtype="float64"))
    assert torch.equal(sae.W_dec, golden["ghost.ctor.W_dec"])
    assert torch.equal(sae.W_enc, golden["ghost.init.W_enc"])
    assert not sae.b_enc.any() and not sae.b_dec.any()


@pytest.mark.shared
@pytest.mark.parametrize("case", ["ghost", "noghost", "f32_ghost"])
def test_golden_step_loss_and_gradients(golden, case):
    g = {k[len(case) + 1 :]: v for k, v in golden.items() if k.startswith(case + ".")}
    tol = 1e-5 if case == "f32_ghost" else 1e-10
    cfg = SAEConfig(d_in=16, d_sae=64, dtype=str(g["x"].dtype).removeprefix("torch."))
    sae = make_sae(dataclasses.replace(cfg))
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "b_dec"):
            getattr(sae, name).copy_(g[f"init.{name}"])
        sae.W_dec.copy_(g["fwd.W_dec"])
    out = sae.loss(g["x"], dead_mask=g["dead_mask"])
    for key in ("mse", "l1", "ghost", "total"):
        assert float(out.terms[key]) == pytest.approx(float(g[f"loss.{key}"]), rel=tol, abs=1e-30)
    assert rel_err(out.x_hat, g["fwd.sae_out"]) < tol
    assert torch.equal(out.fire_counts.float(), g["act_freq_scores.after"])
    out.total.backward()
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert rel_err(getattr(sae, name).grad, g[f"grad.{name}"]) < tol, name
    sae.remove_parallel_grad_()
    assert rel_err(sae.W_dec.grad, g["grad.W_dec_projected"]) < tol


@pytest.mark.parametrize("arch", ["relu", "topk"])
@pytest.mark.parametrize("offset", [-2.0, 0.0])
def test_bfloat16_training_step_follows_float64(arch, offset):
    """The bf16 option runs the same kernels; gradients stay within bf16 rounding. (The ghost
    term's elementwise rescaling, factors up to ~1e5, amplifies rounding: relu runs without.
    The sparse weight gradients accumulate in bf16 inside embedding_bag, hence 25%: a wrong
    kernel is off by 100%.)"""
    torch.manual_seed(4)
    kw = {"k": 8, "init": "patchsae"} if arch == "topk" else {}  # untied: fewer top-k ties
    ref = make_sae(SAEConfig(arch=arch, d_in=16, d_sae=256, dtype="float64", **kw))
    with torch.no_grad():
        ref.b_enc.fill_(offset)
    low = make_sae(SAEConfig(arch=arch, d_in=16, d_sae=256, dtype="bfloat16", **kw))
    low.load_state_dict({k: v.to(torch.bfloat16) for k, v in ref.state_dict().items()})
    ref.load_state_dict({k: v.double() for k, v in low.state_dict().items()})
    x = torch.randn(64, 16, dtype=torch.float64).to(torch.bfloat16).double()
    dead = torch.zeros(256, dtype=torch.bool)
    dead[::9] = True
    dead = dead if arch == "topk" else None
    ours = grads(low, low.loss(x, dead_mask=dead).total)
    want = grads(ref, ref.loss(x, dead_mask=dead).total)
    for name in want:
        assert ours[name].dtype == torch.bfloat16
        assert rel_err(ours[name].double(), want[name]) < 0.25, name
