"""Load a ``Backbone`` from a Hugging Face hub id or a local folder, or wrap an in-memory model."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from patchsae.paths import check_local_folder

from .core import Backbone
from .errors import BackboneError
from .families import supported_model

DEFAULT_BACKBONE = "openai/clip-vit-base-patch16"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")
ADAPTER_JSON = "adapter.json"
"""Marks a folder of prompts learned on a CLIP (``patchsae.adapt``), loaded with its base."""


def hub_revision(repo_id: str) -> str | None:
    """Commit hash of the cached snapshot of ``repo_id`` (found offline), or None."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "config.json")
    if not isinstance(cached, str):
        return None
    snapshot = Path(cached).parent
    return snapshot.name if snapshot.parent.name == "snapshots" else None


def _model_type(source: str, is_folder: bool) -> str:
    """The ``model_type`` in the config of the folder or hub id ``source`` (not checked)."""
    if is_folder:
        config_path = Path(source) / "config.json"
        if not config_path.is_file():
            raise BackboneError(
                f"{source} has no config.json: pass a folder written by save_pretrained"
            )
        model_type = json.loads(config_path.read_text()).get("model_type")
    else:
        from transformers import AutoConfig

        try:
            model_type = AutoConfig.from_pretrained(source).model_type
        except (OSError, ValueError) as err:
            reason = " ".join(str(err).split())
            raise BackboneError(
                f"cannot load {source!r} from the Hugging Face hub or its local cache ({reason}): "
                "check the name, download it once with network access, or pass a local folder"
            ) from None
    return model_type


def check_device(device: str | torch.device) -> torch.device:
    """``device`` parsed, and usable on this machine; otherwise a :class:`BackboneError`."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise BackboneError(
            f"device {device!r} is not a torch device: use cpu, cuda, cuda:N or mps"
        ) from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise BackboneError(
                f"device {device!r} was requested but CUDA is not available on this machine: "
                "use --device cpu (device=cpu)"
            )
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise BackboneError(
                f"device {device!r} does not exist: this machine has "
                f"{torch.cuda.device_count()} CUDA device(s), cuda:0..cuda:"
                f"{torch.cuda.device_count() - 1}"
            )
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise BackboneError(
            f"device {device!r} was requested but MPS is not available on this machine: "
            "use --device cpu (device=cpu)"
        )
    return parsed


def load_backbone(
    name_or_path: str | Path = DEFAULT_BACKBONE,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    tokenizer: str | Path | None = None,
) -> Backbone:
    """Load a backbone by hub id or local folder; the family comes from ``config.json``.

    A local folder is read offline; a folder written by ``patchsae adapt`` (with
    ``adapter.json``) gives the adapted CLIP, its base loaded as recorded. The image processor
    comes from the same place, so preprocessing matches the model's. CLIP also loads its
    tokenizer from ``tokenizer`` when given, else from the model's own folder/repo when it has
    one (``encode_text`` needs it).
    ``device`` is checked first: a malformed name or an unavailable device raises
    :class:`BackboneError`.
    """
    device = check_device(device)
    source = str(name_or_path)
    folder = check_local_folder(
        source, BackboneError, kind="model folder", fix="pass its folder or a hub id"
    )
    is_folder = folder is not None
    if is_folder:
        folder = folder.resolve()
        source = str(folder)
        if (folder / ADAPTER_JSON).is_file():
            from patchsae.adapt.checkpoint import load_adapter

            return load_adapter(folder, device=device, dtype=dtype)
    model_type = _model_type(source, is_folder)
    _, class_name = supported_model(model_type, source)

    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer

    try:
        model, info = getattr(transformers, class_name).from_pretrained(
            source, dtype=dtype, local_files_only=is_folder, output_loading_info=True
        )
        processor = AutoImageProcessor.from_pretrained(source, local_files_only=is_folder)
    except (OSError, ValueError) as err:
        reason = " ".join(str(err).split())
        raise BackboneError(
            f"cannot load the model and image processor from {source!r} ({reason}): the folder or "
            "repo needs config.json, weights and preprocessor_config.json"
        ) from None
    if model_type == "vit" and any(k.startswith("pooler.") for k in info["missing_keys"]):
        model.pooler = None
    text_tokenizer = None
    if model_type == "clip":
        tok_source = source if tokenizer is None else str(tokenizer)
        tok_local = is_folder if tokenizer is None else Path(tok_source).is_dir()
        try:
            if tok_local and not any((Path(tok_source) / f).is_file() for f in TOKENIZER_FILES):
                raise OSError(f"none of {list(TOKENIZER_FILES)} is in the folder")
            text_tokenizer = AutoTokenizer.from_pretrained(tok_source, local_files_only=tok_local)
        except (OSError, ValueError, TypeError) as err:
            if tokenizer is not None:
                raise BackboneError(
                    f"cannot load a tokenizer from {tok_source!r} ({err}): pass a folder with "
                    "tokenizer files, e.g. one written by tokenizer.save_pretrained"
                ) from None
    return Backbone(
        model.to(device),
        processor,
        text_tokenizer,
        name=source,
        revision=None if is_folder else hub_revision(source),
        folder=folder,
    )


def backbone_from_hf(
    model: nn.Module,
    image_processor: object,
    tokenizer: object | None = None,
    name: str = "in-memory",
) -> Backbone:
    """Wrap an in-memory HF model (puts it in eval mode); identity has no revision or hash."""
    return Backbone(model, image_processor, tokenizer, name=name)
