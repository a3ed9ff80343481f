"""Readers of a training run folder: final weights and the metrics log."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file

from patchsae.config import to_dict


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of ``folder/sae.safetensors``."""
    return load_file(str(folder / "sae.safetensors"))


def metrics(folder: Path) -> list[dict]:
    """Every row of ``folder/metrics.jsonl``, in order."""
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


TIMED = ("tokens_per_s", "input_wait_s", "elapsed_s")


def untimed_metrics(folder: Path) -> list[dict]:
    """The rows of ``metrics(folder)`` without the timings, which vary between equal runs."""
    return [{k: v for k, v in r.items() if k not in TIMED} for r in metrics(folder)]


def kill_after_first_checkpoint(cfg: Any, work: Path) -> dict:
    """Run ``patchsae train`` on ``cfg`` in a subprocess, SIGKILL it once its first checkpoint is
    complete, and return that checkpoint's trainer state."""
    cfg_file = work / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(to_dict(cfg)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "patchsae", "train", str(cfg_file)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    marker = Path(cfg.out) / "checkpoint" / "trainer_state.json"
    deadline = time.time() + 60
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    return json.loads(marker.read_text())
