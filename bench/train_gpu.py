"""The PatchSAE recipe at full size through ``patchsae train``, in its sparse phase, on a GPU.

ReLU SAE 768 -> 49,152 with ghost grads, 128 images x 197 tokens per step, Adam, read from an
fp16 activation store shaped like CLIP ViT-B/16 block 10 (mean offset and a larger CLS token).
A real run spends almost all its steps past the warm-up with trained sparsity and some dead
latents; the dense first steps are a small share. So the run is *resumed* from a checkpoint
written at step ``warmup_steps`` whose weights have trained sparsity (L0 about 150, log-normal
firing frequencies, ``bench/workload.py``) and whose dead-latent counters mark 5% of the latents
dead, so ghost grads run on every step as in a real run.

In the same process it times the dense reference: the same step shape in bf16 with plain
autograd (every GEMM dense), which is what the sparse path has to beat.

Options: ``--tf32`` (TF32 matmuls for the float32 SAE), ``--sync-every`` (steps between the
trainer's host reads, default 16; 1 reads every step), ``--steps``, ``--images-per-step``,
``--d-sae``, ``--prefetch``. Needs CUDA; ``--device cpu`` with small sizes only checks the
script. Keys of the last line (one JSON object): ``steady_tokens_per_s`` (sparse phase, from the
run's metrics, start-up and saving left out), ``input_wait_share`` (share of that phase spent
waiting for input), ``dense_bf16_reference_tokens_per_s``, ``peak_reserved_gib`` (CUDA
allocator, null on CPU), ``l0``, ``dead_frac``, ``device``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from patchsae.backbones import TokenLayout
from patchsae.config import load_config
from patchsae.data.store import StoreMetadata, StoreWriter, to_storage
from patchsae.train import TrainConfig, train, trainer
from patchsae.train.sources import open_source
from workload import trained_sparsity

ROOT = Path(__file__).resolve().parents[1]
TOKENS, D_MODEL, L0, DEAD_FRAC = 197, 768, 150, 0.05


def write_store(root: Path, n_images: int, seed: int = 0) -> Path:
    """An fp16 store of ``n_images`` random (197, 768) images with CLS at token 0."""
    layout = TokenLayout(n_tokens=TOKENS, cls_index=0, patch_start=1, grid=(14, 14))
    plan = StoreMetadata(
        layers=[10],
        dtype="fp16",
        d_model=D_MODEL,
        n_tokens=TOKENS,
        token_layout=layout.to_dict(),
        backbone={"name": "random-clip-vit-b16", "n_layers": 12},
    )
    g = torch.Generator().manual_seed(seed)
    with StoreWriter(root, plan) as writer:
        shard = writer.shard(0, n_images)
        for start in range(0, n_images, 64):
            b = min(64, n_images - start)
            acts = 0.5 + torch.randn(b, TOKENS, D_MODEL, generator=g)
            acts[:, 0] = 1.5 + 1.5 * torch.randn(b, D_MODEL, generator=g)
            shard.append({10: to_storage(acts, "fp16")})
        ids = list(range(n_images))
        writer.finalize([shard.commit({"example_ids": ids, "labels": [-1] * n_images})], [])
    return root


def sparse_checkpoint(cfg: TrainConfig) -> tuple[float, float]:
    """Write ``cfg.out``'s checkpoint at step ``warmup_steps``: trained sparsity, 5% dead.

    Returns (L0, dead fraction) of the weights on the first batch."""
    device = torch.device(cfg.device)
    source = open_source(cfg, device)
    tokens_per_step = cfg.batch_images * source.tokens_per_image
    members = trainer._build_members(cfg, device, tokens_per_step)
    x_first, _ = next(source.batches(source.start_position()))
    x_nd = x_first.reshape(-1, D_MODEL).to(device, torch.float32)
    m = members[0]
    dead = trained_sparsity(m.sae, x_nd, L0, DEAD_FRAC)
    m.counters.copy_(torch.where(dead, cfg.dead_feature_window + 1, 0))
    with torch.no_grad():
        l0 = float((m.sae.encode(x_nd[:4096]) > 0).sum(-1).float().mean())
    step = cfg.warmup_steps
    progress = {
        "step": step,
        "images": step * cfg.batch_images,
        "tokens": step * tokens_per_step,
        "data_position": source.start_position(),
    }
    Path(cfg.out).mkdir(parents=True)
    trainer._checkpoint(cfg, members, progress, source)
    return l0, float(dead.float().mean())


def sparse_phase(metrics_file: Path) -> tuple[float, float]:
    """(tokens/s, input wait share) between the first and the last training line of a resumed
    run's ``metrics_file`` (the trainer logs cumulative ``elapsed_s`` and ``input_wait_s``)."""
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    rows = [r for r in rows if "elapsed_s" in r]
    first, last = rows[0], rows[-1]
    if first is last:
        return first["tokens_per_s"], first["input_wait_s"] / first["elapsed_s"]
    seconds = last["elapsed_s"] - first["elapsed_s"]
    waited = last["input_wait_s"] - first["input_wait_s"]
    return (last["tokens"] - first["tokens"]) / seconds, waited / seconds


