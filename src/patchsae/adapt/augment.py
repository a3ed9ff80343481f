"""Training augmentation of the official few-shot recipe: random resized crop, horizontal flip.

Dassl's ``random_resized_crop`` (torchvision ``RandomResizedCrop``, scale (0.08, 1), ratio
(3/4, 4/3), bicubic) then ``random_flip`` (p = 0.5), drawn from a given numpy generator so a run
is reproducible image by image and resumable at any step.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

RATIO = (3 / 4, 4 / 3)


def crop_box(
    width: int, height: int, scale: tuple[float, float], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop covering a ``scale`` share of the image area with an
    aspect ratio in ``RATIO`` (log-uniform); after 10 misses, the central crop of the largest
    allowed ratio (torchvision's rule)."""
    area = width * height
    log_lo, log_hi = math.log(RATIO[0]), math.log(RATIO[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    ratio = width / height
    if ratio < RATIO[0]:
        w, h = width, round(width / RATIO[0])
    elif ratio > RATIO[1]:
        w, h = round(height * RATIO[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def augment(
    image: Image.Image,
    size_hw: tuple[int, int],
    scale: tuple[float, float],
    rng: np.random.Generator,
) -> Image.Image:
    """``image`` randomly cropped, resized to ``size_hw`` (bicubic) and flipped with p = 0.5."""
    top, left, h, w = crop_box(image.width, image.height, scale, rng)
    out = image.resize(
        (size_hw[1], size_hw[0]), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h)
    )
    if rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return out
