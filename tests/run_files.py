"""Readers of a training run folder: final weights and the metrics log."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of ``folder/sae.safetensors``."""
    return load_file(str(folder / "sae.safetensors"))


def metrics(folder: Path) -> list[dict]:
    """Every row of ``folder/metrics.jsonl``, in order."""
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def untimed_metrics(folder: Path) -> list[dict]:
    """The rows of ``metrics(folder)`` without ``tokens_per_s``, which varies between equal runs."""
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in metrics(folder)]
