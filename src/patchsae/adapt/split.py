"""Which classes and images a few-shot run trains on: the base-to-novel split and the shots."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from patchsae.data.shuffle import keyed_rng

from .config import AdaptError

SHOTS_STREAM = 0
"""First key of the generators that draw shots (``keyed_rng(seed, SHOTS_STREAM, class)``)."""


def base_novel(n_classes: int) -> tuple[list[int], list[int]]:
    """MaPLe / CoCoOp's split of labels 0..n-1: the first ceil(n/2) are base, the rest novel."""
    if n_classes < 2:
        raise AdaptError(
            f"the base-to-novel protocol needs at least 2 classes, the data has {n_classes}: "
            "use protocol=all"
        )
    m = math.ceil(n_classes / 2)
    return list(range(m)), list(range(m, n_classes))


def few_shot(
    labels: np.ndarray,
    classes: Sequence[int],
    shots: int,
    seed: int,
    usable: Callable[[int], bool] = lambda i: True,
) -> dict[int, list[int]]:
    """``shots`` example ids per class of ``classes``, drawn by ``seed``: class c's examples in
    the order ``keyed_rng(seed, SHOTS_STREAM, c)`` permutes them, the first ``shots`` for which
    ``usable(i)`` holds (so bad images are skipped, not counted), sorted. A class with fewer
    usable examples gives all of them (as Dassl does); one with none is an error."""
    if shots < 1:
        raise AdaptError(f"shots must be >= 1, got {shots}")
    out = {}
    for c in classes:
        members = np.flatnonzero(labels == c)
        picked: list[int] = []
        for i in keyed_rng(seed, SHOTS_STREAM, c).permutation(members):
            if usable(int(i)):
                picked.append(int(i))
                if len(picked) == shots:
                    break
        if not picked:
            raise AdaptError(f"class {c} has no usable training image: check the data")
        out[int(c)] = sorted(picked)
    return out


def harmonic_mean(base: float, novel: float) -> float:
    """2 b n / (b + n), the base-to-novel summary (0 when both are 0)."""
    return 2 * base * novel / (base + novel) if base + novel > 0 else 0.0
