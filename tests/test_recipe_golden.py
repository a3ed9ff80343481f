"""The PatchSAE recipe against the golden step of the original code and against hand formulas."""

from __future__ import annotations

import math

import pytest
import torch

from compare import rel_err
from patchsae.sae.recipe import (
    ghost_terms,
    mse_elementwise,
    normalize_rows_,
    patchsae_loss,
    remove_parallel_component_,
    sparsity_per_position,
)
from patchsae.train.step import dead_latents, update_dead_counters, warmup_factor

PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")
GHOST_NAMES = (
    "residual",
    "l2_norm_residual",
    "exp_hidden_pre_dead",
    "ghost_out_unscaled",
    "l2_norm_ghost_out",
    "norm_scaling_factor",
    "ghost_out",
    "mse_ghost_elementwise_unscaled",
    "mse_rescaling_factor",
    "mse_ghost_elementwise",
)
CASES = [("ghost", 1e-10), ("noghost", 1e-10), ("f32_ghost", 1e-5)]
BASE_LR = 4e-4
WINDOW = 64
WARMUP = 500


def forward(x, W_enc, b_enc, W_dec, b_dec):
    """The PatchSAE forward: returns hidden_pre, codes, x_hat (all keep the graph)."""
    hidden_pre = (x - b_dec) @ W_enc + b_enc
    codes = torch.relu(hidden_pre)
    return hidden_pre, codes, codes @ W_dec + b_dec


def run_step(golden, case, **loss_kwargs):
    """One training step from the golden inputs; returns every tensor it produced."""
    x = golden[f"{case}.x"]
    params = {
        name: golden[f"{case}.{'fwd' if name == 'W_dec' else 'init'}.{name}"]
        .clone()
        .requires_grad_(True)
        for name in PARAMS
    }
    dead = dead_latents(golden[f"{case}.n_forward_passes_since_fired.before"], WINDOW)
    hidden_pre, codes, x_hat = forward(x, *params.values())
    total, terms = patchsae_loss(
        x,
        hidden_pre,
        codes,
        x_hat,
        params["W_dec"],
        l1_coefficient=8e-5,
        dead_mask=dead,
        use_ghost_grads=True,
        **loss_kwargs,
    )
    out = {"dead": dead, "hidden_pre": hidden_pre, "codes": codes, "x_hat": x_hat}
    out["terms"] = terms
    out["mse_e"] = mse_elementwise(x, x_hat, round_x_fp32=True)
    if dead.any():
        out["ghost"] = ghost_terms(
            x,
            x_hat,
            hidden_pre,
            params["W_dec"],
            dead,
            out["mse_e"],
            round_residual_fp32=loss_kwargs.get("round_residual_fp32", True),
        )
    total.backward()
    out["grad"] = {name: p.grad.clone() for name, p in params.items()}
    remove_parallel_component_(params["W_dec"].grad, params["W_dec"].detach())
    out["grad_projected"] = params["W_dec"].grad.clone()
    lr = BASE_LR * warmup_factor(0, WARMUP)
    before = {name: p.detach().clone() for name, p in params.items()}
    optimizer = torch.optim.Adam(params.values(), lr=lr)
    optimizer.step()
    out["update"] = {name: p.detach() - before[name] for name, p in params.items()}
    out["step"] = {name: p.detach().clone() for name, p in params.items()}
    out["adam"] = {name: optimizer.state[p] for name, p in params.items()}
    out["renormed"] = normalize_rows_(params["W_dec"].detach().clone())
    return out


@pytest.fixture(scope="module")
def steps(golden):
    return {case: run_step(golden, case) for case, _ in CASES}


@pytest.mark.shared
@pytest.mark.parametrize(("case", "rtol"), CASES)
def test_forward_and_losses(golden, steps, case, rtol):
    out = steps[case]
    G = golden
    assert torch.equal(out["dead"], G[f"{case}.dead_mask"])
    assert rel_err(out["hidden_pre"], G[f"{case}.fwd.hidden_pre"]) <= rtol
    assert rel_err(out["codes"], G[f"{case}.fwd.feature_acts"]) <= rtol
    assert rel_err(out["x_hat"], G[f"{case}.fwd.sae_out"]) <= rtol
    assert rel_err(out["mse_e"], G[f"{case}.fwd.mse_elementwise"]) <= rtol
    sparsity = sparsity_per_position(out["codes"].detach())
    assert rel_err(sparsity, G[f"{case}.loss.sparsity_per_position"]) <= rtol
    for name in ("mse", "l1", "ghost", "total"):
        assert rel_err(out["terms"][name], G[f"{case}.loss.{name}"]) <= rtol, name
    if case == "noghost":
        assert out["terms"]["ghost"].item() == 0.0
        assert "ghost" not in out


