"""Where the model's input lies on an image, thumbnails of that view, latent masks as pictures.

A backbone's image processor resizes and crops, pads or stretches each image; the patch grid
covers only the part of the image that reaches the model. :func:`view_box` is that part (from
:mod:`patchsae.backbones.geometry`), so masks land on the right pixels whatever the processor
does (shortest-edge resize + centre crop, letterbox, fixed-size resize).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from patchsae.atomic import write_with
from patchsae.backbones import ImagePreprocessor, TokenLayout
from patchsae.backbones.geometry import input_box

Box = tuple[float, float, float, float]
MaskStyle = str  # "heat" or "darken"
DARKEN = 0.25


def view_box(preprocessor: ImagePreprocessor, size_wh: tuple[int, int]) -> Box:
    """(left, top, right, bottom) in pixels of a ``size_wh`` = (W, H) image: the region the
    model's input shows (:func:`patchsae.backbones.geometry.input_box`). It extends past the
    image where the processor pads (a letterbox)."""
    box = input_box(preprocessor.image_processor, preprocessor.size_hw, tuple(size_wh))
    return (box.left, box.top, box.right, box.bottom)


def thumbnail(image: Image.Image, box: Box, size_hw: tuple[int, int]) -> np.ndarray:
    """(h, w, 3) uint8: the ``box`` of ``image`` (the model's view) resized to ``size_hw``.

    Parts of the box outside the image are black, as the processor's padding is.
    """
    rgb = image.convert("RGB")
    width, height = rgb.size
    left, top, right, bottom = box
    pad_l, pad_t = max(0, math.ceil(-left)), max(0, math.ceil(-top))
    pad_r, pad_b = max(0, math.ceil(right - width)), max(0, math.ceil(bottom - height))
    if pad_l or pad_t or pad_r or pad_b:
        canvas = Image.new("RGB", (width + pad_l + pad_r, height + pad_t + pad_b))
        canvas.paste(rgb, (pad_l, pad_t))
        rgb, box = canvas, (left + pad_l, top + pad_t, right + pad_l, bottom + pad_t)
    h, w = size_hw
    return np.asarray(rgb.resize((w, h), Image.Resampling.BICUBIC, box=box), dtype=np.uint8)


def thumb_size(size: int, input_hw: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of a thumbnail whose longer side is ``size``, with the model input's aspect."""
    h, w = input_hw
    scale = size / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def upsample_grid(
    grid_hw: np.ndarray, size_wh: tuple[int, int], box: Box | None = None
) -> np.ndarray:
    """(H, W) float32: patch values ``grid_hw`` (gh, gw) spread over ``box`` of a W x H image.

    Each patch covers its rectangle of the box (nearest neighbour, so a patch's value never
    leaks into its neighbours); pixels outside the box are 0.
    """
    w, h = size_wh
    left, top, right, bottom = box if box is not None else (0.0, 0.0, float(w), float(h))
    gh, gw = grid_hw.shape
    xs = (np.arange(w) + 0.5 - left) / (right - left) * gw
    ys = (np.arange(h) + 0.5 - top) / (bottom - top) * gh
    col = np.floor(xs).astype(int)
    row = np.floor(ys).astype(int)
    inside = (row[:, None] >= 0) & (row[:, None] < gh) & (col[None, :] >= 0) & (col[None, :] < gw)
    values = np.asarray(grid_hw, dtype=np.float32)[np.clip(row, 0, gh - 1)][
        :, np.clip(col, 0, gw - 1)
    ]
    return np.where(inside, values, 0.0).astype(np.float32)


def _heat(v: np.ndarray) -> np.ndarray:
    """(..., 3) float in [0, 1]: black-red-yellow-white colour ramp of v in [0, 1]."""
    return np.clip(np.stack([3 * v, 3 * v - 1, 3 * v - 2], axis=-1), 0, 1)


def render_mask(
    image_hw3: np.ndarray,
    mask_hw: np.ndarray,
    style: MaskStyle = "heat",
    scale: float | None = None,
) -> np.ndarray:
    """(H, W, 3) uint8 picture of a latent's activation ``mask_hw`` over ``image_hw3`` (uint8).

    ``heat``: where the latent fires, the image is blended half and half with a colour ramp of
    the activation divided by ``scale`` (default: the mask's maximum). ``darken`` (PatchSAE's
    style): pixels where the latent does not fire are darkened to a quarter of their brightness.
    """
    image = np.asarray(image_hw3, dtype=np.float32) / 255.0
    fires = mask_hw > 0
    if style == "darken":
        out = np.where(fires[..., None], image, image * DARKEN)
    elif style == "heat":
        top = float(mask_hw.max()) if scale is None else float(scale)
        level = np.clip(mask_hw / top, 0, 1) if top > 0 else np.zeros_like(mask_hw)
        out = np.where(fires[..., None], 0.5 * image + 0.5 * _heat(level), image)
    else:
        raise ValueError(f"mask style must be 'heat' or 'darken', got {style!r}")
    return np.round(out * 255).astype(np.uint8)


def save_png(array_hw3: np.ndarray, path: str | Path) -> Path:
    """Write a uint8 (H, W, 3) array as a PNG, atomically."""
    path = Path(path)
    picture = Image.fromarray(np.ascontiguousarray(array_hw3, dtype=np.uint8))
    write_with(path, lambda tmp: picture.save(tmp, format="PNG"))
    return path


@torch.no_grad()
def encode_image(backbone: Any, sae: Any, layer: int, image: Image.Image) -> torch.Tensor:
    """codes (T, d_sae) float32 of one RGB ``image``: the backbone's preprocessing, its encode up
    to block ``layer``, then the SAE (the path ``patchsae stats`` takes with ``model=``)."""
    pixels = backbone.preprocessor([image])
    acts = backbone.encode(pixels, layer)[0]
    return sae.encode(acts.to(sae.W_enc.device)).float().cpu()


def patch_grid(codes_tm: np.ndarray | torch.Tensor, layout: TokenLayout, latent: int) -> np.ndarray:
    """(gh, gw) float32: latent ``latent`` over the patch tokens of codes (T, d_sae); CLS and
    registers are left out."""
    codes = np.asarray(codes_tm, dtype=np.float32)
    return codes[list(layout.patch_indices), latent].reshape(layout.grid)


def latent_mask_picture(
    image: Image.Image,
    codes_tm: np.ndarray | torch.Tensor,
    layout: TokenLayout,
    latent: int,
    preprocessor: ImagePreprocessor,
    style: MaskStyle = "heat",
) -> np.ndarray:
    """(H, W, 3) uint8: the mask of ``latent`` drawn on the full ``image`` (the processor's crop,
    padding or stretch undone by :func:`view_box`)."""
    rgb = image.convert("RGB")
    grid = patch_grid(codes_tm, layout, latent)
    mask = upsample_grid(grid, rgb.size, view_box(preprocessor, rgb.size))
    return render_mask(np.asarray(rgb), mask, style)
