"""Interleaved timing shared by the bench scripts: each round calls every function once, so a
change in machine load between rounds affects all of them alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved_times(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    warmup: bool = True,
    before: dict[str, Callable[[], object]] | None = None,
) -> dict[str, list[float]]:
    """Seconds of each call of each function over ``repeats`` rounds (after one untimed call
    each when ``warmup``); ``before[name]``, when given, runs untimed before every call of
    ``fns[name]`` (e.g. to restore the state the call changes)."""
    before = before or {}
    if warmup:
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if name in before:
                before[name]()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    """Median seconds per function of ``interleaved_times``."""
    return {name: statistics.median(ts) for name, ts in times.items()}
