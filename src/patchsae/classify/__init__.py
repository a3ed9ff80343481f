"""Zero-shot CLIP classification with an SAE spliced in, and top-k class-latent masking.

``masking`` (latent sets and masked reconstructions from a plain statistics tensor), ``splice``
(the pluggable classifier head and per-batch condition logits), ``run`` (the resumable
``patchsae classify`` pass), ``outputs`` and ``plot`` (CSV tables and Fig. 5b).
"""

from patchsae.classify.config import DEFAULT_KS, ClassifyConfig, ClassifyError
from patchsae.classify.masking import masked_reconstruction, random_latents, top_latents
from patchsae.classify.run import classify, latent_sets
from patchsae.classify.splice import (
    PATCHSAE_OFFSET,
    ClassifierHead,
    Condition,
    Splice,
    clip_head,
    condition_logits,
)

__all__ = [
    "DEFAULT_KS",
    "PATCHSAE_OFFSET",
    "ClassifierHead",
    "ClassifyConfig",
    "ClassifyError",
    "Condition",
    "Splice",
    "classify",
    "clip_head",
    "condition_logits",
    "latent_sets",
    "masked_reconstruction",
    "random_latents",
    "top_latents",
]
