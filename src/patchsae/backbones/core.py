"""``Backbone``: run a vision transformer up to a block, and resume from that block.

"Activations at layer L" are the residual stream after block L (HF ``hidden_states[L + 1]``).
``encode`` runs the embeddings and blocks ``0..L`` only; later blocks, the final norm, the head
and any text tower are never run. ``forward_from`` runs blocks ``L + 1..`` and the head.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn

from patchsae.pixels import to_rgb

from .errors import BackboneError
from .families import Parts, l2_normalize, parts_for
from .hashing import folder_hash
from .layout import TokenLayout


class ImagePreprocessor:
    """Picklable ``list[PIL.Image] -> pixel_values (B, 3, H, W)`` float32 on CPU.

    Wraps the model's own Hugging Face image processor, so it can be sent to DataLoader workers
    (fork or spawn). Images are first converted by :func:`patchsae.pixels.to_rgb` (the rule
    ``load_rgb`` uses: alpha onto white, 16-bit scaled); every output must be ``size_hw``.
    """

    def __init__(self, image_processor: object, size_hw: tuple[int, int]):
        self.image_processor = image_processor
        self.size_hw = size_hw

    def __call__(self, images: Sequence[Image.Image]) -> Tensor:
        if len(images) == 0:
            raise BackboneError("preprocess got no images: pass a non-empty list of PIL images")
        rgb = [to_rgb(im) for im in images]
        pixels = self.image_processor(images=rgb, return_tensors="pt")["pixel_values"]
        pixels = torch.as_tensor(pixels, dtype=torch.float32)
        if tuple(pixels.shape[-2:]) != self.size_hw:
            raise BackboneError(
                f"the image processor produced {tuple(pixels.shape[-2:])} px images, not the "
                f"{self.size_hw} px the token layout was computed for: use a processor with a "
                "fixed output size (center crop or explicit height/width)"
            )
        return pixels


def processed_size(image_processor: object, image_size_hw: tuple[int, int]) -> tuple[int, int]:
    """(H, W) that ``image_processor`` outputs for a square image of the model's size."""
    height, width = image_size_hw
    probe = Image.new("RGB", (width, height))
    pixels = image_processor(images=[probe], return_tensors="pt")["pixel_values"]
    return int(pixels.shape[-2]), int(pixels.shape[-1])


