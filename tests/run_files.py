"""Readers of a training run folder: final weights and the metrics log."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
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


CLI_MAIN = "from patchsae.cli import main\nsys.exit(main(sys.argv[1:]))"


def dies_after(target: str, when: str = "True", main: str = CLI_MAIN) -> str:
    """Python source for ``python -c``: it wraps the function ``target`` ("module.name") so that
    the process SIGKILLs itself right after a call whose arguments ``args`` make ``when`` true,
    then runs ``main`` (the CLI on sys.argv[1:] by default). The kill then lands at a chosen
    point of the run however fast or slow the machine is."""
    module, name = target.rsplit(".", 1)
    return f"""
import os, signal, sys
import {module} as target
original = target.{name}
def call_then_die(*args):
    out = original(*args)
    if {when}:
        os.kill(os.getpid(), signal.SIGKILL)
    return out
target.{name} = call_then_die
{main}
"""


def kill_after_first_checkpoint(cfg: Any, work: Path) -> dict:
    """Run ``patchsae train`` on ``cfg`` in a subprocess that SIGKILLs itself once its first
    checkpoint is complete, and return that checkpoint's trainer state."""
    cfg_file = work / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(to_dict(cfg)))
    proc = subprocess.run(
        [sys.executable, "-c", dies_after("patchsae.train.trainer.write_checkpoint"), "train"]
        + [str(cfg_file)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    marker = Path(cfg.out) / "checkpoint" / "trainer_state.json"
    return json.loads(marker.read_text())


class Interrupted(Exception):
    """Stands for the process dying in the middle of a step."""


def train_until(cfg: Any, step: int) -> None:
    """Run ``train(cfg)`` in this process and stop it with ``Interrupted`` as training step
    ``step`` (0-based) begins."""
    from patchsae.train import trainer

    real = trainer.train_step

    def dying_step(cfg_: Any, member: Any, x: torch.Tensor, at: int, dist: Any) -> Any:
        if at == step:
            raise Interrupted
        return real(cfg_, member, x, at, dist)

    trainer.train_step = dying_step
    try:
        trainer.train(cfg)
    except Interrupted:
        return
    finally:
        trainer.train_step = real
    raise AssertionError(f"the run ended before step {step}")