@pytest.mark.shared
@pytest.mark.parametrize(("case", "rtol"), [c for c in CASES if c[0] != "noghost"])
def test_ghost_intermediates(golden, steps, case, rtol):
    ghost = steps[case]["ghost"]
    for name in GHOST_NAMES:
        assert rel_err(getattr(ghost, name), golden[f"{case}.ghost.{name}"]) <= rtol, name
    assert rel_err(ghost.loss, golden[f"{case}.loss.ghost"]) <= rtol


@pytest.mark.shared
@pytest.mark.parametrize(("case", "rtol"), CASES)
def test_gradients_and_projection(golden, steps, case, rtol):
    out = steps[case]
    for name in PARAMS:
        assert rel_err(out["grad"][name], golden[f"{case}.grad.{name}"]) <= rtol, name
    assert rel_err(out["grad_projected"], golden[f"{case}.grad.W_dec_projected"]) <= rtol


@pytest.mark.shared
@pytest.mark.parametrize(("case", "rtol"), CASES)
def test_adam_step(golden, steps, case, rtol):
    out = steps[case]
    for name in PARAMS:
        start = golden[f"{case}.{'fwd' if name == 'W_dec' else 'init'}.{name}"]
        expected = golden[f"{case}.step.{name}"] - start
        if case == "f32_ghost":
            assert (out["step"][name] - golden[f"{case}.step.{name}"]).abs().max() <= 1e-7
        else:
            assert rel_err(out["update"][name], expected) <= 1e-9, name
        state = out["adam"][name]
        assert rel_err(state["exp_avg"], golden[f"{case}.adam.exp_avg.{name}"]) <= rtol
        assert rel_err(state["exp_avg_sq"], golden[f"{case}.adam.exp_avg_sq.{name}"]) <= rtol
    renorm_tol = 1e-7 if case == "f32_ghost" else rtol
    assert rel_err(out["renormed"], golden[f"{case}.step.W_dec_renormed"]) <= renorm_tol


@pytest.mark.shared
@pytest.mark.parametrize("case", [c for c, _ in CASES])
def test_decoder_renormalisation_and_schedule(golden, case):
    W_dec = golden[f"{case}.init.W_dec"].clone()
    assert rel_err(normalize_rows_(W_dec), golden[f"{case}.fwd.W_dec"]) <= 1e-15
    assert BASE_LR * warmup_factor(0, WARMUP) == golden[f"{case}.lr_step"].item()
    assert BASE_LR * warmup_factor(1, WARMUP) == golden[f"{case}.lr_next"].item()


@pytest.mark.shared
@pytest.mark.parametrize("case", [c for c, _ in CASES])
def test_bookkeeping(golden, steps, case):
    codes = steps[case]["codes"].detach()
    fire_counts = (codes > 0).reshape(-1, codes.shape[-1]).sum(dim=0)
    assert torch.equal(fire_counts > 0, golden[f"{case}.did_fire"])
    assert torch.equal(fire_counts.float(), golden[f"{case}.act_freq_scores.after"])
    counters = golden[f"{case}.n_forward_passes_since_fired.before"].clone()
    update_dead_counters(counters, fire_counts)
    assert torch.equal(counters, golden[f"{case}.n_forward_passes_since_fired.after"])


@pytest.mark.shared
def test_without_fp32_residual_rounding(golden, steps):
    exact = steps["ghost"]
    loose = run_step(golden, "ghost", round_residual_fp32=False)
    for name in GHOST_NAMES:
        assert rel_err(getattr(loose["ghost"], name), golden[f"ghost.ghost.{name}"]) <= 1e-5
    assert rel_err(loose["terms"]["ghost"], golden["ghost.loss.ghost"]) <= 1e-5
    for name in PARAMS:
        assert rel_err(loose["grad"][name], golden[f"ghost.grad.{name}"]) <= 1e-5
    assert rel_err(loose["grad"]["W_enc"], exact["grad"]["W_enc"]) > 1e-9


