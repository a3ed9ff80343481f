"""The explorer's logic as plain functions: encode an uploaded image, map a click to a patch,
rank and group latents, draw a latent's mask on the upload.

Nothing here knows about HTTP. Statistics, rankings and mask pictures come from
:mod:`patchsae.stats`; the backbone and SAE from :mod:`patchsae.backbones` and :mod:`patchsae.sae`.
"""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from patchsae.backbones import Backbone, TokenLayout, load_backbone
from patchsae.backbones.geometry import InputBox, input_box
from patchsae.data.images import load_rgb
from patchsae.pixels import BadImage
from patchsae.sae import SAE, load
from patchsae.stats import Atlas, token_set, top_latents
from patchsae.stats.views import encode_image, render_mask, upsample_grid

DISPLAY_SIDE = 512
"""Longest side (px) of the copy of an upload sent back to the browser."""
MAX_PIXELS = 40_000_000
"""Uploads larger than this (width * height) are refused before decoding."""


class ExploreError(ValueError):
    """A request or a start-up option the explorer cannot serve; the message says the fix."""


@dataclass
class Model:
    """One side of the explorer: a backbone, an SAE at ``layer`` and the atlas made with them."""

    name: str
    backbone: Backbone
    sae: SAE
    layer: int
    atlas: Atlas
    include_cls: bool = True
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def layout(self) -> TokenLayout:
        return self.backbone.token_layout


def open_model(
    atlas_dir: str | Path,
    *,
    sae: str | None = None,
    model: str | None = None,
    name: str = "base",
    device: str = "cpu",
) -> Model:
    """Open an atlas with its SAE and backbone (default: the paths the atlas records) and
    check that all three belong together; a mismatch raises :class:`ExploreError`."""
    atlas = Atlas.open(atlas_dir)
    meta = atlas.meta
    sae_path = sae or meta["sae"].get("path")
    model_name = model or meta["backbone"].get("name")
    if not sae_path or not Path(sae_path).exists():
        raise ExploreError(
            f"the SAE of atlas {atlas_dir} ({sae_path}) is not on this machine; pass --sae PATH"
        )
    loaded = load(sae_path, device=device)
    if loaded.cfg.d_sae != atlas.d_sae or loaded.cfg.d_in != meta["sae"]["d_in"]:
        raise ExploreError(
            f"SAE {sae_path} has d_in={loaded.cfg.d_in}, d_sae={loaded.cfg.d_sae} but atlas "
            f"{atlas_dir} was made with d_in={meta['sae']['d_in']}, d_sae={atlas.d_sae}: pass "
            "the SAE the atlas was computed with (--sae)"
        )
    backbone = load_backbone(model_name, device=device)
    _check_adapter(backbone, meta["backbone"].get("adapter"), atlas_dir)
    if backbone.d_model != loaded.cfg.d_in or backbone.token_layout != atlas.token_layout:
        raise ExploreError(
            f"backbone {model_name} (d_model={backbone.d_model}, layout "
            f"{backbone.token_layout.to_dict()}) does not match atlas {atlas_dir} (d_in="
            f"{meta['sae']['d_in']}, layout {meta['token_layout']}): pass the backbone the atlas "
            "was computed with (--model)"
        )
    datasets = list(atlas.datasets.values())
    include_cls = all(ds.meta["options"].get("include_cls", True) for ds in datasets)
    return Model(name, backbone, loaded, int(meta["layer"]), atlas, include_cls)


def _check_adapter(backbone: Backbone, adapter: dict | None, atlas_dir: str | Path) -> None:
    """The atlas's prompt adapter (``backbone.adapter`` in atlas.json) must be the one loaded."""
    learner_hash = getattr(backbone, "learner_hash", None)
    got = None if learner_hash is None else learner_hash()
    want = None if adapter is None else adapter.get("weights_sha256")
    if got != want:
        made_with = f"the {adapter['method']} adapter {want[:12]}" if adapter else "no adapter"
        loaded = f"adapter {got[:12]}" if got else "no adapter"
        raise ExploreError(
            f"atlas {atlas_dir} was made with {made_with} but {backbone.name} has {loaded}: pass "
            "the model the atlas was computed with (--model, or --adapted-model for --adapted; "
            "an adapter folder written by patchsae.adapt.save_adapter)"
        )


@dataclass(frozen=True)
class SparseCodes:
    """SAE codes of one image, (n_tokens, d_sae), in CSR form (rows = tokens)."""

    crow: np.ndarray
    col: np.ndarray
    val: np.ndarray
    shape: tuple[int, int]

    @classmethod
    def from_dense(cls, codes_tm: torch.Tensor) -> SparseCodes:
        dense = codes_tm.float().cpu().numpy()
        rows, cols = np.nonzero(dense)
        crow = np.zeros(dense.shape[0] + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=dense.shape[0]), out=crow[1:])
        return cls(crow, cols, dense[rows, cols], dense.shape)

    def row(self, t: int) -> np.ndarray:
        """(d_sae,) float32 codes of token ``t``."""
        out = np.zeros(self.shape[1], dtype=np.float32)
        lo, hi = self.crow[t], self.crow[t + 1]
        out[self.col[lo:hi]] = self.val[lo:hi]
        return out

    def column(self, j: int) -> np.ndarray:
        """(n_tokens,) float32 codes of latent ``j`` on every token."""
        out = np.zeros(self.shape[0], dtype=np.float32)
        hits = np.flatnonzero(self.col == j)
        out[np.searchsorted(self.crow, hits, side="right") - 1] = self.val[hits]
        return out


