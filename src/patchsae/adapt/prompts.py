"""The MaPLe / CoOp prompt learner: learnable tokens and the projections between the towers.

Parameter names are those of the official ``MultiModalPromptLearner`` (without the
``prompt_learner.`` prefix), so its checkpoints map one to one:

- ``ctx``: (n_ctx, d_text), the text context that replaces prompt positions 1..n_ctx;
- maple only: ``proj`` Linear(d_text -> d_vision), the first-layer vision prompts ``proj(ctx)``;
  ``compound_prompts_text.{j}``: (n_ctx, d_text), the deep text prompts of text block j + 1;
  ``compound_prompt_projections.{j}`` Linear(d_text -> d_vision), the deep vision prompts of
  vision block j + 1, for j = 0..depth-2.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from .config import PromptConfig

PROMPT_INIT_STD = 0.02


class PromptLearner(nn.Module):
    """Learnable prompts of one adapted CLIP (see the module docstring for the parameters).

    ``ctx_init``: (n_ctx, d_text) initial context (token embeddings of the init phrase), or None
    for N(0, 0.02). Random parts are drawn from ``seed`` without touching the global RNG. As in
    the original, every deep projection starts as a copy of one freshly initialised Linear.
    """

    def __init__(
        self, cfg: PromptConfig, d_text: int, d_vision: int, ctx_init: Tensor | None, seed: int
    ):
        super().__init__()
        self.cfg = cfg
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            ctx = torch.empty(cfg.n_ctx, d_text)
            if ctx_init is None:
                nn.init.normal_(ctx, std=PROMPT_INIT_STD)
            else:
                ctx.copy_(ctx_init)
            self.ctx = nn.Parameter(ctx)
            if cfg.method != "maple":
                return
            self.proj = nn.Linear(d_text, d_vision)
            deep = [torch.empty(cfg.n_ctx, d_text) for _ in range(cfg.n_deep)]
            for prompt in deep:
                nn.init.normal_(prompt, std=PROMPT_INIT_STD)
            self.compound_prompts_text = nn.ParameterList([nn.Parameter(p) for p in deep])
            template = nn.Linear(d_text, d_vision)
            self.compound_prompt_projections = nn.ModuleList(
                [copy.deepcopy(template) for _ in range(cfg.n_deep)]
            )

    def _rounded(self, prompt: Tensor) -> Tensor:
        if not self.cfg.round_prompts_fp16:
            return prompt
        return prompt.to(torch.float16).to(prompt.dtype)

    def text_prompt(self, block: int) -> Tensor | None:
        """(n_ctx, d_text) tokens written at positions 1..n_ctx before text block ``block``
        (block 0: the context, before the position embedding), or None when the block keeps the
        previous block's output there."""
        if block == 0:
            return self.ctx
        if block <= self.cfg.n_deep:
            return self._rounded(self.compound_prompts_text[block - 1])
        return None

    def vision_prompt(self, block: int) -> Tensor | None:
        """(n_ctx, d_vision) tokens that occupy the last n_ctx positions before vision block
        ``block`` (block 0: appended before ``pre_layrnorm``), or None (coop, or past the
        prompt depth: the block keeps the previous block's output there)."""
        if self.cfg.method != "maple":
            return None
        if block == 0:
            return self._rounded(self.proj(self.ctx))
        if block <= self.cfg.n_deep:
            projection = self.compound_prompt_projections[block - 1]
            return self._rounded(projection(self.compound_prompts_text[block - 1]))
        return None
