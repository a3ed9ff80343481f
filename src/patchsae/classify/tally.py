"""Per-class counts of each condition: images, top-1 and top-5 correct (JSON round trip)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from patchsae.classify.splice import Condition


class Tally:
    """``n``, ``correct``, ``correct_top5``: (n_classes,) int64 counts per condition name."""

    FIELDS = ("n", "correct", "correct_top5")

    def __init__(self, conditions: list[Condition], n_classes: int) -> None:
        self.conditions, self.n_classes = conditions, n_classes
        self.counts = {
            c.name: {f: torch.zeros(n_classes, dtype=torch.int64) for f in self.FIELDS}
            for c in conditions
        }

    def add(self, cond: Condition, logits_bc: Tensor, labels_b: Tensor) -> None:
        """Count a batch: logits (B, n_classes), labels (B,) in ``0..n_classes - 1``."""
        logits_bc, labels_b = logits_bc.cpu(), labels_b.cpu()
        top = logits_bc.topk(min(5, self.n_classes), dim=-1).indices
        hit1 = top[:, 0] == labels_b
        hit5 = (top == labels_b[:, None]).any(-1)
        row = self.counts[cond.name]
        row["n"] += torch.bincount(labels_b, minlength=self.n_classes)
        row["correct"] += torch.bincount(labels_b[hit1], minlength=self.n_classes)
        row["correct_top5"] += torch.bincount(labels_b[hit5], minlength=self.n_classes)

    def to_json(self) -> dict[str, Any]:
        return {n: {f: v.tolist() for f, v in row.items()} for n, row in self.counts.items()}

    def load_json(self, data: dict[str, Any]) -> None:
        """Counts saved by ``to_json`` for the same conditions and classes."""
        for name, row in self.counts.items():
            for f in self.FIELDS:
                row[f] = torch.tensor(data[name][f], dtype=torch.int64).reshape(self.n_classes)
