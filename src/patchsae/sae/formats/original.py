"""Original PatchSAE checkpoints (``torch.save`` zip files and ``pickle.dump`` into gzip), read
through the restricted unpickler (``patchsae.sae.unpickle``); see docs/checkpoint.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from patchsae.sae.base import SAE
from patchsae.sae.config import ReluConfig
from patchsae.sae.formats.common import CheckpointError, _build, _make_config, _short
from patchsae.sae.unpickle import PickleRefused, Placeholder, read_pickled_checkpoint

ORIGINAL_CONFIG_MODULE = "src.sae_training.config"


def _looks_pickled(path: Path) -> bool:
    """A zip, gzip or protocol >= 2 pickle by its first bytes, or a pickle file by its suffix."""
    with open(path, "rb") as handle:
        head = handle.read(4)
    magic = head.startswith((b"PK\x03\x04", b"\x1f\x8b", b"\x80"))
    return magic or path.suffix in (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin")


def _load_original(path: Path, device: Any) -> SAE:
    """An original PatchSAE ``{"cfg" | "config": ViTSAERunnerConfig, "state_dict": ...}``."""
    try:
        obj = read_pickled_checkpoint(path, placeholder_modules=[ORIGINAL_CONFIG_MODULE])
    except PickleRefused as err:
        raise CheckpointError(f"{path}: {err}") from None
    if not isinstance(obj, dict) or "state_dict" not in obj:
        found = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(
            f"{path}: expected a PatchSAE checkpoint dict with 'cfg' (or 'config') and "
            f"'state_dict', found {found}"
        )
    raw_cfg = obj.get("cfg", obj.get("config"))
    if isinstance(raw_cfg, Placeholder):
        fields = raw_cfg.state
    elif isinstance(raw_cfg, dict):
        fields = raw_cfg
    else:
        raise CheckpointError(f"{path}: expected a 'cfg' (or 'config') entry with the SAE config")
    state = obj["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: 'state_dict' must map names to tensors")
    cfg = _config_from_original(fields, str(path))
    return _build(cfg, state, str(path), device)


def _config_from_original(fields: dict[str, Any], source: str) -> ReluConfig:
    """Our relu SAEConfig from the fields of a ViTSAERunnerConfig."""
    if fields.get("gated_sae"):
        raise CheckpointError(f"{source}: gated PatchSAE checkpoints are not supported")
    d_in = fields.get("d_in")
    d_sae = fields.get("d_sae")
    if d_sae is None and isinstance(fields.get("expansion_factor"), int) and isinstance(d_in, int):
        d_sae = d_in * fields["expansion_factor"]
    dtype = fields.get("dtype", "float32")
    dtype = str(dtype).removeprefix("torch.")
    ours = {
        "arch": "relu",
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": dtype,
        "l1_coefficient": fields.get("l1_coefficient", ReluConfig.l1_coefficient),
        "use_ghost_grads": bool(fields.get("use_ghost_grads")),
        "mse_cls_coefficient": fields.get("mse_cls_coefficient", ReluConfig.mse_cls_coefficient),
    }
    if not isinstance(d_in, int) or not isinstance(d_sae, int):
        raise CheckpointError(
            f"{source}: the config has no integer d_in / d_sae ({_short(d_in)}, {_short(d_sae)})"
        )
    return _make_config(ours, source)
