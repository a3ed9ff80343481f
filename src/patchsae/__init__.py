"""patchsae: sparse autoencoders on every patch token of vision transformers."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["load_backbone", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "load_backbone":
        from patchsae.backbones import load_backbone

        return load_backbone
    raise AttributeError(f"module 'patchsae' has no attribute {name!r}")
