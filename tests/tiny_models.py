"""Tiny randomly initialised HF models built in code (seeded), for tests that need a backbone."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    ViTConfig,
    ViTImageProcessor,
    ViTModel,
)


def tiny_clip(
    width: int, n_layers: int, heads: int, image_size: int, patch_size: int, projection_dim: int
) -> tuple[CLIPModel, CLIPImageProcessor]:
    """A CLIP (seed 0) whose text and vision towers have ``n_layers`` blocks of ``width``.

    Images are ``image_size`` px in ``patch_size`` patches: (image_size / patch_size)**2 patches
    + CLS. LayerNorm biases are drawn from N(0, 0.5), so zero-ablated tokens still embed.
    """
    torch.manual_seed(0)
    small = {"hidden_size": width, "intermediate_size": 2 * width, "num_hidden_layers": n_layers}
    cfg = CLIPConfig(
        text_config={**small, "num_attention_heads": heads, "max_position_embeddings": 77},
        vision_config={
            **small,
            "num_attention_heads": heads,
            "image_size": image_size,
            "patch_size": patch_size,
        },
        projection_dim=projection_dim,
    )
    model = CLIPModel(cfg).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.bias.normal_(0.0, 0.5)
    processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return model, processor


def save_tiny_vit(
    folder: Path, width: int, n_layers: int, heads: int, image_size: int, patch_size: int
) -> Path:
    """Save a ViT (seed 0, no pooler) and its processor to ``folder`` with save_pretrained.

    ``n_layers`` blocks of ``width`` (MLP 2 * width) on ``image_size`` px images in
    ``patch_size`` patches: (image_size / patch_size)**2 patches + CLS.
    """
    config = ViTConfig(
        hidden_size=width,
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        intermediate_size=2 * width,
        image_size=image_size,
        patch_size=patch_size,
    )
    torch.manual_seed(0)
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return folder
