"""Conversion of a decoded PIL image of any mode to 8-bit RGB, shared by data loading and backbones.

One home for this rule, so an image gives the same pixels through ``load_rgb`` as through
``Backbone.preprocess``: transparency is composited onto white and 16-bit gray is scaled to 8 bit.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


class BadImage(ValueError):
    """An image cannot be used: corrupt, truncated, not an image, too large or of bad mode."""


def _sixteen_bit_to_rgb(img: Image.Image) -> Image.Image:
    """Scale a 16-bit gray image (modes ``I;16*`` and ``I``, range 0..65535) to 8-bit RGB."""
    values = np.asarray(img).astype(np.int64)
    values = np.clip(values, 0, 65535)
    gray = ((values * 255 + 32767) // 65535).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` (any PIL mode, decoded) as RGB; transparency is composited onto white.

    16-bit gray (``I;16*``, ``I``) is scaled with ``round(v * 255 / 65535)``; mode ``F`` raises
    :class:`BadImage` (32-bit float has no defined value range).
    """
    if img.mode.startswith("I;16") or img.mode == "I":
        return _sixteen_bit_to_rgb(img)
    if img.mode == "F":
        raise BadImage("mode F (32-bit float) has no defined value range; store it as 8 or 16 bit")
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode == "RGB":
        return img
    return img.convert("RGB")
