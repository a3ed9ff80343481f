"""Sparse autoencoders: models by name, the PatchSAE recipe, checkpoints.

``make_sae(SAEConfig(arch=...))`` builds any registered architecture; ``save`` / ``load`` read
and write checkpoints (ours, SAELens, original PatchSAE pickles read safely).
"""

from patchsae.sae.base import SAE, LossOutput
from patchsae.sae.config import SAEConfig
from patchsae.sae.io import CheckpointError, export_saelens, load, save
from patchsae.sae.registry import available_archs, make_sae, register_sae

__all__ = [
    "SAE",
    "CheckpointError",
    "LossOutput",
    "SAEConfig",
    "available_archs",
    "export_saelens",
    "load",
    "make_sae",
    "register_sae",
    "save",
]
