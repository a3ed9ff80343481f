"""Trainer checkpoints: complete or absent, never half-written.

Layout of ``OUT/checkpoint/`` (format_version 1):

- ``{member}/sae.safetensors`` + ``{member}/cfg.json``: each SAE via ``patchsae.sae.io.save``
  (``member`` is ``sae`` for a single SAE, ``sae-00``, ``sae-01``... in a sweep);
- ``trainer_state.safetensors``: optimiser tensors (``{member}.adam.{param}.{key}``), dead-latent
  counters (``{member}.counters``), firing windows (``{member}.firing.{key}``) and RNG states
  (``rng.torch``, ``rng.cuda.{i}``) as uint8 tensors;
- ``trainer_state.json``: step, images and tokens seen, data position, optimiser hyper-parameters,
  the full training config. Written last: its presence marks the checkpoint complete.

A checkpoint is written into ``OUT/ckpt-tmp/`` and then swapped in by renames
(``checkpoint`` -> ``ckpt-old``, ``ckpt-tmp`` -> ``checkpoint``, delete ``ckpt-old``), so a kill at
any moment leaves a complete ``checkpoint`` or ``ckpt-old`` behind.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from patchsae.atomic import write_json
from patchsae.sae.io import save

FORMAT_VERSION = 1
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
CURRENT, TMP, OLD = "checkpoint", "ckpt-tmp", "ckpt-old"


def optimizer_tensors(
    opt: torch.optim.Optimizer, prefix: str
) -> tuple[dict[str, torch.Tensor], list]:
    """Split ``opt.state_dict()`` into named tensors and its JSON-ready param groups."""
    sd = opt.state_dict()
    tensors = {
        f"{prefix}.adam.{idx}.{key}": value.detach().cpu().contiguous()
        for idx, state in sd["state"].items()
        for key, value in state.items()
    }
    return tensors, json.loads(json.dumps(sd["param_groups"]))


def load_optimizer(
    opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list, prefix: str
) -> None:
    """Restore an optimiser saved by ``optimizer_tensors``."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    head = f"{prefix}.adam."
    for name, value in tensors.items():
        if name.startswith(head):
            idx, key = name[len(head) :].split(".", 1)
            state.setdefault(int(idx), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": groups})


def rng_tensors() -> dict[str, torch.Tensor]:
    """The torch CPU (and CUDA) RNG states as uint8 tensors."""
    out = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = s
    return out


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    """Restore the RNG states saved by ``rng_tensors``."""
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted(k for k in tensors if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])


def write_checkpoint(
    out: Path,
    saes: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    state: dict[str, Any],
) -> Path:
    """Write a complete checkpoint to ``out/checkpoint`` and return its path.

    saes: member folder name -> SAE, each written with ``patchsae.sae.io.save``.
    tensors, state: the trainer state (safetensors and JSON parts).
    """
    tmp, current, old = out / TMP, out / CURRENT, out / OLD
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for name, sae in saes.items():
        save(sae, tmp / name)
    save_file(tensors, str(tmp / STATE_TENSORS))
    write_json(tmp / STATE_JSON, {"format_version": FORMAT_VERSION, **state})
    if current.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(current, old)
    os.replace(tmp, current)
    if old.exists():
        shutil.rmtree(old)
    return current


def find_checkpoint(out: Path) -> Path | None:
    """The latest complete checkpoint in ``out`` (``checkpoint``, else ``ckpt-old``), or None."""
    for name in (CURRENT, OLD):
        if (out / name / STATE_JSON).is_file():
            return out / name
    return None


def read_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The JSON state and the tensors of the checkpoint at ``path``."""
    state = json.loads((path / STATE_JSON).read_text())
    if state.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} holds a trainer checkpoint of format {state.get('format_version')}, this "
            f"version reads format {FORMAT_VERSION}: resume it with the version that wrote it"
        )
    return state, load_file(str(path / STATE_TENSORS))
