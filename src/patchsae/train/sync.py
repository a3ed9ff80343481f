"""Host syncs of the training loop: each step's values stay on the device until the next sync.

``train_step`` returns its log values unread (``StepValues``). The trainer hands them, with the
device-side firing fractions and NaN/inf counts of its log and checkpoint steps, to ``Pending``;
every ``sync_every`` steps, and at every checkpoint, evaluation and the end of the run,
``Pending.sync`` reads all of them back in one transfer and goes through the steps in order:
per step the losses of every SAE are checked (``TrainingError`` naming the first bad step), then
the weights and Adam's state where they were counted, then the metrics lines are written. With
``sync_every=1`` that is every step; the lines and their values do not depend on ``sync_every``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from patchsae.metrics.firing import FRACTIONS
from patchsae.train.health import check_finite, count_nonfinite
from patchsae.train.log import Logger
from patchsae.train.step import Member, StepValues


@dataclass
class Entry:
    """One step of one SAE waiting for the next sync.

    ``line``: the host part of its metrics line (step, images, tokens and the timings), None when
    the step logs nothing; ``fractions`` (3,) float64 and ``nonfinite`` () int64 live on the
    device, computed after the step's update (``nonfinite`` at log and checkpoint steps).
    """

    member: Member
    values: StepValues
    done: int
    line: dict[str, Any] | None
    fractions: torch.Tensor | None
    nonfinite: torch.Tensor | None

    def tensors(self) -> list[torch.Tensor]:
        """The device tensors to read back, flattened to float64, in the order ``split`` takes."""
        extra = [self.fractions, self.nonfinite]
        return [self.values.packed] + [t.reshape(-1).double() for t in extra if t is not None]

    def split(
        self, numbers: Iterator[float]
    ) -> tuple[list[float], list[float] | None, float | None]:
        """Take this entry's values, fractions and NaN/inf count from ``numbers``, the read-back
        of the ``tensors()`` of the entries in order."""
        values = list(islice(numbers, self.values.packed.numel()))
        fractions = list(islice(numbers, len(FRACTIONS))) if self.fractions is not None else None
        return values, fractions, next(numbers) if self.nonfinite is not None else None


class Pending:
    """The entries of the steps since the last sync, and the reading of them (see the module)."""

    def __init__(self, log: Logger, world_size: int, out: Path) -> None:
        self.log, self.world_size, self.out = log, world_size, out
        self.steps: list[list[Entry]] = []

    def add(
        self,
        members: list[Member],
        values: list[StepValues],
        done: int,
        line: dict[str, Any] | None,
        check: bool,
    ) -> None:
        """Queue one step of every SAE (``done`` steps done after it); ``line`` (None: no log
        line) is its host part, ``check`` counts NaN/inf in the weights and Adam's state."""
        entries = []
        for member, step_values in zip(members, values, strict=True):
            fractions = member.firing.fractions_tensor() if line else None
            nonfinite = count_nonfinite(member.sae, member.opt) if check else None
            entries.append(Entry(member, step_values, done, line, fractions, nonfinite))
        self.steps.append(entries)

    def sync(self) -> float:
        """Read every queued value (one host read), check and log the steps in order; empty the
        queue. Returns the loss of the first SAE at the last step."""
        tensors = [t for entries in self.steps for e in entries for t in e.tensors()]
        numbers = iter(torch.cat(tensors).tolist())
        loss = float("nan")
        for entries in self.steps:
            read = [e.split(numbers) for e in entries]
            records = [
                e.values.record(values, self.world_size, e.member.label)
                for e, (values, _, _) in zip(entries, read, strict=True)
            ]
            for e, (_, _, bad) in zip(entries, read, strict=True):
                if bad is not None:
                    check_finite(int(bad), e.done, e.member.label, self.out)
            for e, record, (_, fractions, _) in zip(entries, records, read, strict=True):
                if e.line is not None:
                    self._write(e, record, fractions)
            loss = records[0]["loss"]
        self.steps.clear()
        return loss

    def _write(self, e: Entry, record: dict[str, float], fractions: list[float]) -> None:
        head = {k: e.line[k] for k in ("step", "images", "tokens")}
        timing = {k: v for k, v in e.line.items() if k not in head}
        line = {**head, **record, **dict(zip(FRACTIONS, fractions, strict=True)), **timing}
        warning = e.member.watch.observe(
            "dead", line["frac_dead"] >= 1.0, e.done, e.member.label, self.out
        )
        self.log.log(e.member, {**line, "warning": warning} if warning else line)
