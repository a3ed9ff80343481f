"""A CLIP adapted by MaPLe or CoOp prompts, as a :class:`~patchsae.backbones.Backbone`.

Vision tower: the first-layer vision prompts (n_ctx tokens) are appended after CLS and the
patches, after the position embedding and before ``pre_layrnorm``; before vision block i
(1..depth-1) the last n_ctx tokens are replaced by that block's deep prompts; deeper blocks carry
the previous block's output. The token sequence is ``[CLS, patches, prompts]`` in every block, and
``token_layout.n_prompts`` marks the prompt tokens. ``encode`` / ``encode_layers`` /
``forward_from`` are the base class's, run over prompted blocks, so activations, splicing and
resuming from a block all include the prompts.

Text tower: ``encode_text(prompts)`` tokenises each prompt, overwrites positions 1..n_ctx with
the learned context, adds the position embedding, and replaces positions 1..n_ctx with the deep
text prompts before text blocks 1..depth-1; EOS pooling as HF does it. With the template
``"{ctx_init} {name}."`` (``templates``) this is exactly the MaPLe / CoOp class prompt, so
``zero_shot_classifier(adapted, class_names, adapted.templates)`` is the adapted classifier.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from transformers.masking_utils import create_causal_mask

from patchsae.backbones import Backbone, BackboneError
from patchsae.backbones.families import ClipParts, l2_normalize

from .config import AdaptError, PromptConfig
from .prompts import PromptLearner

INIT_SEED = 0


def _put_prompt(acts_btd: Tensor, prompt: Tensor, start: int) -> Tensor:
    """``acts_btd`` with positions ``start..start + n`` replaced by ``prompt`` (n, d) in every
    sequence (out of place, so gradients reach ``prompt``)."""
    n = prompt.shape[0]
    prompt_btd = prompt.to(acts_btd.dtype).expand(acts_btd.shape[0], -1, -1)
    return torch.cat([acts_btd[:, :start], prompt_btd, acts_btd[:, start + n :]], dim=1)


class PromptedBlock(nn.Module):
    """A vision block whose last n_ctx input tokens are first replaced by its deep prompts."""

    def __init__(self, block: nn.Module, prompt: Callable[[int], Tensor | None], index: int):
        super().__init__()
        self.block = block
        self.prompt = prompt
        self.index = index

    def forward(self, acts_btd: Tensor, attention_mask: Tensor | None) -> Tensor:
        prompt = self.prompt(self.index) if self.index > 0 else None
        if prompt is not None:
            acts_btd = _put_prompt(acts_btd, prompt, acts_btd.shape[1] - prompt.shape[0])
        return self.block(acts_btd, attention_mask)


class PromptedClipParts(ClipParts):
    """CLIP vision parts with MaPLe prompts: embed appends them, blocks replace them."""

    def __init__(self, model: nn.Module, learner: PromptLearner):
        super().__init__(model)
        self.learner = learner
        self.blocks = nn.ModuleList(
            PromptedBlock(block, learner.vision_prompt, index)
            for index, block in enumerate(self.vision.encoder.layers)
        )

    def embed(self, pixel_values: Tensor) -> Tensor:
        interpolate = self.needs_interpolation(pixel_values)
        acts_btd = self.vision.embeddings(pixel_values, interpolate_pos_encoding=interpolate)
        prompt = self.learner.vision_prompt(0)
        if prompt is not None:
            acts_btd = _put_prompt(acts_btd, prompt, acts_btd.shape[1])
        return self.vision.pre_layrnorm(acts_btd)


def init_phrase(tokenizer: Any, ctx_init: str) -> list[int]:
    """Token ids of ``ctx_init`` without SOS/EOS."""
    if not ctx_init.strip():
        return []
    return list(tokenizer(ctx_init, add_special_tokens=False)["input_ids"])


def prompt_template(tokenizer: Any, cfg: PromptConfig) -> str:
    """The class prompt: ``"{ctx_init} {name}."`` when the phrase has at least n_ctx tokens (its
    first n_ctx become the context), else ``"X X ... {name}."`` (n_ctx placeholders)."""
    if len(init_phrase(tokenizer, cfg.ctx_init)) >= cfg.n_ctx:
        return f"{cfg.ctx_init.strip()} {{name}}."
    return " ".join(["X"] * cfg.n_ctx) + " {name}."


def new_learner(base: Backbone, cfg: PromptConfig, seed: int = INIT_SEED) -> PromptLearner:
    """A freshly initialised learner for ``base``: context from the init phrase's token
    embeddings when it has n_ctx tokens, other parts random (``seed``)."""
    check_base(base, cfg)
    ids = init_phrase(base.tokenizer, cfg.ctx_init)
    ctx_init = None
    if len(ids) >= cfg.n_ctx:
        embedding = base.model.text_model.embeddings.token_embedding
        with torch.no_grad():
            ids_t = torch.tensor(ids[: cfg.n_ctx], device=embedding.weight.device)
            ctx_init = embedding(ids_t).float().cpu()
    d_text = int(base.model.config.text_config.hidden_size)
    return PromptLearner(cfg, d_text, base.d_model, ctx_init, seed)


def check_base(base: Backbone, cfg: PromptConfig) -> None:
    """Refuse bases the prompts cannot go into: not CLIP, no tokenizer, depth past the towers."""
    if base.family != "clip":
        raise AdaptError(f"prompt learning needs a CLIP backbone; {base.name!r} is {base.family}")
    if base.tokenizer is None:
        raise AdaptError(
            f"{base.name!r} has no tokenizer: load it with load_backbone(..., tokenizer=FOLDER)"
        )
    n_text = len(base.model.text_model.encoder.layers)
    if cfg.depth > min(base.n_layers, n_text):
        raise AdaptError(
            f"prompt depth {cfg.depth} exceeds the model's {base.n_layers} vision / {n_text} text "
            f"blocks: use depth <= {min(base.n_layers, n_text)}"
        )


class AdaptedBackbone(Backbone):
    """``base`` with ``learner``'s prompts. Shares the base's HF model (frozen by the caller
    when training); ``learner`` is moved to the base's device and dtype.

    Attributes added to :class:`Backbone`'s: ``base`` (the unprompted backbone), ``learner``,
    ``prompt_cfg``, ``templates`` (the one class prompt template of this adapter).
    """

    def __init__(self, base: Backbone, learner: PromptLearner):
        cfg = learner.cfg
        check_base(base, cfg)
        super().__init__(
            base.model,
            base.image_processor,
            base.tokenizer,
            name=base.name,
            revision=base._revision,
            folder=base._folder,
        )
        self._folder_hash = base._folder_hash
        self.base = base
        self.prompt_cfg = cfg
        self.learner = learner.to(device=self.device, dtype=self.dtype)
        self._parts = PromptedClipParts(self.model, self.learner)
        self.token_layout = self.token_layout.with_prompts(
            cfg.n_ctx if cfg.method == "maple" else 0
        )
        self.templates = (prompt_template(self.tokenizer, cfg),)

    def __repr__(self) -> str:
        cfg = self.prompt_cfg
        return (
            f"AdaptedBackbone(name={self.name!r}, method={cfg.method!r}, n_ctx={cfg.n_ctx}, "
            f"depth={cfg.depth}, n_tokens={self.token_layout.n_tokens})"
        )

    def learner_hash(self) -> str:
        """sha256 over the learner's tensors (names, dtypes, shapes, bytes), in name order."""
        digest = hashlib.sha256()
        for key, value in sorted(self.learner.state_dict().items()):
            value = value.detach().cpu().contiguous()
            digest.update(f"{key}:{value.dtype}:{tuple(value.shape)}".encode())
            digest.update(value.view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def identity(self) -> dict[str, Any]:
        """The base's identity plus ``adapter``: the prompt config and the learner's hash."""
        cfg = self.prompt_cfg
        adapter = {
            "method": cfg.method,
            "n_ctx": cfg.n_ctx,
            "depth": cfg.depth,
            "ctx_init": cfg.ctx_init,
            "round_prompts_fp16": cfg.round_prompts_fp16,
            "weights_sha256": self.learner_hash(),
        }
        return {**super().identity(), "adapter": adapter}

    def encode_text(self, prompts: Sequence[str]) -> Tensor:
        """Prompted text embeddings (n, proj_dim), L2-normalised: positions 1..n_ctx of every
        tokenised prompt hold the learned context (see the module docstring)."""
        if len(prompts) == 0 or not all(isinstance(p, str) for p in prompts):
            raise BackboneError("encode_text needs a non-empty list of strings")
        text = self.model.text_model
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt")
        ids_bt = tokens["input_ids"].to(self.device)
        if text.eos_token_id == 2:
            eos_b = ids_bt.argmax(-1)
        else:
            eos_b = (ids_bt == text.eos_token_id).int().argmax(-1)
        n_ctx = self.prompt_cfg.n_ctx
        short = [p for p, e in zip(prompts, eos_b.tolist(), strict=True) if e <= n_ctx]
        if short:
            raise AdaptError(
                f"prompt {short[0]!r} has fewer than n_ctx={n_ctx} tokens to hold the learned "
                f"context: use the adapter's template {self.templates[0]!r}"
            )
        acts_btd = _put_prompt(text.embeddings.token_embedding(ids_bt), self.learner.ctx, 1)
        positions = text.embeddings.position_ids[:, : ids_bt.shape[1]]
        acts_btd = acts_btd + text.embeddings.position_embedding(positions)
        mask = create_causal_mask(
            config=text.config, inputs_embeds=acts_btd, attention_mask=None, cache=None
        )
        for index, layer in enumerate(text.encoder.layers):
            prompt = self.learner.text_prompt(index) if index > 0 else None
            if prompt is not None:
                acts_btd = _put_prompt(acts_btd, prompt, 1)
            acts_btd = layer(acts_btd, mask, is_causal=True)
        pooled = text.final_layer_norm(acts_btd)[torch.arange(len(prompts)), eos_b]
        return l2_normalize(self.model.text_projection(pooled))


def adapt(base: Backbone, cfg: PromptConfig, seed: int = INIT_SEED) -> AdaptedBackbone:
    """``base`` with a freshly initialised prompt learner (see :func:`new_learner`)."""
    return AdaptedBackbone(base, new_learner(base, cfg, seed))
