"""Seeded orders: the one keyed generator behind every shuffle of images and tokens.

The generator keyed by ``(seed, *keys)`` is ``PCG64(SeedSequence(seed, spawn_key=keys))``. With no
keys it is ``PCG64(seed)``; each key tuple gives its own stream, so ``(seed, epoch)`` (an epoch's
image order) and ``(seed, epoch, window)`` (a window's token order) never share one, even when
the window is 0 (a plain entropy list ``[seed, epoch, 0]`` would equal ``[seed, epoch]``).
"""

from __future__ import annotations

import numpy as np


def keyed_rng(seed: int, *keys: int) -> np.random.Generator:
    """A generator determined by ``seed`` and the non-negative integers ``keys``."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=keys)))


def seeded_order(n: int, seed: int | None, *keys: int) -> np.ndarray:
    """(n,) int64: 0..n-1 permuted by ``keyed_rng(seed, *keys)``, or in order when seed is None."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if seed is None:
        return np.arange(n, dtype=np.int64)
    return keyed_rng(seed, *keys).permutation(n).astype(np.int64)


def epoch_order(n: int, seed: int | None, epoch: int) -> np.ndarray:
    """(n,) int64 positions of ``n`` images in the order epoch ``epoch`` visits them."""
    return seeded_order(n, seed, epoch)


def window_positions(order: np.ndarray, window: int, size: int) -> np.ndarray:
    """Ascending image positions of window ``window``: ``order[window * size:(window + 1) * size]``.

    Token windows list their tokens by image in this ascending order, then by token position.
    """
    return np.sort(order[window * size : (window + 1) * size])


def shuffle_window_tokens(
    tokens_nd: np.ndarray, seed: int | None, epoch: int, window: int
) -> np.ndarray:
    """Tokens of one window, (n, D), permuted by ``keyed_rng(seed, epoch, window)`` (as is: None).

    ``tokens_nd`` lists the window's tokens by image (as ``window_positions`` orders them), then by
    token position: (window images * tokens per image, D).
    """
    return tokens_nd[seeded_order(len(tokens_nd), seed, epoch, window)]
