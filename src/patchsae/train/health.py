"""Signs that a run diverged, checked by the trainer.

Non-finite weights or optimiser state stop the run with a ``TrainingError`` before any
checkpoint or output holds them (a learning rate far too large can overflow Adam's second moment
to infinity while the loss stays finite). Every latent dead, or held-out FVU above 1 (worse than
predicting the mean), for ``PATIENCE`` checks in a row is warned about, on the console and as the
``warning`` entry of that metrics line, naming the step it began and the last good checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from patchsae.train.checkpoint import STATE_JSON, find_checkpoint
from patchsae.train.errors import TrainingError

PATIENCE = 3


def count_nonfinite(module: torch.nn.Module, opt: torch.optim.Optimizer) -> torch.Tensor:
    """NaN and infinite values in the parameters of ``module`` and the floating-point state of
    ``opt``: a 0-d int64 tensor on their device, not read back (the trainer reads it at its next
    sync)."""
    tensors = [p.detach() for p in module.parameters()]
    tensors += [
        value
        for state in opt.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor) and value.is_floating_point()
    ]
    return torch.stack([(~torch.isfinite(t)).sum() for t in tensors]).sum()


def last_good_checkpoint(out: Path, before: int | None = None) -> str:
    """A sentence naming the latest checkpoint in ``out``, good when written before step
    ``before`` (None: every checkpoint is good)."""
    ckpt = find_checkpoint(out)
    if ckpt is None:
        return "No checkpoint was written before it: restart from step 0."
    try:
        step = json.loads((ckpt / STATE_JSON).read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"The latest checkpoint, {ckpt}, cannot be read."
    if before is None or step < before:
        return f"The last good checkpoint is {ckpt} (step {step})."
    return (
        f"The latest checkpoint, {ckpt} (step {step}), was written after that; no earlier one "
        "is kept: restart from step 0."
    )


def check_finite(bad: int, step: int, label: str, out: Path) -> None:
    """Raise ``TrainingError`` when ``bad`` (``count_nonfinite`` read back) values of the weights
    or the optimiser state are NaN or inf."""
    if bad:
        raise TrainingError(
            f"the run diverged by step {step}{label}: {bad} NaN/inf values in the weights or "
            "Adam's state (Adam's moments can overflow while the loss stays finite). The run "
            f"stopped before saving them. {last_good_checkpoint(out)} Lower lr and train again "
            "into a new out="
        )


WARNINGS = {
    "dead": "every latent has been dead for {n} log lines in a row",
    "fvu": "held-out FVU has been above 1 (worse than predicting the mean) for {n} evaluations "
    "in a row",
}


@dataclass
class Watch:
    """Consecutive bad checks of one SAE, per kind (``dead``, ``fvu``)."""

    streaks: dict[str, int] = field(default_factory=dict)
    onsets: dict[str, int] = field(default_factory=dict)

    def observe(self, kind: str, bad: bool, step: int, label: str, out: Path) -> str | None:
        """Record one check at ``step``; the warning when a streak just reached ``PATIENCE``."""
        if not bad:
            self.streaks[kind] = 0
            return None
        if not self.streaks.get(kind):
            self.onsets[kind] = step
        self.streaks[kind] = self.streaks.get(kind, 0) + 1
        if self.streaks[kind] != PATIENCE:
            return None
        onset = self.onsets[kind]
        return (
            f"step {step}{label}: {WARNINGS[kind].format(n=PATIENCE)}, since step {onset}: the "
            f"run looks diverged; lower lr. {last_good_checkpoint(out, before=onset)}"
        )
