"""Trainer checkpoints: complete or absent, never half-written.

Layout of ``OUT/checkpoint/`` (format_version 1):

- ``{member}/sae.safetensors`` + ``{member}/cfg.json``: each SAE via ``patchsae.sae.io.save``
  (``member`` is ``sae`` for a single SAE, ``sae-00``, ``sae-01``... in a sweep);
- ``trainer_state.safetensors``: optimiser tensors (``{member}.adam.{param}.{key}``), dead-latent
  counters (``{member}.counters``), firing windows (``{member}.firing.{key}``) and RNG states
  (``rng.torch``, ``rng.cuda.{i}``) as uint8 tensors;
- ``trainer_state.json``: step, images and tokens seen, data position, optimiser hyper-parameters,
  the full training config and ``checksums`` (relative path -> ``patchsae.checksum`` of every
  other file, verified on resume). Written last: its presence marks the checkpoint complete.

A checkpoint is written into ``OUT/ckpt-tmp/`` (every file fsynced, then the folders) and then
swapped in by renames (``checkpoint`` -> ``ckpt-old``, ``ckpt-tmp`` -> ``checkpoint``, ``OUT``
fsynced, delete ``ckpt-old``), so a kill or a power cut at any moment leaves a complete
``checkpoint`` or ``ckpt-old`` behind. A checkpoint damaged all the same (a truncated or
missing file, or bytes changed in place) is refused on reading with a ``TrainingError`` that names
the file and the way out.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from patchsae.atomic import fsync_dir, write_json, write_with
from patchsae.checksum import file_checksum, file_problem
from patchsae.sae.formats.ours import load_ours
from patchsae.sae.io import save
from patchsae.train.errors import TrainingError

FORMAT_VERSION = 1
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
CURRENT, TMP, OLD = "checkpoint", "ckpt-tmp", "ckpt-old"
STATE_KEYS = ("step", "images", "tokens", "data_position", "members", "source", "config")


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
    sae_extra: dict[str, Any] | None = None,
) -> Path:
    """Write a complete checkpoint to ``out/checkpoint`` and return its path.

    saes: member folder name -> SAE, each written with ``patchsae.sae.io.save`` (``sae_extra``
    added to each cfg.json).
    tensors, state: the trainer state (safetensors and JSON parts).
    """
    tmp, current, old = out / TMP, out / CURRENT, out / OLD
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for name, sae in saes.items():
        save(sae, tmp / name, extra=sae_extra)
        fsync_dir(tmp / name)
    write_with(tmp / STATE_TENSORS, lambda path: save_file(tensors, str(path)))
    checksums = {
        file.relative_to(tmp).as_posix(): file_checksum(file)
        for file in sorted(tmp.rglob("*"))
        if file.is_file()
    }
    write_json(
        tmp / STATE_JSON, {"format_version": FORMAT_VERSION, **state, "checksums": checksums}
    )
    fsync_dir(tmp)
    if current.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(current, old)
    os.replace(tmp, current)
    fsync_dir(out)
    if old.exists():
        shutil.rmtree(old)
    return current


def find_checkpoint(out: Path) -> Path | None:
    """The latest complete checkpoint in ``out`` (``checkpoint``, else ``ckpt-old``), or None."""
    for name in (CURRENT, OLD):
        if (out / name / STATE_JSON).is_file():
            return out / name
    return None


def damaged(path: Path, file: Path, problem: str) -> TrainingError:
    """The error for a damaged checkpoint at ``path``: names ``file`` and the way out."""
    older = path.parent / OLD
    if path.name != OLD and (older / STATE_JSON).is_file():
        fix = f"delete {path} and resume again: the run goes on from the previous one, {older}"
    else:
        fix = f"delete {path} and resume again to restart the run from step 0"
    return TrainingError(f"the trainer checkpoint is damaged: {file} {problem}. To go on, {fix}")


def read_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The JSON state and the tensors of the checkpoint at ``path``.

    A file that cannot be read or lacks an entry the trainer needs is a ``TrainingError``.
    """
    try:
        state = json.loads((path / STATE_JSON).read_text())
        missing = [k for k in ("format_version", *STATE_KEYS) if k not in state]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError) as err:
        raise damaged(path, path / STATE_JSON, f"cannot be read ({err})") from None
    if missing:
        raise damaged(path, path / STATE_JSON, f"lacks {missing}")
    if state["format_version"] != FORMAT_VERSION:
        raise TrainingError(
            f"{path} holds a trainer checkpoint of format {state['format_version']}, this "
            f"version reads format {FORMAT_VERSION}: resume it with the version that wrote it"
        )
    checksums = state.get("checksums") or {}
    if not isinstance(checksums, dict):
        raise damaged(path, path / STATE_JSON, "has no valid checksums entry")
    for name, expected in checksums.items():
        problem = file_problem(path / name, expected)
        if problem is not None:
            raise damaged(path, path / name, problem)
    try:
        tensors = load_file(str(path / STATE_TENSORS))
    except (OSError, SafetensorError) as err:
        raise damaged(path, path / STATE_TENSORS, f"cannot be read ({err})") from None
    members = state["members"]
    if not isinstance(members, dict) or not all(
        isinstance(m, dict) and "param_groups" in m for m in members.values()
    ):
        raise damaged(path, path / STATE_JSON, "has no valid members entry")
    parts = ("counters", "firing.counts", "firing.tokens")
    expected = ["rng.torch", *(f"{name}.{part}" for name in members for part in parts)]
    absent = [k for k in expected if k not in tensors]
    if absent:
        raise damaged(path, path / STATE_TENSORS, f"lacks the tensors {absent}")
    return state, tensors


def load_member(path: Path, name: str) -> Any:
    """The SAE saved as member ``name`` of the checkpoint at ``path`` (our format only)."""
    try:
        return load_ours(path / name)
    except (OSError, SafetensorError, ValueError, RuntimeError) as err:
        raise damaged(path, path / name, f"cannot be read ({err})") from None
