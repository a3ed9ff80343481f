"""What every SAE checkpoint format shares: its error, JSON and safetensors reading, the
check of tensors against a config, and the SAE built from them."""

from __future__ import annotations

import json
import reprlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from patchsae.config import ConfigError
from patchsae.sae.base import SAE
from patchsae.sae.config import SAEConfig, from_saved
from patchsae.sae.registry import make_sae


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed, unsafe, or does not match its config."""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is not readable JSON: {err}") from None
    except RecursionError:
        raise CheckpointError(f"{path} nests lists or objects too deeply to be a config") from None
    except ValueError as err:  # an integer of more digits than Python converts
        raise CheckpointError(f"{path} is not a config: {err}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors on CPU, header metadata) of a safetensors file."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
            return tensors, dict(handle.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from None


def _state_tensors(sae: SAE) -> dict[str, torch.Tensor]:
    return {key: value.detach().cpu().contiguous() for key, value in sae.state_dict().items()}


def _check_tensors(
    found: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]], source: str
) -> None:
    """CheckpointError listing missing/unexpected keys and every shape mismatch."""
    problems = []
    missing = [key for key in expected if key not in found]
    unexpected = sorted(key for key in found if key not in expected)
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    for key, shape in expected.items():
        if key in found and tuple(found[key].shape) != tuple(shape):
            problems.append(f"{key}: expected {_shape_str(shape)}, found {tuple(found[key].shape)}")
    if problems:
        raise CheckpointError(
            f"{source} does not match its config: "
            + "; ".join(problems)
            + f" (expected keys {list(expected)})"
        )


def _make_config(fields: dict[str, Any], source: str) -> SAEConfig:
    """The config of a saved file; options of other architectures (which files saved before
    configs were per architecture carry) are dropped."""
    try:
        return from_saved(fields)
    except ConfigError as err:
        raise CheckpointError(f"{source}: invalid SAE config: {err}") from None


def _expected_shapes(cfg: SAEConfig, source: str) -> dict[str, tuple[int, ...]]:
    """The state-dict shapes of ``make_sae(cfg)``, found on the meta device (nothing allocated),
    so sizes a config declares are checked against the tensors a file holds before any
    allocation."""
    try:
        with torch.device("meta"):
            state = make_sae(cfg).state_dict()
    except (RuntimeError, OverflowError, MemoryError, TypeError) as err:
        raise CheckpointError(
            f"{source}: the config declares sizes no SAE can have (d_in={_short(cfg.d_in)}, "
            f"d_sae={_short(cfg.d_sae)}): {type(err).__name__}"
        ) from None
    return {key: tuple(value.shape) for key, value in state.items()}


def _short(value: Any) -> str:
    """``repr(value)`` cut to a line: crafted files hold deep lists and huge integers."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    return reprlib.repr(value)


def _shape_str(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(_short(n) for n in shape) + ("," if len(shape) == 1 else "") + ")"


def _build(cfg: SAEConfig, tensors: Mapping[str, torch.Tensor], source: str, device: Any) -> SAE:
    """A ``make_sae(cfg)`` module holding ``tensors`` (checked key by key before the module is
    allocated), on ``device``."""
    _check_tensors(tensors, _expected_shapes(cfg, source), source)
    sae = make_sae(cfg)
    state = sae.state_dict()
    sae.load_state_dict({key: tensors[key].to(state[key].dtype) for key in state})
    return sae.to(device).eval()
