"""The PatchSAE training recipe at full size through ``patchsae train``: tokens/s and memory.

ReLU SAE 768 -> 49,152 with ghost grads, 128 images x 197 tokens per step, Adam with warm-up,
read from an activation store of random fp16 activations shaped like CLIP ViT-B/16 block 10
(mean offset and a larger CLS token, so latents fire as on real data). The store holds
``--store-images`` images and is cycled through. Meant for a GPU (``--device cuda``); on a CPU use
small ``--steps`` and ``--images-per-step`` to check the script itself.

The last printed line is one JSON object: tokens_per_s (whole run, start-up and saving included),
steady_tokens_per_s (training loop only, from the run's metrics.jsonl), peak_mem_gib (CUDA
allocator peak, or null on CPU), steps, wall_s.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from patchsae.backbones import TokenLayout
from patchsae.config import load_config
from patchsae.data.store import StoreMetadata, StoreWriter, to_storage
from patchsae.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
TOKENS, D_MODEL = 197, 768


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


def steady_tokens_per_s(metrics_file: Path) -> float:
    """Training tokens/s between the first and the last training line of ``metrics_file``.

    The trainer logs ``tokens_per_s`` = tokens / seconds since its loop started, so each line
    gives its elapsed time; the difference leaves out start-up, the first steps and saving.
    With one line, that line's rate.
    """
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    rows = [r for r in rows if "tokens_per_s" in r]
    first, last = rows[0], rows[-1]
    if first is last:
        return first["tokens_per_s"]
    elapsed_first = first["tokens"] / first["tokens_per_s"]
    elapsed_last = last["tokens"] / last["tokens_per_s"]
    return (last["tokens"] - first["tokens"]) / (elapsed_last - elapsed_first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--images-per-step", type=int, default=128)
    parser.add_argument("--store-images", type=int, default=1024)
    parser.add_argument("--d-sae", type=int, default=49152)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = write_store(Path(tmp) / "store", args.store_images)
        overrides = [
            f"store={store}",
            "model=null",
            f"out={Path(tmp) / 'run'}",
            f"device={args.device}",
            f"batch_images={args.images_per_step}",
            f"total_images={args.steps * args.images_per_step}",
            f"sae.d_sae={args.d_sae}",
            f"checkpoint_every={args.steps}",
            "log_every=50",
        ]
        cfg = load_config(TrainConfig, ROOT / "configs" / "patchsae.yaml", overrides)
        cuda = args.device.startswith("cuda")
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        run = train(cfg)
        wall = time.perf_counter() - start
        steady = steady_tokens_per_s(run / "metrics.jsonl")
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    tokens = args.steps * args.images_per_step * TOKENS
    print(f"device {args.device}: {args.steps} steps of {args.images_per_step} images")
    print(f"  wall (incl. b_dec init and checkpoint) {wall:.1f} s, {tokens / wall:,.0f} tokens/s")
    print(f"  steady state (between the first and the last log line) {steady:,.0f} tokens/s")
    if peak is not None:
        print(f"  peak CUDA memory {peak:.2f} GiB")
    result = {
        "bench": "train_gpu",
        "device": args.device,
        "tokens_per_s": round(tokens / wall, 1),
        "steady_tokens_per_s": round(steady, 1),
        "peak_mem_gib": None if peak is None else round(peak, 3),
        "steps": args.steps,
        "wall_s": round(wall, 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
