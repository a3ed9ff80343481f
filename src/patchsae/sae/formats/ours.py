"""Our checkpoint folder: ``sae.safetensors`` + ``cfg.json`` (format ``patchsae-sae``, version 1).

See ``patchsae.sae.io`` and docs/checkpoint.md for the layout and the interrupted-save rules.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from patchsae.atomic import write_json, write_with
from patchsae.checksum import file_checksum, file_problem
from patchsae.config import to_dict
from patchsae.sae.base import SAE
from patchsae.sae.formats.common import (
    CheckpointError,
    _build,
    _make_config,
    _read_json,
    _read_safetensors,
    _state_tensors,
)

FORMAT = "patchsae-sae"

FORMAT_VERSION = 1

WEIGHTS = "sae.safetensors"

PREVIOUS = "sae.previous.safetensors"

CFG = "cfg.json"

RESERVED_KEYS = ("format", "format_version", "save_id", "sae", "weights_checksum")


def save(sae: SAE, dir: str | Path, extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``sae`` to the folder ``dir`` (created if needed) in our format; returns the folder.

    ``extra``: JSON-serialisable entries added to cfg.json (not the reserved keys
    ``format``, ``format_version``, ``save_id``, ``sae``).
    """
    folder = Path(dir)
    extra = dict(extra or {})
    clashes = [key for key in RESERVED_KEYS if key in extra]
    if clashes:
        raise CheckpointError(f"extra may not set the reserved cfg.json keys {clashes}")
    save_id = uuid.uuid4().hex
    info = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "save_id": save_id,
        "sae": to_dict(sae.cfg),
        **extra,
    }
    try:
        json.dumps(info)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"extra must be JSON-serialisable: {err}") from None
    tensors = _state_tensors(sae)
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "save_id": save_id}
    folder.mkdir(parents=True, exist_ok=True)
    _keep_previous(folder)
    write_with(folder / WEIGHTS, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    write_json(folder / CFG, {**info, "weights_checksum": file_checksum(folder / WEIGHTS)})
    (folder / PREVIOUS).unlink(missing_ok=True)
    return folder


def _keep_previous(folder: Path) -> None:
    """Refuse a folder whose cfg.json is not ours; keep the current weights as PREVIOUS while a
    save replaces them, unless they do not match cfg.json (an earlier save was interrupted and
    PREVIOUS already holds the weights cfg.json names)."""
    weights, cfg = folder / WEIGHTS, folder / CFG
    if not cfg.is_file():
        return
    info = _read_json(cfg)
    if info.get("format") != FORMAT:
        raise CheckpointError(
            f"{folder} holds a cfg.json that is not a {FORMAT} checkpoint; save to another folder"
        )
    if not weights.is_file() or _save_id(weights) != info.get("save_id"):
        return
    (folder / PREVIOUS).unlink(missing_ok=True)
    try:
        os.link(weights, folder / PREVIOUS)
    except OSError:
        shutil.copyfile(weights, folder / PREVIOUS)


def _save_id(path: Path) -> str | None:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return (handle.metadata() or {}).get("save_id")
    except (SafetensorError, OSError):
        return None


def checkpoint_info(path: str | Path) -> dict[str, Any]:
    """cfg.json of our checkpoint folder ``path`` (or of the folder of its sae.safetensors)."""
    path = Path(path)
    folder = path.parent if path.name == WEIGHTS else path
    info = _read_json(folder / CFG) if (folder / CFG).is_file() else None
    if info is None or info.get("format") != FORMAT:
        raise CheckpointError(
            f"{folder} is not a {FORMAT} checkpoint folder (cfg.json + {WEIGHTS})"
        )
    return info


def _load_ours(folder: Path, info: dict[str, Any], device: Any) -> SAE:
    version = info.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise CheckpointError(
            f"{folder / CFG}: format_version {version!r} is not supported (this version reads "
            f"1..{FORMAT_VERSION}); upgrade patchsae to read newer checkpoints"
        )
    if not isinstance(info.get("sae"), dict):
        raise CheckpointError(f"{folder / CFG} has no 'sae' config object")
    cfg = _make_config(info["sae"], str(folder / CFG))
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{folder} has {CFG} but no {WEIGHTS}; both files are expected")
    expected = info.get("weights_checksum")
    if expected is not None:  # saved with a checksum: it alone decides which file is cfg.json's
        problem = file_problem(weights, expected)
        if problem is not None and file_problem(folder / PREVIOUS, expected) is None:
            _warn_interrupted(folder)
            weights = folder / PREVIOUS
        elif problem is not None and _save_id(weights) != info.get("save_id"):
            raise _different_saves(folder)
        elif problem is not None:
            raise CheckpointError(
                f"{weights} {problem}: it was damaged after it was saved; use another copy or "
                "save the SAE again"
            )
        return _with_origin(_build(cfg, _read_safetensors(weights)[0], str(weights), device), info)
    tensors, metadata = _read_safetensors(weights)
    if metadata.get("save_id") != info.get("save_id"):
        previous = folder / PREVIOUS
        if not (previous.is_file() and _save_id(previous) == info.get("save_id")):
            raise _different_saves(folder)
        _warn_interrupted(folder)
        weights = previous
        tensors, _ = _read_safetensors(previous)
    return _with_origin(_build(cfg, tensors, str(weights), device), info)


def _with_origin(sae: SAE, info: dict[str, Any]) -> SAE:
    """``sae`` with ``trained_on`` taken from cfg.json when it records a backbone and layer."""
    origin = info.get("trained_on")
    if isinstance(origin, dict) and isinstance(origin.get("layer"), int):
        backbone = origin.get("backbone")
        sae.trained_on = {
            "backbone": dict(backbone) if isinstance(backbone, dict) else {},
            "layer": origin["layer"],
        }
    return sae


def _different_saves(folder: Path) -> CheckpointError:
    return CheckpointError(
        f"{folder}: {WEIGHTS} and {CFG} come from different saves (an interrupted "
        "save without the previous weights); save the SAE again"
    )


def _warn_interrupted(folder: Path) -> None:
    warnings.warn(
        f"{folder}: the last save was interrupted; loading the previous checkpoint", stacklevel=4
    )


def load_ours(folder: str | Path, device: Any = "cpu") -> SAE:
    """The SAE of our checkpoint folder ``folder``, in eval mode on ``device``; any other format
    is refused (no format detection, so no path to another format's reader)."""
    folder = Path(folder)
    return _load_ours(folder, checkpoint_info(folder), device)
