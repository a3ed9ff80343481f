"""One interface over Hugging Face vision transformers: stop after a block, resume from it.

Families: clip (``CLIPModel``, with its text tower), dinov2 (also with registers), vit and
siglip. See ``docs/backbones.md``.
"""

from .core import Backbone, ImagePreprocessor
from .errors import BackboneError
from .hashing import folder_hash
from .layout import TokenLayout
from .loading import DEFAULT_BACKBONE, backbone_from_hf, load_backbone

__all__ = [
    "DEFAULT_BACKBONE",
    "Backbone",
    "BackboneError",
    "ImagePreprocessor",
    "TokenLayout",
    "backbone_from_hf",
    "folder_hash",
    "load_backbone",
]
