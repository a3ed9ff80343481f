"""SAE checkpoints: our versioned folder format, SAELens folders, original PatchSAE pickles.

``save(sae, dir)`` writes ``dir/sae.safetensors`` (the module's state dict) and ``dir/cfg.json``
(``{"format": "patchsae-sae", "format_version": 1, "save_id", "sae": SAEConfig,
"weights_checksum", **extra}``; ``load`` refuses weights whose checksum differs), each
through a temporary file and ``os.replace``, weights first and cfg last. Both carry the same
``save_id``; until the new cfg is in place the previous weights stay readable as
``sae.previous.safetensors``, so an interrupted save leaves the previous checkpoint loadable.

``load(path)`` detects the layout (see ``SUPPORTED``) and returns our ``SAE``, in eval mode;
each format has its own module in ``patchsae.sae.formats`` (``ours``, ``saelens``, ``original``).
Trainer resume reads its own checkpoints through ``formats.ours.load_ours`` only.
``export_saelens(sae, dir)`` writes the SAELens v6 layout (``cfg.json`` +
``sae_weights.safetensors``).
The layouts are documented in docs/checkpoint.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from patchsae.sae.base import SAE
from patchsae.sae.formats.common import CheckpointError, _read_json, _short
from patchsae.sae.formats.original import _load_original, _looks_pickled
from patchsae.sae.formats.ours import (
    CFG,
    FORMAT,
    PREVIOUS,
    WEIGHTS,
    _load_ours,
    checkpoint_info,
    save,
)
from patchsae.sae.formats.saelens import SAELENS_WEIGHTS, _load_saelens, export_saelens

__all__ = [
    "CFG",
    "FORMAT",
    "PREVIOUS",
    "WEIGHTS",
    "CheckpointError",
    "checkpoint_info",
    "export_saelens",
    "load",
    "save",
]

SUPPORTED = (
    "a patchsae folder (cfg.json + sae.safetensors, or the sae.safetensors path), "
    "a SAELens folder (cfg.json + sae_weights.safetensors; architectures standard, topk, "
    "jumprelu, batchtopk), or an original PatchSAE checkpoint (torch.save zip file, or "
    "pickle.dump into gzip such as sae.pkl.gz)"
)


def load(path: str | Path, device: str | torch.device = "cpu") -> SAE:
    """The SAE stored at ``path``, in eval mode on ``device``; the layout is detected from the
    files (see ``SUPPORTED``)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; expected {SUPPORTED}")
    try:
        return _load(path, device)
    except CheckpointError:
        raise
    except (RecursionError, OverflowError, MemoryError, ValueError, RuntimeError) as err:
        raise CheckpointError(
            f"{path} is not a usable checkpoint ({type(err).__name__}: {_short(str(err))})"
        ) from None


def _sae_folder_of_run(path: Path) -> Path:
    """The SAE folder a training run folder (``OUT``) or its ``OUT/checkpoint`` stands for.

    A folder holding cfg.json is itself; a run folder without final weights stands for its latest
    checkpoint; a checkpoint folder for its one SAE (``sae/``). A sweep's several SAEs
    (``sae-00/``, ...) are refused, naming them, so that the choice is the user's.
    """
    if (path / CFG).is_file():
        return path
    checkpoint = path / "checkpoint" if (path / "checkpoint").is_dir() else path
    saes = sorted(p for p in checkpoint.glob("sae*") if p.is_dir() and (p / CFG).is_file())
    if len(saes) == 1:
        return saes[0]
    if len(saes) > 1:
        names = ", ".join(p.name for p in saes)
        raise CheckpointError(
            f"{checkpoint} holds {len(saes)} SAEs ({names}); pass one of them, e.g. {saes[0]}"
        )
    return path


def _load(path: Path, device: Any) -> SAE:
    if path.is_file():
        if path.name in (WEIGHTS, SAELENS_WEIGHTS, CFG):
            path = path.parent
        elif _looks_pickled(path):
            return _load_original(path, device)
        else:
            raise CheckpointError(f"{path} is in an unknown format; expected {SUPPORTED}")
    path = _sae_folder_of_run(path)
    cfg_path = path / CFG
    if not cfg_path.is_file():
        present = sorted(p.name for p in path.iterdir())
        for weights in (WEIGHTS, SAELENS_WEIGHTS):
            if weights in present:
                raise CheckpointError(
                    f"{path} has {weights} but no {CFG}; both {CFG} and {weights} are expected"
                )
        raise CheckpointError(f"{path} holds no checkpoint (found {present}); expected {SUPPORTED}")
    info = _read_json(cfg_path)
    if info.get("format") == FORMAT:
        return _load_ours(path, info, device)
    if "d_in" in info and "d_sae" in info and "format" not in info:
        return _load_saelens(path, info, device)
    raise CheckpointError(
        f"{cfg_path} is neither a {FORMAT} nor a SAELens config; expected {SUPPORTED}"
    )
