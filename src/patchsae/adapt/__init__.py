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
from .compare import CompareConfig, compare
from .config import AdaptError, PromptConfig
from .model import AdaptedBackbone, adapt, new_learner
from .prompts import PromptLearner
from .train import AdaptConfig, adapt_run

__all__ = [
    "AdaptConfig",
    "AdaptError",
    "AdaptedBackbone",
    "PromptConfig",
    "PromptLearner",
    "CompareConfig",
    "adapt",
    "adapt_run",
    "compare",
    "export_official",
    "load_adapter",
    "load_official",
    "new_learner",
    "read_official_state",
    "save_adapter",
]
