"""One training step of one SAE and its bookkeeping: warm-up factor, dead-latent counters.

The step follows the original's order (``SAETrainer._train_step``); see ``patchsae.train.trainer``.
Shapes: counters and fire_counts are (m,) with m = d_sae; x is (batch, ..., d_model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from patchsae import ddp
from patchsae.metrics.firing import FiringWindow
from patchsae.train.config import TrainConfig
from patchsae.train.errors import TrainingError
from patchsae.train.health import Watch


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Learning-rate multiplier ``min(1, (step + 1) / warmup_steps)`` for optimizer step ``step``.

    Counts from step 0, as ``LambdaLR`` does, so the first step already uses ``lr/warmup_steps``.
    ``warmup_steps=0`` means no warm-up (factor 1).
    """
    if warmup_steps < 0 or step < 0:
        raise ValueError(f"need step >= 0 and warmup_steps >= 0, got {step}, {warmup_steps}")
    if warmup_steps == 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)


def dead_latents(counters: Tensor, window: int) -> Tensor:
    """Bool mask (m,) of latents whose steps-since-fired counter exceeds ``window`` (strict)."""
    return counters > window


@torch.no_grad()
def update_dead_counters(counters: Tensor, fire_counts: Tensor) -> Tensor:
    """After a step: ``counters += 1``, then reset latents that fired (fire_counts (m,) > 0).

    counters (m,) is updated in place and returned.
    """
    if counters.shape != fire_counts.shape:
        raise ValueError(
            f"counters {tuple(counters.shape)} and fire_counts {tuple(fire_counts.shape)} differ"
        )
    counters += 1
    return counters.masked_fill_(fire_counts > 0, 0)  # no boolean indexing: no host sync


@dataclass
class Member:
    """One SAE of the run, with its own optimiser, dead-latent counters and output folder."""

    name: str
    sae: Any
    opt: torch.optim.Adam
    counters: torch.Tensor
    firing: FiringWindow
    out_dir: Path
    watch: Watch = field(default_factory=Watch)

    @property
    def ckpt_name(self) -> str:
        return self.name or "sae"

    @property
    def label(self) -> str:
        return f" (SAE {self.name})" if self.name else ""


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then constant."""
    return cfg.lr * warmup_factor(step, cfg.warmup_steps)


@dataclass
class StepValues:
    """One step's log values of one SAE, still on the device (``patchsae.train.sync`` reads them).

    ``packed`` (len(names) + 4,) float64, summed over ranks: the loss, its terms (``names``,
    sorted), the fire count, the dead-mask size and the number of non-finite activations.
    """

    step: int
    names: list[str]
    packed: Tensor
    lr: float
    n_tokens: int

    def record(self, values: list[float], world_size: int, label: str) -> dict[str, float]:
        """The metrics of the step from ``values`` (``packed`` read back); a ``TrainingError``
        when the loss is not finite."""
        *losses, fire_total, n_dead, x_bad = values
        losses = [v / world_size for v in losses]
        if not all(math.isfinite(v) for v in losses):
            if x_bad:
                raise TrainingError(
                    f"non-finite activations in the batch of step {self.step}: the activation "
                    "source holds NaN/Inf values. The run stopped; the last checkpoint is intact"
                )
            terms = ["total", *self.names]
            shown = ", ".join(f"{k}={v:.4g}" for k, v in zip(terms, losses, strict=True))
            raise TrainingError(
                f"non-finite loss at step {self.step}{label}: {shown}. The run stopped; the last "
                "checkpoint is intact. Lower lr or check the activations, then --resume"
            )
        record = {"lr": self.lr, "loss": losses[0]}
        record.update(zip(self.names, losses[1:], strict=True))
        record["l0"] = fire_total / self.n_tokens
        record["n_dead_mask"] = round(n_dead / world_size)
        return record


def train_step(
    cfg: TrainConfig, member: Member, x: torch.Tensor, step: int, dist: ddp.Dist
) -> StepValues:
    """One training step of one SAE on this rank's slice ``x``; returns its log values, unread.

    Nothing here reads a device value back to the host: the loss, its terms, the fire count, the
    dead-mask size and the count of NaN/Inf activations travel in one float64 tensor (one
    all-reduce), which the trainer reads at its next sync (``sync_every``) and checks there.
    """
    sae = member.sae
    sae.train()
    member.opt.zero_grad(set_to_none=True)
    sae.normalize_decoder_()
    dead = dead_latents(member.counters, cfg.dead_feature_window)
    out = sae.loss(x.to(sae.dtype), dead_mask=dead)
    names = sorted(out.terms)
    fire_local = out.fire_counts.detach().to(torch.int64)
    packed = torch.stack(
        [
            out.total.detach().double(),
            *(out.terms[k].detach().double() for k in names),
            fire_local.sum().double(),
            dead.sum().double(),
            (~torch.isfinite(x)).sum().double(),
        ]
    )
    ddp.all_reduce_sum_(packed, dist)
    fire = ddp.all_reduce_sum_(fire_local.clone(), dist)
    update_dead_counters(member.counters, fire)
    n_tokens = x.numel() // x.shape[-1] * dist.world_size
    member.firing.update(fire, n_tokens)
    out.total.backward()
    ddp.average_gradients_(sae, dist)
    sae.remove_parallel_grad_()
    lr = lr_at(cfg, step)
    for group in member.opt.param_groups:
        group["lr"] = lr
    member.opt.step()
    return StepValues(step, names, packed, lr, n_tokens)
