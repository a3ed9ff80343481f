"""Training-step speed of our SAEs against SAELens on this CPU (fp32), on the real workload.

d_in=768, d_sae=24576, 2048 tokens per step; both libraries get the same activations and the
same weights. A step is what the trainer runs: decoder renormalisation, forward + loss +
backward, gradient projection, and the Adam the trainer builds (``patchsae.train.optim.adam``,
fused); SAELens gets torch's fused Adam too. Each round runs every variant of a group back to
back, and a ratio is the median over rounds of the per-round ratio, so load that drifts between
rounds cancels. Every timed step starts from the same weights (restored untimed before it; the
Adam state carries on), so it runs at the sparsity set up below: left to train, L0 falls from
150 to under 20 within ten steps at this learning rate and the later steps would time an easier
workload.

Workload (not i.i.d. Gaussians with one shared offset):

- activations: correlated tokens, ``z @ diag(s) @ Q + mu`` with a power-law spectrum ``s``, a
  random rotation ``Q`` and a mean offset ``mu`` as large as the spread (ViT residuals are
  offset and anisotropic);
- trained sparsity: per-latent encoder biases set so that latent firing frequencies are
  log-normal over about three decades (as in trained SAEs) with a mean L0 of about 150; with
  ``dead`` a random 5% of the latents never fire and are passed as the dead mask, so the ReLU
  step runs ghost grads and the TopK step runs AuxK on them.

Variants: ``relu_ghost`` (trained sparsity, 5% dead, ghost grads on), ``relu_sparse`` (trained
sparsity, none dead), ``relu_init`` (random init, dense codes), ``topk`` (k=64, none dead) and
``topk_aux`` (k=64, 5% dead, AuxK on). SAELens's ``StandardTrainingSAE`` has no ghost grads: it
gets the same dead mask and does no extra work.

Keys of the last line (one JSON object): ``relu_ghost_vs_saelens``, ``relu_sparse_vs_saelens``,
``relu_init_vs_saelens``, ``topk_vs_saelens``, ``topk_aux_vs_saelens`` (speed-ups, SAELens
time / ours), ``tokens_per_s_relu``, ``tokens_per_s_relu_ghost``, ``tokens_per_s_topk``,
``gemm_flops_frac`` (achieved FLOP/s of the dense step's 5 GEMMs of 2 n d m FLOPs each, over
the FLOP/s of one such ``torch.mm`` timed in the same rounds), ``relu_sparse_gemm_share``
(time of that one ``torch.mm``, the sparse step's only full GEMM, over the sparse step's time),
``l0_relu``, ``dead_frac``.

Needs the ``bench`` extra (``pip install -e ".[bench]"``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Callable

import torch

from timing import interleaved_times, medians
from workload import trained_sparsity

try:
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
except ImportError:
    raise SystemExit(
        'bench/train_step.py compares against SAELens: pip install -e ".[bench]"'
    ) from None

from patchsae.sae.base import SAE
from patchsae.sae.config import SAEConfig
from patchsae.sae.registry import make_sae
from patchsae.train.optim import adam

D_IN, D_SAE, TOKENS, K, LR, L1 = 768, 24576, 2048, 64, 4e-4, 8e-5
L0, DEAD_FRAC = 150, 0.05


def activations(seed: int = 1234) -> torch.Tensor:
    """(TOKENS, D_IN) correlated activations: power-law spectrum, random rotation, offset."""
    g = torch.Generator().manual_seed(seed)
    spectrum = torch.arange(1, D_IN + 1, dtype=torch.float32) ** -0.5
    rotation, _ = torch.linalg.qr(torch.randn(D_IN, D_IN, generator=g))
    z = torch.randn(TOKENS, D_IN, generator=g) * spectrum
    offset = torch.randn(D_IN, generator=g) * spectrum.norm() / math.sqrt(D_IN) * 3
    return z @ rotation + offset


def ours_step(sae: SAE, x: torch.Tensor, dead: torch.Tensor | None) -> Callable[[], None]:
    opt = adam(sae.parameters(), lr=LR)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        sae.normalize_decoder_()
        sae.loss(x, dead_mask=dead).total.backward()
        sae.remove_parallel_grad_()
        opt.step()

    return step


def saelens_step(sae, x: torch.Tensor, dead: torch.Tensor | None, coefficients: dict):
    opt = torch.optim.Adam(sae.parameters(), lr=LR, fused=True)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        step_input = TrainStepInput(
            sae_in=x,
            coefficients=coefficients,
            dead_neuron_mask=dead,
            n_training_steps=0,
            is_logging_step=False,
        )
        sae.training_forward_pass(step_input).loss.backward()
        opt.step()

    return step


def restorer(sae: torch.nn.Module) -> Callable[[], None]:
    """Puts back the weights ``sae`` has now (untimed, before every timed step): each step then
    runs at the sparsity the bench set up, instead of drifting as training moves the biases."""
    saved = {name: p.detach().clone() for name, p in sae.named_parameters()}

    def restore() -> None:
        with torch.no_grad():
            for name, p in sae.named_parameters():
                p.copy_(saved[name])

    return restore


def copy_weights(src: SAE, dst: torch.nn.Module) -> None:
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(dst, name).copy_(getattr(src, name))


def ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of num / den (robust to load that drifts between rounds)."""
    return statistics.median(a / b for a, b in zip(num, den, strict=True))


