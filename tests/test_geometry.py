"""input_box against the real image processors: a bright spot lands where the box says."""

import numpy as np
import pytest
from PIL import Image
from transformers import AutoImageProcessor, CLIPImageProcessor, ViTImageProcessor

from assets import DINOV2
from patchsae.backbones import BackboneError
from patchsae.backbones.core import ImagePreprocessor, processed_size
from patchsae.backbones.geometry import input_box

SHAPES = [(64, 64), (96, 40), (40, 96), (33, 250), (500, 301), (20, 12)]


def processors():
    yield (
        "clip",
        CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
    )
    yield "vit", ViTImageProcessor(size={"height": 32, "width": 48})
    if DINOV2.is_dir():
        yield "dinov2", AutoImageProcessor.from_pretrained(DINOV2)


def spot_center(processor, size_hw, wh, xy, radius):
    """Model-input (u, v) centroid of a white disc drawn at original pixel ``xy``."""
    yy, xx = np.mgrid[0 : wh[1], 0 : wh[0]]
    disc = ((xx + 0.5 - xy[0]) ** 2 + (yy + 0.5 - xy[1]) ** 2) <= radius**2
    image = Image.fromarray((disc * 255).astype(np.uint8)).convert("RGB")
    pixels = ImagePreprocessor(processor, size_hw)([image])[0, 0].numpy()
    weight = pixels - pixels.min()
    vv, uu = np.mgrid[0 : size_hw[0], 0 : size_hw[1]]
    return (weight * (uu + 0.5)).sum() / weight.sum(), (weight * (vv + 0.5)).sum() / weight.sum()


@pytest.mark.parametrize("wh", SHAPES)
def test_spot_lands_where_the_box_says(wh):
    for name, processor in processors():
        size_hw = processed_size(processor, (32, 32) if name != "dinov2" else (224, 224))
        box = input_box(processor, size_hw, wh)
        radius = min(wh) / 8
        scale = size_hw[1] / (box.right - box.left)
        for fx, fy in [(0.5, 0.5), (0.3, 0.7), (0.7, 0.4)]:
            xy = (fx * wh[0], fy * wh[1])
            u, v = box.to_input(*xy)
            if not (radius * scale < u < size_hw[1] - radius * scale):
                continue
            if not (radius * scale < v < size_hw[0] - radius * scale):
                continue
            got_u, got_v = spot_center(processor, size_hw, wh, xy, radius)
            tol = 1.0 + scale
            assert abs(got_u - u) < tol and abs(got_v - v) < tol, (name, wh, xy, (u, v))


def test_patch_at_edges_and_outside():
    crop = {"height": 32, "width": 32}
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=crop)
    box = input_box(processor, (32, 32), (200, 100))  # crop keeps x in 50..150
    assert box.left == pytest.approx(50) and box.right == pytest.approx(150)
    assert box.patch_at(49.9, 50, (4, 4)) is None
    assert box.patch_at(50, 0, (4, 4)) == (0, 0)
    assert box.patch_at(149.99, 99.99, (4, 4)) == (3, 3)
    assert box.patch_at(100, 50, (4, 4)) == (2, 2)


def test_unknown_resize_is_refused():
    class Odd:
        do_resize = True
        size = {"pixels": 3}

    with pytest.raises(BackboneError, match="cannot tell how"):
        input_box(Odd(), (32, 32), (10, 10))