@dataclass(frozen=True)
class Encoded:
    """An uploaded image after encoding by every model.

    ``display``: RGB copy at most ``DISPLAY_SIDE`` px; ``size_wh``: the original's size;
    ``box``: the model input's rectangle on the original; ``codes`` and ``image_acts``
    ((d_sae,) image-level activations) by model name.
    """

    display: Image.Image
    size_wh: tuple[int, int]
    box: InputBox
    codes: dict[str, SparseCodes]
    image_acts: dict[str, np.ndarray]


def read_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode an upload to RGB (any PIL mode; transparency onto white, 16 bit scaled).

    Raises :class:`ExploreError` with the reason for anything that is not a usable image.
    """
    if not data:
        raise ExploreError("the upload is empty: choose an image file")
    try:
        return load_rgb(data, max_pixels=max_pixels)
    except BadImage as err:
        raise ExploreError(
            f"cannot use this upload ({err}); upload a PNG, JPEG, WebP, TIFF or BMP image of at "
            f"most {max_pixels / 1e6:g} megapixels"
        ) from None


def image_level(codes_tm: torch.Tensor, layout: TokenLayout, include_cls: bool) -> torch.Tensor:
    """(d_sae,) image-level activations: mean over the atlas's token set (CLS, patches).

    One matrix-vector product with the token set's weights (1 / its size): gathering the rows
    first copies the whole (T, d_sae) matrix, which costs more than the SAE encode on a CPU.
    """
    tokens = token_set(layout, include_cls)
    weights = torch.zeros(codes_tm.shape[0], dtype=codes_tm.dtype, device=codes_tm.device)
    weights[tokens] = 1.0 / len(tokens)
    return weights @ codes_tm


def encode_codes(model: Model, image: Image.Image) -> torch.Tensor:
    """(n_tokens, d_sae) SAE codes of one RGB image at the model's layer (one forward at a
    time per model, so concurrent uploads do not multiply the activations held)."""
    with model.lock:
        return encode_image(model.backbone, model.sae, model.layer, image)


def encode(models: list[Model], image: Image.Image) -> Encoded:
    """Encode ``image`` (RGB) with every model; keeps only sparse codes."""
    backbone = models[0].backbone
    box = input_box(backbone.image_processor, backbone.preprocessor.size_hw, image.size)
    codes, image_acts = {}, {}
    for model in models:
        dense = encode_codes(model, image)
        image_acts[model.name] = image_level(dense, model.layout, model.include_cls).numpy()
        codes[model.name] = SparseCodes.from_dense(dense)
    display = image.copy()
    display.thumbnail((DISPLAY_SIDE, DISPLAY_SIDE), Image.Resampling.BICUBIC)
    return Encoded(display, image.size, box, codes, image_acts)


def patch_at(
    fx: float, fy: float, size_wh: tuple[int, int], box: InputBox, grid: tuple[int, int]
) -> tuple[int, int] | None:
    """(row, col) of the patch under a click, or None outside the model's view.

    ``fx``, ``fy``: the click as fractions of the displayed image's width and height (so any
    display size or CSS scaling works); ``size_wh``: the original image's size.
    """
    if not (0 <= fx <= 1 and 0 <= fy <= 1):
        raise ExploreError(f"click ({fx}, {fy}) must be fractions of the image in 0..1")
    x = min(fx * size_wh[0], size_wh[0] - 1e-6)
    y = min(fy * size_wh[1], size_wh[1] - 1e-6)
    return box.patch_at(x, y, grid)


def patch_latents(codes: SparseCodes, layout: TokenLayout, row: int, col: int) -> np.ndarray:
    """(d_sae,) codes of the patch at (row, col) of ``layout.grid``."""
    rows, cols = layout.grid
    if not (0 <= row < rows and 0 <= col < cols):
        raise ExploreError(f"patch ({row}, {col}) is outside the {rows}x{cols} grid")
    return codes.row(layout.patch_start + row * cols + col)


def group_latents(base: list[int], adapted: list[int]) -> dict[str, list[int]]:
    """Split two top-latent lists into ``common`` (in base order), ``base_only`` and
    ``adapted_only`` (each in its own list's order)."""
    in_base, in_adapted = set(base), set(adapted)
    return {
        "common": [j for j in base if j in in_adapted],
        "base_only": [j for j in base if j not in in_adapted],
        "adapted_only": [j for j in adapted if j not in in_base],
    }


def ranked(values_m: np.ndarray, k: int) -> list[dict[str, float]]:
    """Top ``k`` positive entries as ``[{"latent": j, "value": v}]`` (ties to the lower id)."""
    return [{"latent": j, "value": v} for j, v in top_latents(values_m, k)]


def latent_mask(encoded: Encoded, model: Model, latent: int, style: str = "heat") -> np.ndarray:
    """(h, w, 3) uint8: latent ``latent``'s patch activations drawn over the display image."""
    if not 0 <= latent < model.sae.cfg.d_sae:
        raise ExploreError(f"latent {latent} is outside 0..{model.sae.cfg.d_sae - 1}")
    layout = model.layout
    column = encoded.codes[model.name].column(latent)
    grid = column[layout.patch_indices.start : layout.patch_indices.stop].reshape(layout.grid)
    dw, dh = encoded.display.size
    sx, sy = dw / encoded.size_wh[0], dh / encoded.size_wh[1]
    b = encoded.box
    mask = upsample_grid(grid, (dw, dh), (b.left * sx, b.top * sy, b.right * sx, b.bottom * sy))
    return render_mask(np.asarray(encoded.display), mask, style)


def png_bytes(array_hw3: np.ndarray | Image.Image) -> bytes:
    """PNG encoding (fast compression) of a uint8 (H, W, 3) array or a PIL image."""
    picture = array_hw3 if isinstance(array_hw3, Image.Image) else Image.fromarray(array_hw3)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