def pair(arch: str, x: torch.Tensor, dead_frac: float | None):
    """(ours, SAELens twin with the same weights, dead mask or None, L0 of ours on x).

    ``dead_frac=None`` keeps the random init (dense ReLU codes)."""
    torch.manual_seed(0)
    if arch == "relu":
        ours = make_sae(SAEConfig(arch="relu", d_in=D_IN, d_sae=D_SAE, l1_coefficient=L1))
        theirs = StandardTrainingSAE(
            StandardTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, l1_coefficient=L1)
        )
    else:
        ours = make_sae(SAEConfig(arch="topk", d_in=D_IN, d_sae=D_SAE, k=K))
        theirs = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K))
    dead = None
    if dead_frac is not None:
        dead = trained_sparsity(ours, x, L0, dead_frac)
        dead = dead if dead.any() else None
    copy_weights(ours, theirs)
    with torch.no_grad():
        l0 = float((ours.encode(x) > 0).sum(-1).float().mean())
    return ours, theirs, dead, l0


def one_mm(x: torch.Tensor, sae: SAE) -> Callable[[], None]:
    """One (TOKENS, D_IN) @ (D_IN, D_SAE) GEMM, the size of each of a dense step's five."""
    W_enc = sae.W_enc.detach()
    return lambda: torch.mm(x, W_enc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per group")
    args = parser.parse_args()
    x = activations()
    rows: list[tuple[str, float, float | None]] = []
    figures: dict[str, float] = {}

    groups = (
        ("relu_ghost", "relu", DEAD_FRAC, {"l1": L1}),
        ("relu_sparse", "relu", 0.0, {"l1": L1}),
        ("relu_init", "relu", None, {"l1": L1}),
        ("topk", "topk", None, {}),
        ("topk_aux", "topk", DEAD_FRAC, {}),
    )
    for name, arch, dead_frac, coefficients in groups:
        ours, theirs, dead, l0 = pair(arch, x, dead_frac)
        steps = {
            "ours": ours_step(ours, x, dead),
            "saelens": saelens_step(theirs, x, dead, coefficients),
        }
        before = {"ours": restorer(ours), "saelens": restorer(theirs)}
        if name in ("relu_sparse", "relu_init"):
            steps["mm"] = one_mm(x, ours)
        t = interleaved_times(steps, args.repeats, before=before)
        med = medians(t)
        n_dead = 0 if dead is None else int(dead.sum())
        rows.append((f"{name} (L0 {l0:.0f}, {n_dead} dead)", med["ours"], med["saelens"]))
        figures[f"{name}_vs_saelens"] = ratio(t["saelens"], t["ours"])
        if name == "relu_ghost":
            figures["tokens_per_s_relu_ghost"] = TOKENS / med["ours"]
            figures["dead_frac"] = n_dead / D_SAE
        if name == "relu_sparse":
            figures["tokens_per_s_relu"] = TOKENS / med["ours"]
            figures["l0_relu"] = l0
            figures["relu_sparse_gemm_share"] = ratio(t["mm"], t["ours"])
            rows.append(("one torch.mm (n x d x m)", med["mm"], None))
        if name == "relu_init":
            figures["gemm_flops_frac"] = ratio([5 * s for s in t["mm"]], t["ours"])
        if name == "topk":
            figures["tokens_per_s_topk"] = TOKENS / med["ours"]
        del ours, theirs, steps

    threads = torch.get_num_threads()
    print(f"train step, fp32, d={D_IN}, d_sae={D_SAE}, {TOKENS} tokens, {threads} threads")
    print(f"{'variant':38s} {'ours s':>9s} {'saelens s':>10s} {'speed-up':>9s}")
    for name, ours_s, theirs_s in rows:
        speedup = f"{theirs_s / ours_s:9.2f}" if theirs_s else ""
        theirs_text = f"{theirs_s:10.3f}" if theirs_s else ""
        print(f"{name:38s} {ours_s:9.3f} {theirs_text:>10s} {speedup}")
    for key, value in figures.items():
        print(f"{key:38s} {value:9.3f}")
    print(json.dumps({"bench": "train_step", **{k: round(v, 3) for k, v in figures.items()}}))


if __name__ == "__main__":
    main()
