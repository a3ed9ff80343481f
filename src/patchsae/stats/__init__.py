"""Latent statistics and the atlas: one streaming pass of an SAE over a dataset's activations.

``compute_stats(StatsConfig(...))`` writes a dataset into an atlas folder; ``Atlas.open(dir)``
answers queries from it without the images, the backbone or the SAE. See ``docs/atlas.md``.
"""

from patchsae.stats.accumulate import LatentAccumulator, StatsError, label_entropy, token_set
from patchsae.stats.atlas import Atlas, AtlasDataset, image_latents, top_latents
from patchsae.stats.compute import StatsConfig, compute_stats

__all__ = [
    "Atlas",
    "AtlasDataset",
    "LatentAccumulator",
    "StatsConfig",
    "StatsError",
    "compute_stats",
    "image_latents",
    "label_entropy",
    "token_set",
    "top_latents",
]
