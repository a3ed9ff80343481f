"""A tiny atlas on disk (tiny CLIP saved to a folder, a ReLU SAE, a small labelled image folder),
for the explorer's tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from patchsae.data import DataConfig
from patchsae.sae import SAEConfig, make_sae, save
from patchsae.stats import StatsConfig, compute_stats
from tiny_models import tiny_clip

D_SAE = 64
GRID = (4, 4)


def image_folder(root: Path, n_per_class: int = 6) -> Path:
    """Two classes of 40x24 RGB images: bright left halves ("left") or right halves ("right")."""
    rng = np.random.default_rng(0)
    for label, name in enumerate(("left", "right")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            pixels = rng.integers(0, 60, size=(24, 40, 3), dtype=np.uint8)
            half = slice(0, 20) if label == 0 else slice(20, 40)
            pixels[:, half] += np.uint8(150)
            Image.fromarray(pixels).save(root / name / f"{i:03d}.png")
    return root


def build_atlas(
    root: Path, seed: int = 0, name: str = "atlas", model: Path | None = None
) -> dict[str, Path]:
    """Model folder (``model``, else a tiny CLIP saved in ``root``), SAE folder, images and an
    atlas of them under ``root``; returns the paths."""
    model_dir = model or root / "model"
    if model is None and not (model_dir / "config.json").is_file():
        model, processor = tiny_clip(32, 2, 2, 32, 8, 16)
        model.save_pretrained(model_dir)
        processor.save_pretrained(model_dir)
    images = root / "images"
    if not images.is_dir():
        image_folder(images)
    torch.manual_seed(seed)
    sae = make_sae(SAEConfig(arch="relu", d_in=32, d_sae=D_SAE))
    with torch.no_grad():
        sae.b_enc.fill_(0.05)
    sae_dir = save(sae, root / f"sae-{name}")
    out = root / name
    compute_stats(
        StatsConfig(
            sae=str(sae_dir),
            out=str(out),
            model=str(model_dir),
            data=DataConfig(str(images)),
            layer=1,
            top_k=4,
            thumb_size=32,
        )
    )
    return {"atlas": out, "sae": sae_dir, "model": model_dir, "images": images}
