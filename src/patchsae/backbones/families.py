"""Per-family access to a Hugging Face vision model's parts: embeddings, blocks, head.

Each family exposes the three pieces a stop-at-block forward needs:

- ``embed(pixel_values_bchw) -> acts_btd``: the token sequence fed to block 0 (CLIP includes
  its ``pre_layrnorm``), with position embeddings interpolated the way the model does it when
  the input size differs from the config's ``image_size``.
- ``blocks``: the transformer blocks, each called as ``block(acts_btd, None) -> acts_btd``
  (transformers 5 signature: hidden states, attention mask).
- ``head(acts_btd) -> pooled``: what the full model computes after its last block.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from transformers.models.clip.modeling_clip import CLIPEncoderLayer

from .errors import BackboneError


def pair(value: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """``16 -> (16, 16)``; a 2-sequence is returned as a tuple."""
    if isinstance(value, (tuple, list)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


def l2_normalize(x: Tensor) -> Tensor:
    """``x / ||x||`` over the last dim: sqrt of the sum of squares, no epsilon (as HF CLIP)."""
    return x / x.pow(2).sum(dim=-1, keepdim=True).sqrt()


class Parts:
    """The pieces of one vision tower. Subclasses set the attributes and implement both calls."""

    family: str
    blocks: nn.ModuleList
    vision_config: object
    has_cls: bool = True
    n_registers: int = 0

    @property
    def patch_size(self) -> tuple[int, int]:
        return pair(self.vision_config.patch_size)

    @property
    def image_size(self) -> tuple[int, int]:
        return pair(self.vision_config.image_size)

    @property
    def d_model(self) -> int:
        return int(self.vision_config.hidden_size)

    def needs_interpolation(self, pixel_values: Tensor) -> bool:
        """True when the input is not the size the position embeddings were trained for."""
        return tuple(pixel_values.shape[-2:]) != self.image_size

    def embed(self, pixel_values: Tensor) -> Tensor:
        raise NotImplementedError

    def head(self, acts_btd: Tensor) -> Tensor:
        raise NotImplementedError

    def cls_block(self, block: nn.Module, acts_btd: Tensor) -> Tensor | None:
        """The CLS row (B, 1, d) of ``block(acts_btd, None)`` when the family computes it alone
        (the head reads only CLS, so the last block needs no other query and no other MLP row);
        None where it does not."""
        return None


class ClipParts(Parts):
    """``CLIPModel``: head = L2-normalised ``visual_projection(post_layernorm(CLS))``."""

    family = "clip"

    def __init__(self, model: nn.Module):
        self.model = model
        self.vision = model.vision_model
        self.vision_config = model.config.vision_config
        self.blocks = self.vision.encoder.layers

    def embed(self, pixel_values: Tensor) -> Tensor:
        interpolate = self.needs_interpolation(pixel_values)
        acts = self.vision.embeddings(pixel_values, interpolate_pos_encoding=interpolate)
        return self.vision.pre_layrnorm(acts)

    def head(self, acts_btd: Tensor) -> Tensor:
        return l2_normalize(
            self.model.visual_projection(self.vision.post_layernorm(acts_btd[:, 0]))
        )

    def cls_block(self, block: nn.Module, acts_btd: Tensor) -> Tensor | None:
        """A ``CLIPEncoderLayer`` for the CLS query only: keys and values of every token, the
        query, attention output and MLP of CLS (about 1/6 of the block's FLOPs)."""
        if not isinstance(block, CLIPEncoderLayer):
            return None
        attn = block.self_attn
        h = block.layer_norm1(acts_btd)
        b = h.shape[0]

        def heads(x: Tensor) -> Tensor:
            return x.view(b, x.shape[1], attn.num_heads, attn.head_dim).transpose(1, 2)

        q, k, v = heads(attn.q_proj(h[:, :1])), heads(attn.k_proj(h)), heads(attn.v_proj(h))
        out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
        x = acts_btd[:, :1] + attn.out_proj(out.transpose(1, 2).reshape(b, 1, -1))
        return x + block.mlp(block.layer_norm2(x))


class Dinov2Parts(Parts):
    """``Dinov2Model`` / ``Dinov2WithRegistersModel``: head = final layernorm of CLS."""

    family = "dinov2"

    def __init__(self, model: nn.Module):
        self.model = model
        self.vision_config = model.config
        self.blocks = model.encoder.layer
        self.n_registers = int(getattr(model.config, "num_register_tokens", 0))

    def embed(self, pixel_values: Tensor) -> Tensor:
        return self.model.embeddings(pixel_values)

    def head(self, acts_btd: Tensor) -> Tensor:
        return self.model.layernorm(acts_btd[:, 0])


class VitParts(Parts):
    """``ViTModel``: head = final layernorm of CLS, then the pooler when the model has one."""

    family = "vit"

    def __init__(self, model: nn.Module):
        self.model = model
        self.vision_config = model.config
        self.blocks = model.layers

    def embed(self, pixel_values: Tensor) -> Tensor:
        interpolate = self.needs_interpolation(pixel_values)
        return self.model.embeddings(pixel_values, interpolate_pos_encoding=interpolate)

    def head(self, acts_btd: Tensor) -> Tensor:
        cls_b1d = self.model.layernorm(acts_btd[:, :1])
        if self.model.pooler is None:
            return cls_b1d[:, 0]
        return self.model.pooler(cls_b1d)


class SiglipParts(Parts):
    """``SiglipVisionModel`` or the vision tower of ``SiglipModel``: no CLS token; head =
    attention-pooling head over ``post_layernorm`` of all tokens."""

    family = "siglip"
    has_cls = False

    def __init__(self, model: nn.Module):
        self.model = model
        self.vision = getattr(model, "vision_model", model)
        self.vision_config = self.vision.config
        self.blocks = self.vision.encoder.layers

    def embed(self, pixel_values: Tensor) -> Tensor:
        interpolate = self.needs_interpolation(pixel_values)
        return self.vision.embeddings(pixel_values, interpolate_pos_encoding=interpolate)

    def head(self, acts_btd: Tensor) -> Tensor:
        if not self.vision.use_head:
            raise BackboneError(
                "this SigLIP vision tower has no pooling head (vision_use_head=False), so it has "
                "no pooled output: use a checkpoint with a head or stop at encode()"
            )
        return self.vision.head(self.vision.post_layernorm(acts_btd))


SUPPORTED_MODELS: dict[str, tuple[type[Parts], str]] = {
    "clip": (ClipParts, "CLIPModel"),
    "dinov2": (Dinov2Parts, "Dinov2Model"),
    "dinov2_with_registers": (Dinov2Parts, "Dinov2WithRegistersModel"),
    "vit": (VitParts, "ViTModel"),
    "siglip": (SiglipParts, "SiglipModel"),
    "siglip_vision_model": (SiglipParts, "SiglipVisionModel"),
}
"""config.json ``model_type`` -> (its Parts adapter, the ``transformers`` class that loads it)."""


def supported_model(model_type: object, source: str | None = None) -> tuple[type[Parts], str]:
    """The :data:`SUPPORTED_MODELS` entry of ``model_type``; :class:`BackboneError` otherwise.

    ``source`` (a folder or hub id), when given, prefixes the message.
    """
    if model_type not in SUPPORTED_MODELS:
        where = f"{source}: " if source is not None else ""
        raise BackboneError(
            f"{where}model type {model_type!r} is not supported; supported config.json "
            f"model_type values: {sorted(SUPPORTED_MODELS)} (families clip, dinov2, vit, siglip)"
        )
    return SUPPORTED_MODELS[model_type]


def parts_for(model: nn.Module) -> Parts:
    """The family adapter for ``model``, chosen by ``model.config.model_type``."""
    parts_cls, _ = supported_model(getattr(model.config, "model_type", None))
    return parts_cls(model)
