"""SAE quality: reconstruction (FVU, explained variance, L0), firing frequencies, CLIP fidelity."""

from patchsae.metrics.evaluate import EvaluateError, evaluate
from patchsae.metrics.fidelity import (
    DEFAULT_TEMPLATES,
    FidelityConfig,
    FidelityError,
    FidelityScorer,
    build_prompts,
    downstream_fidelity,
    labelled_batches,
    zero_shot_classifier,
)
from patchsae.metrics.firing import FiringWindow, MetricsError, firing_fractions
from patchsae.metrics.reconstruction import reconstruction_metrics

__all__ = [
    "DEFAULT_TEMPLATES",
    "EvaluateError",
    "FidelityConfig",
    "FidelityError",
    "FidelityScorer",
    "FiringWindow",
    "MetricsError",
    "build_prompts",
    "downstream_fidelity",
    "evaluate",
    "firing_fractions",
    "labelled_batches",
    "reconstruction_metrics",
    "zero_shot_classifier",
]