def dense_bf16_reference(n_tokens: int, d_sae: int, device: torch.device, steps: int) -> float:
    """Tokens/s of a dense bf16 ReLU SAE step (forward, MSE + L1, backward, fused Adam) of the
    same shape, plain autograd, after two warm-up steps."""
    g = torch.Generator().manual_seed(0)
    bf16 = torch.bfloat16
    x = (torch.randn(n_tokens, D_MODEL, generator=g) + 0.5).to(device, bf16)
    params = [
        torch.randn(D_MODEL, d_sae, generator=g) / D_MODEL**0.5,
        torch.zeros(d_sae),
        torch.randn(d_sae, D_MODEL, generator=g) / d_sae**0.5,
        torch.zeros(D_MODEL),
    ]
    W_enc, b_enc, W_dec, b_dec = (p.to(device, bf16).requires_grad_() for p in params)
    opt = torch.optim.Adam([W_enc, b_enc, W_dec, b_dec], lr=1e-4, fused=True)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        codes = torch.relu((x - b_dec) @ W_enc + b_enc)
        x_hat = codes @ W_dec + b_dec
        loss = (x_hat - x).pow(2).mean() + 8e-5 * codes.sum(-1).mean()
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return steps * n_tokens / (time.perf_counter() - start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=300, help="timed steps after the resume")
    parser.add_argument("--images-per-step", type=int, default=128)
    parser.add_argument("--store-images", type=int, default=1024)
    parser.add_argument("--d-sae", type=int, default=49152)
    parser.add_argument("--prefetch", type=int, default=2, help="prefetch_batches (0: none)")
    parser.add_argument("--tf32", action="store_true", help="TF32 matmuls for the fp32 SAE")
    parser.add_argument(
        "--sync-every", type=int, default=16, help="steps between host reads (sync_every)"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            "bench/train_gpu.py: no CUDA device here; run it on a GPU, or pass --device cpu "
            "with small --d-sae/--images-per-step/--steps to check the script",
            file=sys.stderr,
        )
        raise SystemExit(2)
    warmup = 500
    with tempfile.TemporaryDirectory() as tmp:
        store = write_store(Path(tmp) / "store", args.store_images)
        overrides = [
            f"store={store}",
            "model=null",
            f"out={Path(tmp) / 'run'}",
            f"device={args.device}",
            f"batch_images={args.images_per_step}",
            f"total_images={(warmup + args.steps) * args.images_per_step}",
            f"warmup_steps={warmup}",
            f"sae.d_sae={args.d_sae}",
            f"checkpoint_every={warmup + args.steps}",
            f"log_every={max(1, min(50, args.steps // 4))}",
            f"prefetch_batches={args.prefetch}",
            f"tf32={args.tf32}",
            f"sync_every={args.sync_every}",
            "eval_images=0",
        ]
        cfg = load_config(TrainConfig, ROOT / "configs" / "patchsae.yaml", overrides)
        l0, dead_frac = sparse_checkpoint(cfg)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        run = train(cfg, resume=True)
        steady, wait_share = sparse_phase(run / "metrics.jsonl")
    peak = torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda" else None
    n_tokens = args.images_per_step * TOKENS
    reference = dense_bf16_reference(n_tokens, args.d_sae, device, max(3, args.steps // 10))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name}: {args.steps} steps of {args.images_per_step} images x {TOKENS} tokens")
    print(f"  resumed at step {warmup}: L0 {l0:.0f}, {dead_frac:.1%} dead, ghost grads on")
    print(f"  sparse phase {steady:,.0f} tokens/s, waiting for input {wait_share:.1%}")
    print(f"  dense bf16 reference step {reference:,.0f} tokens/s")
    if peak is not None:
        print(f"  peak reserved CUDA memory {peak:.2f} GiB")
    result = {
        "bench": "train_gpu",
        "device": name,
        "steady_tokens_per_s": round(steady, 1),
        "input_wait_share": round(wait_share, 4),
        "dense_bf16_reference_tokens_per_s": round(reference, 1),
        "peak_reserved_gib": None if peak is None else round(peak, 3),
        "l0": round(l0, 1),
        "dead_frac": round(dead_frac, 4),
        "tf32": args.tf32,
        "sync_every": args.sync_every,
        "steps": args.steps,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
