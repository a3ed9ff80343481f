"""Training-step speed of our SAEs against SAELens on this CPU (fp32).

d_in=768, d_sae=24576, 2048 tokens per step, the same random activations and the same weights
for both libraries. A step is forward + loss + backward + Adam step (torch's fused CPU Adam
for both). Times are medians of several steps after a warm-up. Each round runs ours and the
baseline back to back, and a ratio is the median over rounds of the per-round ratio, so load
that drifts between rounds cancels.

Needs the ``bench`` extra (``pip install -e ".[bench]"``). The last printed line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable

import torch

from timing import interleaved_times, medians

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

D_IN, D_SAE, TOKENS, K, LR, L1 = 768, 24576, 2048, 64, 4e-4, 8e-5


def ours_step(sae: SAE, opt: torch.optim.Optimizer, x: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        sae.normalize_decoder_()
        sae.loss(x, dead_mask=None).total.backward()
        sae.remove_parallel_grad_()
        opt.step()

    return step


def saelens_step(sae, opt: torch.optim.Optimizer, x: torch.Tensor, coefficients: dict):
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        step_input = TrainStepInput(
            sae_in=x,
            coefficients=coefficients,
            dead_neuron_mask=None,
            n_training_steps=0,
            is_logging_step=False,
        )
        sae.training_forward_pass(step_input).loss.backward()
        opt.step()

    return step


def copy_weights(src: SAE, dst: torch.nn.Module) -> None:
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(dst, name).copy_(getattr(src, name))


def ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of num / den (robust to load that drifts between rounds)."""
    return statistics.median(a / b for a, b in zip(num, den, strict=True))


def sparse_bias(sae: SAE, x: torch.Tensor, l0: float) -> None:
    """Set b_enc to one shared offset giving about ``l0`` active latents per token."""
    with torch.no_grad():
        pre = sae.pre_acts(x[:256]) - sae.b_enc
        cut = torch.quantile(pre.flatten()[::7], 1 - l0 / sae.cfg.d_sae)
        sae.b_enc.fill_(-float(cut))


def relu_pair(x: torch.Tensor, sparse: bool) -> tuple[SAE, torch.nn.Module]:
    torch.manual_seed(0)
    ours = make_sae(SAEConfig(arch="relu", d_in=D_IN, d_sae=D_SAE, l1_coefficient=L1))
    if sparse:
        sparse_bias(ours, x, 150)
    theirs = StandardTrainingSAE(
        StandardTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, l1_coefficient=L1)
    )
    copy_weights(ours, theirs)
    return ours, theirs


def dense_gemms(x: torch.Tensor, sae: SAE) -> Callable[[], None]:
    """The 5 GEMMs of a dense ReLU step, alone, with torch.matmul: encoder forward, decoder
    forward, gradient of the codes, gradient of W_dec, gradient of W_enc (2*n*d*m FLOPs each)."""
    W_enc, W_dec = sae.W_enc.detach(), sae.W_dec.detach()
    codes = torch.relu(x @ W_enc)
    grad_out = torch.randn(TOKENS, D_IN)

    def gemms() -> None:
        torch.matmul(x, W_enc)
        torch.matmul(codes, W_dec)
        torch.matmul(grad_out, W_dec.t())
        torch.matmul(codes.t(), grad_out)
        torch.matmul(x.t(), codes)

    return gemms


def adam(module: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(module.parameters(), lr=LR, fused=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per variant")
    args = parser.parse_args()
    torch.manual_seed(1234)
    x = torch.randn(TOKENS, D_IN)
    rows: list[tuple[str, float, float | None]] = []
    figures: dict[str, float] = {}

    for regime, sparse in (("relu_sparse", True), ("relu_init", False)):
        ours, theirs = relu_pair(x, sparse)
        with torch.no_grad():
            l0 = float((ours.encode(x) > 0).sum(-1).float().mean())
        steps = {
            "ours": ours_step(ours, adam(ours), x),
            "saelens": saelens_step(theirs, adam(theirs), x, {"l1": L1}),
        }
        if not sparse:
            steps["gemm"] = dense_gemms(x, ours)
        t = interleaved_times(steps, args.repeats)
        med = medians(t)
        rows.append((f"{regime} ours (L0 {l0:.0f})", med["ours"], med["saelens"]))
        figures[f"{regime}_vs_saelens"] = ratio(t["saelens"], t["ours"])
        if sparse:
            figures["tokens_per_s_relu"] = TOKENS / med["ours"]
        else:
            rows.append(("5 dense GEMMs alone", med["gemm"], None))
            figures["relu_dense_gflops_frac_of_gemm"] = ratio(t["gemm"], t["ours"])
        del ours, theirs, steps

    torch.manual_seed(0)
    ours = make_sae(SAEConfig(arch="topk", d_in=D_IN, d_sae=D_SAE, k=K))
    theirs = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K))
    copy_weights(ours, theirs)
    t = interleaved_times(
        {
            "ours": ours_step(ours, adam(ours), x),
            "saelens": saelens_step(theirs, adam(theirs), x, {}),
        },
        args.repeats,
    )
    med = medians(t)
    rows.append((f"topk k={K} ours", med["ours"], med["saelens"]))
    figures["topk_vs_saelens"] = ratio(t["saelens"], t["ours"])
    figures["tokens_per_s_topk"] = TOKENS / med["ours"]

    threads = torch.get_num_threads()
    print(f"train step, fp32, d={D_IN}, d_sae={D_SAE}, {TOKENS} tokens, {threads} threads")
    print(f"{'variant':34s} {'ours s':>9s} {'saelens s':>10s} {'speed-up':>9s}")
    for name, ours_s, theirs_s in rows:
        speedup = f"{theirs_s / ours_s:9.2f}" if theirs_s else ""
        theirs_text = f"{theirs_s:10.3f}" if theirs_s else ""
        print(f"{name:34s} {ours_s:9.3f} {theirs_text:>10s} {speedup}")
    for key, value in figures.items():
        print(f"{key:34s} {value:9.3f}")
    print(json.dumps({"bench": "train_step", **{k: round(v, 3) for k, v in figures.items()}}))


if __name__ == "__main__":
    main()
