"""Prompt-learner files: official Dassl checkpoints in and out, and our own format.

**Official** (MaPLe / CoOp trainers on Dassl): ``model.pth.tar-N``, a ``torch.save``d dict
with ``state_dict``, ``epoch``, ``optimizer``, ``scheduler`` (a pickled scheduler object) and
``val_result``. MaPLe keys are ``prompt_learner.{ctx, proj.*, compound_prompts_text.i,
compound_prompt_projections.i.*}`` beside the frozen ``image_encoder.*``, ``text_encoder.*`` and
``logit_scale`` (ignored); CoOp keys are ``ctx`` (its file holds the prompt learner alone). The
``token_prefix`` / ``token_suffix`` buffers are dropped: they are rebuilt from the class names.
The file is read by :func:`patchsae.sae.unpickle.read_pickled_checkpoint`, which executes
nothing: optimiser and scheduler objects become inert placeholders. Loading is strict: every
learnable tensor must be there with its shape, and a different ``n_ctx``, depth or method is an
error stating both values. fp16 tensors are up-cast to the model's dtype.

**Ours** (format_version 1), a folder: ``adapter.safetensors`` (the learner's tensors under the
official names without ``prompt_learner.``) and ``adapter.json`` (format, prompt config, base
model and tokenizer, learner hash, anything the writer adds), written last.
``load_backbone(FOLDER)`` recognises it and returns the adapted model.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from patchsae.atomic import write_json, write_with
from patchsae.backbones import Backbone, load_backbone
from patchsae.backbones.loading import ADAPTER_JSON
from patchsae.config import ConfigError, from_dict, to_dict
from patchsae.sae.unpickle import PickleRefused, read_pickled_checkpoint

from .config import AdaptError, PromptConfig
from .model import AdaptedBackbone
from .prompts import PromptLearner

FORMAT = "patchsae-adapter"
FORMAT_VERSION = 1
ADAPTER_TENSORS = "adapter.safetensors"
OFFICIAL_PREFIX = "prompt_learner."
REBUILT_KEYS = ("token_prefix", "token_suffix")
FROZEN_PREFIXES = ("image_encoder.", "text_encoder.", "logit_scale")
DASSL_PLACEHOLDER_MODULES = (
    "torch.optim.lr_scheduler",
    "torch.optim.sgd",
    "torch.optim.adam",
    "torch.optim.adamw",
    "torch.optim.rmsprop",
    "dassl.optim.lr_scheduler",
)
"""Classes of these modules (pickled optimisers and schedulers) load as inert placeholders."""


def read_official_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of a Dassl checkpoint, read without executing anything it names."""
    path = Path(path)
    try:
        obj = read_pickled_checkpoint(path, placeholder_modules=DASSL_PLACEHOLDER_MODULES)
    except PickleRefused as err:
        raise AdaptError(f"{path}: {err}") from None
    state = obj.get("state_dict") if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise AdaptError(
            f"{path}: expected a Dassl checkpoint (a dict whose 'state_dict' maps names to "
            "tensors), as MaPLe and CoOp write to model.pth.tar-N"
        )
    return state


def learner_tensors(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """The learnable prompt tensors of an official state dict, without ``prompt_learner.``;
    rebuilt buffers and frozen CLIP weights dropped, any other key refused."""
    out, unknown = {}, []
    for key, value in state.items():
        if key.startswith(FROZEN_PREFIXES):
            continue
        name = key.removeprefix(OFFICIAL_PREFIX)
        if name in REBUILT_KEYS:
            continue
        if name == "ctx" or name.startswith(("proj.", "compound_prompt")):
            out[name] = value
        else:
            unknown.append(key)
    if unknown:
        raise AdaptError(
            f"{source}: keys {unknown[:5]} are not MaPLe/CoOp prompt-learner tensors; "
            "expected prompt_learner.ctx, proj.*, compound_prompts_text.* and "
            "compound_prompt_projections.*"
        )
    return out


def describe(tensors: dict[str, torch.Tensor]) -> tuple[str, int, int]:
    """(method, n_ctx, depth) that a learner's tensors imply."""
    if "ctx" not in tensors:
        raise AdaptError("the checkpoint has no prompt_learner.ctx: it is not a prompt learner")
    method = "maple" if any(k.startswith("proj.") for k in tensors) else "coop"
    n_deep = sum(k.startswith("compound_prompts_text.") for k in tensors)
    return method, int(tensors["ctx"].shape[0]), n_deep + 1


def load_learner_tensors(
    learner: PromptLearner, tensors: dict[str, torch.Tensor], source: str
) -> None:
    """Copy ``tensors`` into ``learner`` strictly (same method, n_ctx, depth, keys, shapes)."""
    cfg = learner.cfg
    method, n_ctx, depth = describe(tensors)
    for what, found, want in (("method", method, cfg.method), ("n_ctx", n_ctx, cfg.n_ctx)):
        if found != want:
            raise AdaptError(
                f"{source}: the checkpoint has {what} {found}, the model is configured for "
                f"{what} {want}: set {what}={found} to load it"
            )
    if depth != cfg.depth:
        raise AdaptError(
            f"{source}: the checkpoint has prompt depth {depth} ({depth - 1} deep prompts), the "
            f"model is configured for depth {cfg.depth}: set depth={depth} to load it (a "
            "mismatched depth would leave prompts random or unused)"
        )
    expected = learner.state_dict()
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise AdaptError(f"{source}: missing keys {missing}, unexpected keys {extra}")
    for key, value in tensors.items():
        if value.shape != expected[key].shape:
            raise AdaptError(
                f"{source}: {key} has shape {tuple(value.shape)}, the model needs "
                f"{tuple(expected[key].shape)} (a checkpoint for a CLIP of another width)"
            )
        if not value.is_floating_point() or not torch.isfinite(value).all():
            raise AdaptError(f"{source}: {key} must hold finite floating-point values")
    learner.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()}, strict=True)