@pytest.mark.shared
def test_end_to_end_through_make_sae(golden):
    try:
        from patchsae.sae.config import SAEConfig
        from patchsae.sae.registry import make_sae
    except ModuleNotFoundError as err:
        if not (err.name or "").startswith("patchsae"):
            raise
        pytest.skip(f"make_sae is not importable yet ({err})")

    sae = make_sae(SAEConfig(arch="relu", d_in=16, d_sae=64, dtype="float64"))
    sae.train()
    with torch.no_grad():
        for name in PARAMS:
            getattr(sae, name).copy_(golden[f"ghost.init.{name}"])
    sae.normalize_decoder_()
    assert rel_err(sae.W_dec, golden["ghost.fwd.W_dec"]) <= 1e-15
    dead = golden["ghost.dead_mask"]
    out = sae.loss(golden["ghost.x"], dead_mask=dead)
    for name in ("mse", "l1", "ghost"):
        assert rel_err(out.terms[name], golden[f"ghost.loss.{name}"]) <= 1e-10, name
    assert rel_err(out.total, golden["ghost.loss.total"]) <= 1e-10
    assert rel_err(out.x_hat, golden["ghost.fwd.sae_out"]) <= 1e-10
    assert torch.equal(out.fire_counts.float(), golden["ghost.act_freq_scores.after"])
    out.total.backward()
    for name in PARAMS:
        assert rel_err(getattr(sae, name).grad, golden[f"ghost.grad.{name}"]) <= 1e-10, name
    sae.remove_parallel_grad_()
    assert rel_err(sae.W_dec.grad, golden["ghost.grad.W_dec_projected"]) <= 1e-10


# Hand computations on small tensors, independent of the golden file.


def small_batch(seed=0, B=2, T=3, d=4, m=6, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, d, dtype=dtype, generator=g) + 1.0
    W_enc = (0.5 * torch.randn(d, m, dtype=dtype, generator=g)).requires_grad_(True)
    b_enc = (0.1 * torch.randn(m, dtype=dtype, generator=g)).requires_grad_(True)
    W_dec = normalize_rows_(torch.randn(m, d, dtype=dtype, generator=g)).requires_grad_(True)
    b_dec = (0.1 * torch.randn(d, dtype=dtype, generator=g)).requires_grad_(True)
    return x, (W_enc, b_enc, W_dec, b_dec)


def loss_of(x, params, dead=None, ghost=True, **kwargs):
    """patchsae_loss on the forward of params; exact maths (no float32 rounding) unless asked."""
    hidden_pre, codes, x_hat = forward(x, *params)
    kwargs.setdefault("round_residual_fp32", False)
    total, terms = patchsae_loss(
        x,
        hidden_pre,
        codes,
        x_hat,
        params[2],
        l1_coefficient=kwargs.pop("l1_coefficient", 0.01),
        dead_mask=dead,
        use_ghost_grads=ghost,
        **kwargs,
    )
    return total, terms, hidden_pre, codes, x_hat


def test_mse_and_l1_by_hand():
    x, params = small_batch()
    _, terms, _, codes, x_hat = loss_of(x, params, l1_coefficient=0.01, mse_cls_coefficient=3.0)
    B, T, d = x.shape
    mse_sum, l1_sum = 0.0, 0.0
    for b in range(B):
        for t in range(T):
            norm = math.sqrt(sum(v * v for v in x[b, t].tolist()))
            weight = 3.0 if t == 0 else 1.0
            for i in range(d):
                mse_sum += weight * (x_hat[b, t, i].item() - x[b, t, i].item()) ** 2 / norm
            l1_sum += sum(abs(v) for v in codes[b, t].tolist())
    assert terms["mse"].item() == pytest.approx(mse_sum / (B * T * d), rel=1e-12)
    assert terms["l1"].item() == pytest.approx(0.01 * l1_sum / (B * T), rel=1e-12)
    assert terms["ghost"].item() == 0.0
    assert terms["total"].item() == pytest.approx(
        mse_sum / (B * T * d) + 0.01 * l1_sum / (B * T), rel=1e-12
    )


def test_float32_rounding_of_numerators():
    x, params = small_batch(seed=7)
    _, _, x_hat = forward(x, *params)
    exact = mse_elementwise(x, x_hat, round_x_fp32=False)
    rounded = mse_elementwise(x, x_hat, round_x_fp32=True)
    norm = x.norm(dim=-1, keepdim=True)
    assert torch.allclose(rounded, (x_hat - x.float().double()) ** 2 / norm, rtol=1e-14)
    assert 1e-12 < rel_err(rounded, exact) < 1e-5
    x32 = x.float().double()
    assert torch.equal(
        mse_elementwise(x32, x_hat, round_x_fp32=True),
        mse_elementwise(x32, x_hat, round_x_fp32=False),
    )
    dead = torch.tensor([True, False, False, False, False, True])
    _, on, *_ = loss_of(x32, params, dead=dead, round_residual_fp32=True)
    _, off, *_ = loss_of(x32, params, dead=dead, round_residual_fp32=False)
    assert on["mse"].item() == off["mse"].item()
    assert 0 < abs(on["ghost"].item() - off["ghost"].item()) < 1e-6 * off["ghost"].item()


