"""What a prompt learner looks like: method, context length, prompt depth, initial phrase."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from patchsae.config import ConfigError

DEFAULT_DEPTH = {"maple": 9, "coop": 1}


class AdaptError(ValueError):
    """An adapter, its checkpoint or its training setup cannot be used as asked."""


@dataclass(frozen=True)
class PromptConfig:
    """Shape and initialisation of a MaPLe or CoOp prompt learner.

    - ``method``: ``maple`` (text context, deep text prompts, vision prompts projected from them)
      or ``coop`` (text context only).
    - ``n_ctx``: learnable context tokens (MaPLe's base-to-novel config: 2).
    - ``depth``: MaPLe's PROMPT_DEPTH J; blocks 1..J-1 of both towers get new prompts (None: 9
      for maple, 1 for coop, the only depth CoOp has).
    - ``ctx_init``: the phrase the prompts are built from. When it has at least ``n_ctx`` tokens
      the prompt reads ``"{ctx_init} {name}."`` and its first ``n_ctx`` tokens become the
      learnable context (initialised from their embeddings); otherwise (or when empty) the
      context is random N(0, 0.02) and the prompt reads ``"X X ... {name}."``.
    - ``round_prompts_fp16``: round the vision prompts and the deep text prompts to fp16 before
      they enter the residual stream, as the original code does (its ``.half()`` calls). Off by
      default; it moves logits by about 1e-3.
    """

    method: Literal["maple", "coop"] = "maple"
    n_ctx: int = 2
    depth: int | None = None
    ctx_init: str = "a photo of a"
    round_prompts_fp16: bool = False

    def __post_init__(self) -> None:
        if self.depth is None:
            object.__setattr__(self, "depth", DEFAULT_DEPTH[self.method])
        if self.n_ctx < 1:
            raise ConfigError(f"n_ctx must be >= 1, got {self.n_ctx}")
        if self.depth < 1:
            raise ConfigError(f"depth must be >= 1, got {self.depth}")
        if self.method == "coop" and self.depth != 1:
            raise ConfigError(
                f"coop learns the text context only, so its depth is 1, got {self.depth}: "
                "drop depth= or use method=maple"
            )

    @property
    def n_deep(self) -> int:
        """Deep prompts per tower: ``depth - 1`` (0 for coop)."""
        return self.depth - 1