def load_official(path: str | Path, base: Backbone, cfg: PromptConfig) -> AdaptedBackbone:
    """``base`` adapted with the prompts of the official checkpoint at ``path`` (strict)."""
    from .model import new_learner

    tensors = learner_tensors(read_official_state(path), str(path))
    learner = new_learner(base, cfg)
    load_learner_tensors(learner, tensors, str(path))
    return AdaptedBackbone(base, learner)


def export_official(adapted: AdaptedBackbone, path: str | Path, epoch: int = 0) -> Path:
    """Write ``adapted``'s prompts as a Dassl checkpoint that the original ``load_model`` reads
    (MaPLe keys prefixed ``prompt_learner.``, CoOp keys bare; no optimiser or scheduler)."""
    prefix = OFFICIAL_PREFIX if adapted.prompt_cfg.method == "maple" else ""
    state = OrderedDict(
        (prefix + k, v.detach().cpu().clone()) for k, v in adapted.learner.state_dict().items()
    )
    obj = {
        "state_dict": state,
        "epoch": epoch,
        "optimizer": None,
        "scheduler": None,
        "val_result": None,
    }
    path = Path(path)
    write_with(path, lambda tmp: torch.save(obj, tmp))
    return path


def save_adapter(
    adapted: AdaptedBackbone,
    folder: str | Path,
    *,
    base_model: str,
    tokenizer: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write our adapter folder (module docstring); ``base_model`` / ``tokenizer`` are what
    :func:`load_adapter` passes to ``load_backbone``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in adapted.learner.state_dict().items()}
    write_with(folder / ADAPTER_TENSORS, lambda tmp: save_file(tensors, str(tmp)))
    write_json(
        folder / ADAPTER_JSON,
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "prompt": to_dict(adapted.prompt_cfg),
            "base_model": base_model,
            "tokenizer": tokenizer,
            "base": adapted.base.identity(),
            "weights_sha256": adapted.learner_hash(),
            **(extra or {}),
        },
    )
    return folder


def is_adapter_folder(folder: str | Path) -> bool:
    return (Path(folder) / ADAPTER_JSON).is_file()


def read_adapter_json(folder: str | Path) -> dict[str, Any]:
    """``adapter.json`` of ``folder``, its format and version checked."""
    path = Path(folder) / ADAPTER_JSON
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdaptError(f"{path} is not a readable adapter description: {err}") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise AdaptError(f"{path} is not a patchsae adapter (format {FORMAT!r} expected)")
    if info.get("format_version") != FORMAT_VERSION:
        raise AdaptError(
            f"{path} has format_version {info.get('format_version')!r}; this patchsae reads "
            f"{FORMAT_VERSION}"
        )
    return info


def load_adapter(
    folder: str | Path,
    base: Backbone | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> AdaptedBackbone:
    """The adapted model saved in ``folder``; its base is loaded as recorded unless given."""
    from .model import new_learner

    folder = Path(folder)
    info = read_adapter_json(folder)
    try:
        cfg = from_dict(PromptConfig, info.get("prompt") or {})
    except ConfigError as err:
        raise AdaptError(f"{folder / ADAPTER_JSON}: invalid prompt config: {err}") from None
    if base is None:
        base = load_backbone(
            info["base_model"], device=device, dtype=dtype, tokenizer=info.get("tokenizer")
        )
    try:
        tensors = load_file(str(folder / ADAPTER_TENSORS))
    except (OSError, SafetensorError) as err:
        raise AdaptError(
            f"{folder / ADAPTER_TENSORS} is not a readable tensor file: {err}"
        ) from None
    learner = new_learner(base, cfg)
    load_learner_tensors(learner, tensors, str(folder / ADAPTER_TENSORS))
    return AdaptedBackbone(base, learner)
