"""Paths of the real assets in ../shared (the folder beside the project root).

Tests that use them skip when the path is absent.
"""

from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
GOLDEN_STEP = SHARED / "golden" / "patchsae_sae_step.safetensors"
GOLDEN_CHECKPOINT = SHARED / "golden" / "patchsae_checkpoint"
DINOV2 = SHARED / "assets" / "dinov2-small-imgfocus"
FASHION_MNIST = SHARED / "data" / "fashion-mnist-small"
CLIP_TOKENIZER = SHARED / "assets" / "clip-tokenizer"