def layout_for(parts: Parts, size_hw: tuple[int, int]) -> TokenLayout:
    """Token layout of ``parts`` for (H, W) inputs: CLS, then registers, then the patch grid."""
    (height, width), (patch_h, patch_w) = size_hw, parts.patch_size
    grid = (height // patch_h, width // patch_w)
    if min(grid) < 1:
        raise BackboneError(
            f"images of {size_hw} px are smaller than one {parts.patch_size} px patch: "
            "configure the image processor to output larger images"
        )
    n_prefix = int(parts.has_cls) + parts.n_registers
    return TokenLayout(
        n_tokens=n_prefix + grid[0] * grid[1],
        cls_index=0 if parts.has_cls else None,
        patch_start=n_prefix,
        grid=grid,
        extra_indices=tuple(range(int(parts.has_cls), n_prefix)),
    )


class Backbone:
    """One interface over HF vision transformers (families clip, dinov2, vit, siglip).

    Attributes: ``family``, ``name`` (the hub id, a local folder's resolved absolute path, or the
    name given to :func:`backbone_from_hf`), ``n_layers`` (blocks), ``d_model``,
    ``token_layout`` (for the processor's output size), ``device``, ``dtype``, ``model`` (the HF
    model, in eval mode), ``image_processor``, ``tokenizer`` (clip, or None), ``preprocessor``
    (picklable callable).
    """

    def __init__(
        self,
        model: nn.Module,
        image_processor: object,
        tokenizer: object | None = None,
        *,
        name: str,
        revision: str | None = None,
        folder: Path | None = None,
    ):
        self.model = model.eval()
        self._parts = parts_for(model)
        self.family = self._parts.family
        self.name = name
        self.n_layers = len(self._parts.blocks)
        self.d_model = self._parts.d_model
        weight = next(p for p in model.parameters() if p.is_floating_point())
        self.device, self.dtype = weight.device, weight.dtype
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        size_hw = processed_size(image_processor, self._parts.image_size)
        self.preprocessor = ImagePreprocessor(image_processor, size_hw)
        self.token_layout = layout_for(self._parts, size_hw)
        self._revision = revision
        self._folder = folder
        self._folder_hash: str | None = None

    def __repr__(self) -> str:
        return (
            f"Backbone(name={self.name!r}, family={self.family!r}, n_layers={self.n_layers}, "
            f"d_model={self.d_model}, n_tokens={self.token_layout.n_tokens})"
        )

    def identity(self) -> dict[str, str | None]:
        """What produced the activations: name, family, hub commit, local folder sha256.

        The folder hash reads every weight file, so it is computed on the first call only.
        """
        if self._folder is not None and self._folder_hash is None:
            self._folder_hash = folder_hash(self._folder)
        return {
            "name": self.name,
            "family": self.family,
            "revision": self._revision,
            "folder_hash": self._folder_hash,
        }

    def preprocess(self, images: Sequence[Image.Image]) -> Tensor:
        """``images`` -> pixel_values (B, 3, H, W) float32 CPU, via the model's image processor."""
        return self.preprocessor(images)

    def resolve_layer(self, layer: int) -> int:
        """Block index in ``0..n_layers-1``; negative values count from the end."""
        if isinstance(layer, bool):
            raise BackboneError(f"layer must be an integer block index, got {layer!r}")
        try:
            index = operator.index(layer)
        except TypeError:
            raise BackboneError(f"layer must be an integer block index, got {layer!r}") from None
        n = self.n_layers
        if not -n <= index < n:
            raise BackboneError(
                f"layer {index} is out of range for a {n}-block model: use {-n}..{n - 1}"
            )
        return index % n

    def _pixels(self, pixel_values: Tensor) -> Tensor:
        channels = int(getattr(self._parts.vision_config, "num_channels", 3))
        if not isinstance(pixel_values, Tensor) or pixel_values.ndim != 4:
            raise BackboneError(
                "pixel_values must be a (batch, channels, height, width) tensor, got "
                f"{getattr(pixel_values, 'shape', type(pixel_values).__name__)}: use preprocess()"
            )
        if pixel_values.shape[1] != channels:
            raise BackboneError(
                f"pixel_values has {pixel_values.shape[1]} channels, the model expects "
                f"{channels}: use preprocess(), which converts images to RGB"
            )
        return pixel_values.to(device=self.device, dtype=self.dtype)

    def encode_layers(self, pixel_values: Tensor, layers: Sequence[int]) -> dict[int, Tensor]:
        """One forward pass that stops after the deepest of ``layers``.

        pixel_values: (B, 3, H, W). Returns ``{layer: acts_btd}`` keyed by ``layers`` as given
        (negative keys stay negative), each (B, n_tokens, d_model): the residual stream after
        that block, CLS + registers + patches.
        """
        if len(layers) == 0:
            raise BackboneError("encode_layers got no layers: pass at least one block index")
        resolved = {layer: self.resolve_layer(layer) for layer in layers}
        wanted = set(resolved.values())
        acts_btd = self._parts.embed(self._pixels(pixel_values))
        after: dict[int, Tensor] = {}
        for index in range(max(wanted) + 1):
            acts_btd = self._parts.blocks[index](acts_btd, None)
            if index in wanted:
                after[index] = acts_btd
        return {layer: after[index] for layer, index in resolved.items()}

    def encode(self, pixel_values: Tensor, layer: int) -> Tensor:
        """Residual stream after block ``layer``, equal to HF ``hidden_states[layer + 1]``.

        pixel_values: (B, 3, H, W) -> acts_btd (B, n_tokens, d_model). Later blocks are not run.
        """
        return self.encode_layers(pixel_values, [layer])[layer]

    def forward_from(self, acts_btd: Tensor, layer: int) -> Tensor:
        """Finish the forward from the residual stream after block ``layer``.

        acts_btd: (B, n_tokens, d_model). Returns (B, out_dim): clip, the L2-normalised image
        embedding; dinov2 and vit, the pooled output; siglip, its attention-pooling head output.
        """
        start = self.resolve_layer(layer) + 1
        if acts_btd.ndim != 3 or acts_btd.shape[-1] != self.d_model:
            raise BackboneError(
                f"acts_btd must be (batch, tokens, {self.d_model}), got {tuple(acts_btd.shape)}"
            )
        acts_btd = acts_btd.to(device=self.device, dtype=self.dtype)
        blocks = self._parts.blocks[start:]
        for block in blocks[: len(blocks) - 1]:
            acts_btd = block(acts_btd, None)
        if len(blocks):
            cls_row = self._parts.cls_block(blocks[-1], acts_btd)
            acts_btd = blocks[-1](acts_btd, None) if cls_row is None else cls_row
        return self._parts.head(acts_btd)

    def _require_clip(self, what: str) -> None:
        if self.family != "clip":
            raise BackboneError(f"{what} needs a clip backbone; {self.name!r} is {self.family}")

    def encode_text(self, prompts: Sequence[str]) -> Tensor:
        """Text embeddings (n, proj_dim), L2-normalised: tokenizer + text tower + projection."""
        self._require_clip("encode_text")
        if self.tokenizer is None:
            raise BackboneError(
                f"{self.name!r} has no tokenizer: load it with "
                "load_backbone(..., tokenizer=FOLDER) or pass tokenizer= to backbone_from_hf"
            )
        if len(prompts) == 0 or not all(isinstance(p, str) for p in prompts):
            raise BackboneError("encode_text needs a non-empty list of strings")
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt")
        out = self.model.get_text_features(
            input_ids=tokens["input_ids"].to(self.device),
            attention_mask=tokens["attention_mask"].to(self.device),
        )
        return l2_normalize(out.pooler_output)

    @property
    def logit_scale(self) -> float:
        """exp of CLIP's learned logit scale (100.0 for OpenAI checkpoints)."""
        self._require_clip("logit_scale")
        return float(self.model.logit_scale.detach().exp())
