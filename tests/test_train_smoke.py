"""Real data: DINOv2-S activations of Fashion-MNIST, a small ReLU SAE learns (FVU and L0 fall)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from assets import DINOV2, FASHION_MNIST
from patchsae.config import from_dict
from patchsae.data.images import DataConfig
from patchsae.extract import ExtractConfig, extract
from patchsae.train import TrainConfig, train

IMAGES = FASHION_MNIST / "train"

pytestmark = [
    pytest.mark.shared,
    pytest.mark.slow,
    pytest.mark.skipif(not (DINOV2.is_dir() and IMAGES.is_dir()), reason="needs ../shared assets"),
]


def test_relu_sae_learns_dinov2_fashion_mnist(tmp_path: Path) -> None:
    torch.set_num_threads(2)  # real data: use both cores; conftest restores 1 afterwards
    store = extract(
        ExtractConfig(
            model=str(DINOV2),
            data=DataConfig(source=str(IMAGES)),
            layers=(-2,),
            out=str(tmp_path / "store"),
            batch_size=20,
            dtype="fp32",
            seed=0,
            limit=40,
            shard_images=40,
            num_workers=0,
        )
    )
    cfg = from_dict(
        TrainConfig,
        {
            "store": str(store),
            "out": str(tmp_path / "run"),
            "sae": {"d_in": 384, "d_sae": 4 * 384, "l1_coefficient": 8e-5},
            "batch_mode": "tokens",
            "batch_tokens": 256,
            "b_dec_init": "geometric_median_tokens",
            "total_tokens": 256 * 100,
            "total_images": None,
            "lr": 4e-4,
            "warmup_steps": 20,
            "eval_images": 8,
            "eval_every": 50,
            "checkpoint_every": 50,
            "log_every": 50,
        },
    )
    out = train(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/fvu" in r]
    first, last = evals[0], evals[-1]
    print(
        f"\nDINOv2-S block 10, Fashion-MNIST (32 train / 8 held-out images), "
        f"d_sae=1536, 100 steps of 256 tokens: FVU {first['eval/fvu']:.3f} -> "
        f"{last['eval/fvu']:.3f}, L0 {first['eval/l0']:.1f} -> {last['eval/l0']:.1f}, "
        f"dead fraction {last['eval/frac_dead']:.3f}"
    )
    assert [r["step"] for r in evals] == [0, 50, 100]
    assert last["eval/fvu"] < 0.5 * first["eval/fvu"]
    assert last["eval/l0"] < first["eval/l0"]