def test_unnormalised_mse_and_flat_input():
    x, params = small_batch(seed=1)
    _, terms, _, _, x_hat = loss_of(x, params, mse_normalization="none")
    assert terms["mse"].item() == pytest.approx(((x_hat - x) ** 2).mean().item(), rel=1e-12)
    dead = torch.tensor([True, False, False, True, False, False])
    _, terms_3d, *_ = loss_of(x, params, dead=dead)
    _, terms_2d, *_ = loss_of(x.reshape(-1, x.shape[-1]), params, dead=dead)
    for name in ("mse", "l1", "ghost", "total"):
        assert terms_2d[name].item() == pytest.approx(terms_3d[name].item(), rel=1e-12)


def test_ghost_term_by_hand():
    x, params = small_batch(seed=2)
    W_dec = params[2]
    dead = torch.tensor([False, True, False, False, True, False])
    _, terms, hidden_pre, _, x_hat = loss_of(x, params, dead=dead)
    expected = 0.0
    B, T, d = x.shape
    for b in range(B):
        for t in range(T):
            r = [x[b, t, i].item() - x_hat[b, t, i].item() for i in range(d)]
            e = [math.exp(hidden_pre[b, t, k].item()) for k in (1, 4)]
            g = [e[0] * W_dec[1, i].item() + e[1] * W_dec[4, i].item() for i in range(d)]
            r_norm = math.sqrt(sum(v * v for v in r))
            x_norm = math.sqrt(sum(x[b, t, i].item() ** 2 for i in range(d)))
            c = r_norm / (1e-6 + 2 * math.sqrt(sum(v * v for v in g)))
            for i in range(d):
                mse_e = (x_hat[b, t, i].item() - x[b, t, i].item()) ** 2 / x_norm
                ghost_e = (c * g[i] - r[i]) ** 2 / r_norm
                expected += mse_e / (ghost_e + 1e-6) * ghost_e
    assert terms["ghost"].item() == pytest.approx(expected / (B * T * d), rel=1e-10)


def test_ghost_scaling_to_half_residual():
    x, params = small_batch(seed=3)
    dead = torch.tensor([True, True, False, False, False, True])
    hidden_pre, _, x_hat = forward(x, *params)
    mse_e = mse_elementwise(x, x_hat)
    ghost = ghost_terms(x, x_hat, hidden_pre, params[2], dead, mse_e)
    assert ghost.mse_rescaling_factor.shape == x.shape
    half = ghost.residual.norm(dim=-1) / 2
    assert torch.allclose(ghost.ghost_out.norm(dim=-1), half, rtol=1e-5)
    assert ghost.exp_hidden_pre_dead.shape == (*x.shape[:-1], 3)
    total = ghost_terms(x, x_hat, hidden_pre, params[2], dead, mse_e, rescale="total")
    assert total.mse_rescaling_factor.ndim == 0
    assert total.loss.item() == pytest.approx(mse_e.mean().item(), rel=1e-4)
    assert ghost.loss.item() == pytest.approx(mse_e.mean().item(), rel=1e-3)


def test_ghost_mask_and_gradient_routing():
    x, params = small_batch(seed=4)
    no_dead = torch.zeros(6, dtype=torch.bool)
    for dead, ghost in ((no_dead, True), (None, True), (torch.ones(6, dtype=torch.bool), False)):
        _, terms, *_ = loss_of(x, params, dead=dead, ghost=ghost)
        assert terms["ghost"].item() == 0.0
    counters = torch.tensor([0, 64, 65, 3, 1000, 64])
    dead = dead_latents(counters, WINDOW)
    assert dead.tolist() == [False, False, True, False, True, False]

    def grads(use_ghost):
        for p in params:
            p.grad = None
        total, *_ = loss_of(x, params, dead=dead, ghost=use_ghost)
        total.backward()
        return [p.grad.clone() for p in params]

    with_ghost, without = grads(True), grads(False)
    alive = ~dead
    assert torch.equal(with_ghost[0][:, alive], without[0][:, alive])
    assert torch.equal(with_ghost[1][alive], without[1][alive])
    assert torch.equal(with_ghost[2][alive], without[2][alive])
    assert not torch.allclose(with_ghost[0][:, dead], without[0][:, dead])
    assert not torch.allclose(with_ghost[2][dead], without[2][dead])
    assert not torch.allclose(with_ghost[3], without[3])


