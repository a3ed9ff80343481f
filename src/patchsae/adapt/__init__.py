"""Prompt learning on Hugging Face CLIP: MaPLe and CoOp, official checkpoints, few-shot training.

See ``docs/adapt.md``.
"""

from .checkpoint import (
    export_official,
    load_adapter,
    load_official,
    read_official_state,
    save_adapter,
)
from .config import AdaptError, PromptConfig
from .model import AdaptedBackbone, adapt, new_learner
from .prompts import PromptLearner

__all__ = [
    "AdaptError",
    "AdaptedBackbone",
    "PromptConfig",
    "PromptLearner",
    "adapt",
    "export_official",
    "load_adapter",
    "load_official",
    "new_learner",
    "read_official_state",
    "save_adapter",
]
