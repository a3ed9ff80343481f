"""Where a backbone's input lies on the original image: resize, center crop and padding undone.

Hugging Face image processors resize (shortest edge, exact height/width, or fit inside
max height/width) and then center-crop, which pads with zeros when the resized image is smaller
than the crop (a letterbox). :func:`input_box` gives the rectangle of the *original* image that
the model's (H, W) input shows, so that a pixel of the original image maps to a patch and a
patch grid maps back onto the original image. The box may extend past the image (padding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import BackboneError


@dataclass(frozen=True)
class InputBox:
    """The model input (``size_hw`` px) covers original-image pixels ``left..right`` x
    ``top..bottom`` (floats, in original pixels; may lie outside the image when padded)."""

    left: float
    top: float
    right: float
    bottom: float
    size_hw: tuple[int, int]

    def to_input(self, x: float, y: float) -> tuple[float, float]:
        """Original-image pixel (x, y) -> model-input pixel (u, v)."""
        height, width = self.size_hw
        u = (x - self.left) * width / (self.right - self.left)
        v = (y - self.top) * height / (self.bottom - self.top)
        return u, v

    def patch_at(self, x: float, y: float, grid: tuple[int, int]) -> tuple[int, int] | None:
        """(row, col) of the ``grid`` patch covering original pixel (x, y), or None outside."""
        u, v = self.to_input(x, y)
        height, width = self.size_hw
        if not (0 <= u < width and 0 <= v < height):
            return None
        rows, cols = grid
        return min(int(v * rows / height), rows - 1), min(int(u * cols / width), cols - 1)


def _get(size: object, key: str) -> int | None:
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return None if value is None else int(value)


def resized_hw(image_processor: object, image_wh: tuple[int, int]) -> tuple[int, int]:
    """(H, W) of an image of ``image_wh`` = (W, H) after the processor's resize step."""
    width, height = image_wh
    size = getattr(image_processor, "size", None)
    if not getattr(image_processor, "do_resize", True) or size is None:
        return height, width
    shortest, longest = _get(size, "shortest_edge"), _get(size, "longest_edge")
    exact_h, exact_w = _get(size, "height"), _get(size, "width")
    max_h, max_w = _get(size, "max_height"), _get(size, "max_width")
    if exact_h is not None and exact_w is not None:
        return exact_h, exact_w
    if shortest is not None:
        short, long = min(width, height), max(width, height)
        new_short, new_long = shortest, int(shortest * long / short)
        if longest is not None and new_long > longest:
            new_short, new_long = int(longest * new_short / new_long), longest
        return (new_long, new_short) if height >= width else (new_short, new_long)
    if max_h is not None and max_w is not None:
        scale = min(max_h / height, max_w / width)
        return int(height * scale), int(width * scale)
    raise BackboneError(
        f"cannot tell how {type(image_processor).__name__} resizes images (size={size}): "
        "use a processor that resizes by shortest_edge, height/width or max_height/max_width"
    )


def input_box(
    image_processor: object, size_hw: tuple[int, int], image_wh: tuple[int, int]
) -> InputBox:
    """The rectangle of an original (W, H) = ``image_wh`` image that the model input shows.

    ``size_hw`` is the processor's output size (``Backbone.preprocessor.size_hw``).
    """
    width, height = image_wh
    if width < 1 or height < 1:
        raise BackboneError(f"image size must be positive, got {width}x{height}")
    new_h, new_w = resized_hw(image_processor, image_wh)
    if new_h < 1 or new_w < 1:
        raise BackboneError(
            f"a {width}x{height} image resizes to {new_w}x{new_h} px under this processor: "
            "too thin to show the model; use a less elongated image"
        )
    out_h, out_w = size_hw
    top = left = 0
    if getattr(image_processor, "do_center_crop", False):
        top, left = (new_h - out_h) // 2, (new_w - out_w) // 2
    elif (new_h, new_w) != (out_h, out_w):
        raise BackboneError(
            f"the processor resizes to {new_h}x{new_w} px without cropping, not {out_h}x{out_w}"
        )
    sx, sy = width / new_w, height / new_h
    box = InputBox(left * sx, top * sy, (left + out_w) * sx, (top + out_h) * sy, size_hw)
    if not all(math.isfinite(v) for v in (box.left, box.top, box.right, box.bottom)):
        raise BackboneError(f"degenerate input box {box} for a {width}x{height} image")
    return box