def test_cls_coefficient_leaves_ghost_alone():
    x, params = small_batch(seed=5)
    dead = torch.tensor([False, False, True, False, False, False])
    _, base, *_ = loss_of(x, params, dead=dead)
    _, scaled, *_ = loss_of(x, params, dead=dead, mse_cls_coefficient=5.0)
    assert scaled["ghost"].item() == base["ghost"].item()
    assert scaled["mse"].item() > base["mse"].item()


def test_decoder_constraints_after_a_step():
    x, params = small_batch(seed=6, m=8)
    W_dec = params[2]
    total, *_ = loss_of(x, params, dead=torch.zeros(8, dtype=torch.bool))
    total.backward()
    raw = W_dec.grad.clone()
    remove_parallel_component_(W_dec.grad, W_dec.detach())
    tangent = W_dec.grad
    radial = (raw * W_dec.detach()).sum(dim=-1, keepdim=True)
    zeros = torch.zeros(8, dtype=W_dec.dtype)
    assert torch.allclose((tangent * W_dec.detach()).sum(dim=-1), zeros, atol=1e-15)
    assert torch.allclose(tangent + radial * W_dec.detach(), raw, atol=1e-15)
    torch.optim.Adam(params, lr=1e-2).step()
    assert not torch.allclose(W_dec.detach().norm(dim=1), torch.ones(8, dtype=W_dec.dtype))
    direction = W_dec.detach() / W_dec.detach().norm(dim=1, keepdim=True)
    normalize_rows_(W_dec)
    assert torch.allclose(W_dec.detach().norm(dim=1), torch.ones(8, dtype=W_dec.dtype))
    assert torch.allclose(W_dec.detach(), direction, atol=1e-15)


def test_warmup_schedule_matches_lambdalr():
    assert warmup_factor(0, 500) == 1 / 500
    assert warmup_factor(499, 500) == 1.0
    assert warmup_factor(10_000, 500) == 1.0
    assert warmup_factor(7, 0) == 1.0
    with pytest.raises(ValueError):
        warmup_factor(0, -1)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_factor(s, 4))
    for step in range(7):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.3 * warmup_factor(step, 4))
        optimizer.step()
        scheduler.step()


def test_dead_counters():
    counters = torch.tensor([0.0, 63.0, 64.0, 200.0])
    update_dead_counters(counters, torch.tensor([0, 0, 3, 0]))
    assert counters.tolist() == [1.0, 64.0, 0.0, 201.0]
    assert dead_latents(counters, WINDOW).tolist() == [False, False, False, True]
    with pytest.raises(ValueError, match="differ"):
        update_dead_counters(counters, torch.zeros(3))


def test_bad_inputs_name_the_problem():
    x, params = small_batch()
    hidden_pre, codes, x_hat = forward(x, *params)
    W_dec = params[2]
    kwargs = {"l1_coefficient": 0.01, "use_ghost_grads": True}
    with pytest.raises(ValueError, match="dead_mask must be a bool"):
        patchsae_loss(x, hidden_pre, codes, x_hat, W_dec, dead_mask=torch.zeros(6), **kwargs)
    with pytest.raises(ValueError, match="x_hat shape"):
        patchsae_loss(x, hidden_pre, codes, x_hat[:1], W_dec, dead_mask=None, **kwargs)
    with pytest.raises(ValueError, match="hidden_pre must have shape"):
        patchsae_loss(x, hidden_pre[..., :3], codes, x_hat, W_dec, dead_mask=None, **kwargs)
    with pytest.raises(ValueError, match="mse_normalization"):
        patchsae_loss(
            x, hidden_pre, codes, x_hat, W_dec, dead_mask=None, mse_normalization="l2", **kwargs
        )
    with pytest.raises(ValueError, match=r"\(B, T, d\) or \(N, d\)"):
        patchsae_loss(
            x[0, 0], hidden_pre[0, 0], codes[0, 0], x_hat[0, 0], W_dec, dead_mask=None, **kwargs
        )
