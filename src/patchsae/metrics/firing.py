"""Token-level firing frequencies of SAE latents and the dead / dense fractions derived from them.

A latent *fires* on a token when its code is > 0. Its frequency is the number of tokens it fired
on divided by the number of tokens seen: a token-level rate in [0, 1].
"""

from __future__ import annotations

from collections import deque

import torch
from jaxtyping import Float, Int

from patchsae.shapes import shaped

DEAD = 0.0
ALMOST_DEAD = 1e-7
DENSE = 1e-2


FRACTIONS = ("frac_dead", "frac_almost_dead", "frac_dense")


@shaped
def firing_fractions_tensor(
    freqs_m: Float[torch.Tensor, " d_sae"],
    *,
    dead: float = DEAD,
    almost_dead: float = ALMOST_DEAD,
    dense: float = DENSE,
) -> Float[torch.Tensor, " 3"]:
    """:func:`firing_fractions` as a (3,) float64 tensor on the device of ``freqs_m``, in the
    order of ``FRACTIONS`` (no host sync)."""
    if freqs_m.numel() == 0:
        raise MetricsError("expected a non-empty (d_sae,) frequency vector, got an empty one")
    masks = [freqs_m <= dead, freqs_m < almost_dead, freqs_m > dense]
    return torch.stack([mask.double().mean() for mask in masks])


def firing_fractions(
    freqs_m: torch.Tensor,
    *,
    dead: float = DEAD,
    almost_dead: float = ALMOST_DEAD,
    dense: float = DENSE,
) -> dict[str, float]:
    """Fractions of latents that are dead, almost dead or dense.

    freqs_m: (d_sae,) token-level firing frequencies.
    Returns ``frac_dead`` (frequency <= dead), ``frac_almost_dead`` (frequency < almost_dead,
    dead latents included) and ``frac_dense`` (frequency > dense).
    """
    fractions = firing_fractions_tensor(freqs_m, dead=dead, almost_dead=almost_dead, dense=dense)
    return dict(zip(FRACTIONS, fractions.tolist(), strict=True))


class MetricsError(ValueError):
    """Metrics asked of inputs they cannot be computed on (empty, mis-shaped, inconsistent)."""


class FiringWindow:
    """Firing counts over the most recent ``window_tokens`` tokens, kept as per-step chunks.

    Each ``update`` appends one chunk (the step's fire counts and token count). The oldest chunk is
    dropped as soon as the newer chunks alone cover ``window_tokens`` tokens, so the window always
    spans at least ``window_tokens`` tokens once that many have been seen (at most one step more).
    In DDP, all-reduce ``fire_counts`` and ``n_tokens`` over ranks before ``update``.
    """

    def __init__(self, d_sae: int, window_tokens: int) -> None:
        if d_sae <= 0:
            raise MetricsError(f"d_sae must be positive, got {d_sae}")
        if window_tokens <= 0:
            raise MetricsError(f"window_tokens must be positive, got {window_tokens}")
        self.d_sae = d_sae
        self.window_tokens = window_tokens
        self._chunks: deque[tuple[torch.Tensor, int]] = deque()
        self._counts_m: torch.Tensor | None = None
        self._n_tokens = 0

    @property
    def n_tokens(self) -> int:
        """Number of tokens the window currently spans."""
        return self._n_tokens

    @property
    def full(self) -> bool:
        """Whether the window spans at least ``window_tokens`` tokens."""
        return self._n_tokens >= self.window_tokens

    @shaped
    def update(self, fire_counts: Int[torch.Tensor, " d_sae"], n_tokens: int) -> None:
        """Add one step: fire_counts (d_sae,) integer firings per latent over n_tokens tokens."""
        if fire_counts.shape != (self.d_sae,):
            raise MetricsError(
                f"fire_counts must have shape ({self.d_sae},), got {tuple(fire_counts.shape)}"
            )
        if n_tokens <= 0:
            raise MetricsError(f"n_tokens must be positive, got {n_tokens}")
        counts_m = fire_counts.detach().to(torch.int64)
        self._chunks.append((counts_m, int(n_tokens)))
        self._counts_m = counts_m.clone() if self._counts_m is None else self._counts_m + counts_m
        self._n_tokens += int(n_tokens)
        while self._n_tokens - self._chunks[0][1] >= self.window_tokens:
            old_m, old_n = self._chunks.popleft()
            self._counts_m -= old_m
            self._n_tokens -= old_n

    @shaped
    def counts(self) -> Int[torch.Tensor, " d_sae"]:
        """(d_sae,) int64 firings per latent over the window."""
        if self._counts_m is None:
            raise MetricsError(
                "the firing window is empty: call update() with a step's counts first"
            )
        return self._counts_m.clone()

    @shaped
    def frequencies(self) -> Float[torch.Tensor, " d_sae"]:
        """(d_sae,) float64 token-level firing frequency of each latent over the window."""
        return self.counts().double() / self._n_tokens

    def fractions(
        self, dead: float = DEAD, almost_dead: float = ALMOST_DEAD, dense: float = DENSE
    ) -> dict[str, float]:
        """Dead / almost-dead / dense fractions of latents over the window (firing_fractions)."""
        return firing_fractions(self.frequencies(), dead=dead, almost_dead=almost_dead, dense=dense)

    def fractions_tensor(
        self, dead: float = DEAD, almost_dead: float = ALMOST_DEAD, dense: float = DENSE
    ) -> torch.Tensor:
        """:meth:`fractions` as a (3,) float64 tensor in the order of ``FRACTIONS``, unread."""
        freqs_m = self.frequencies()
        return firing_fractions_tensor(freqs_m, dead=dead, almost_dead=almost_dead, dense=dense)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The chunks as tensors (safetensors-ready): counts (k, d_sae) int64, tokens (k,) int64."""
        if not self._chunks:
            return {
                "counts": torch.zeros(0, self.d_sae, dtype=torch.int64),
                "tokens": torch.zeros(0, dtype=torch.int64),
            }
        return {
            "counts": torch.stack([c.cpu() for c, _ in self._chunks]),
            "tokens": torch.tensor([n for _, n in self._chunks], dtype=torch.int64),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the chunks saved by ``state_dict`` (replaces the current window)."""
        counts_km, tokens_k = state["counts"], state["tokens"]
        if counts_km.ndim != 2 or counts_km.shape[1] != self.d_sae:
            raise MetricsError(
                f"saved firing counts have shape {tuple(counts_km.shape)}, "
                f"expected (k, {self.d_sae}): the window belongs to an SAE of another width"
            )
        device = self._counts_m.device if self._counts_m is not None else counts_km.device
        self._chunks.clear()
        self._counts_m = None
        self._n_tokens = 0
        for counts_m, n in zip(counts_km.to(device), tokens_k.tolist(), strict=True):
            self.update(counts_m, int(n))
