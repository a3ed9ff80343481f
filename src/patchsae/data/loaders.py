"""Seeded, resumable streams over an activation store: shuffled tokens and batches of images.

Both streams are pure functions of their arguments: batch ``i`` of a stream is the same whether
the stream starts at batch 0 or at ``start_batch=i``, so training resumes exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import numpy as np
import torch
from jaxtyping import Float, Int

from patchsae.data.rebatch import rebatch
from patchsae.data.shuffle import epoch_order, shuffle_window_tokens, window_positions
from patchsae.data.store import ActivationStore, StoreError
from patchsae.shapes import shaped


def _check_seed(name: str, seed: int | None) -> None:
    if seed is not None and (not isinstance(seed, (int, np.integer)) or seed < 0):
        raise StoreError(f"{name} must be a non-negative integer or None, got {seed!r}")


def _check_stream(batch_size: int, start_batch: int, epochs: int | None) -> None:
    """Refuse a batch size below 1, a negative start batch or an ``epochs`` below 1."""
    if batch_size < 1 or start_batch < 0:
        raise StoreError(
            f"batch_size must be >= 1 and start_batch >= 0, got batch_size={batch_size}, "
            f"start_batch={start_batch}"
        )
    if epochs is not None and epochs < 1:
        raise StoreError(f"epochs must be >= 1 or None, got {epochs}")


def _image_range(store: ActivationStore, start: int, stop: int | None) -> tuple[int, int]:
    stop = len(store) if stop is None else stop
    if not 0 <= start < stop <= len(store):
        raise StoreError(
            f"image range [{start}, {stop}) is empty or outside the store's {len(store)} images; "
            "pass 0 <= start < stop <= len(store)"
        )
    return start, stop


def token_batches(
    store: ActivationStore,
    batch_size: int,
    *,
    seed: int | None,
    layer: int | None = None,
    tokens: Literal["all", "all_with_prompts", "cls", "patches"] = "all",
    window_images: int = 64,
    start_batch: int = 0,
    epochs: int | None = None,
    start: int = 0,
    stop: int | None = None,
) -> Iterator[torch.Tensor]:
    """Shuffled token batches, each (batch_size, D) float32, from images [start, stop).

    Per epoch the images are permuted by ``epoch_order(n, seed, epoch)`` and cut into windows of
    ``window_images``; within window w the tokens (listed by image in store order, then token
    position) are permuted by ``shuffle_window_tokens(..., seed, epoch, w)``, both from
    ``patchsae.data.shuffle`` (which the streaming source shares). Concatenating all windows
    of all epochs gives one token stream; batch i is tokens [i * batch_size, (i + 1) * batch_size).
    ``seed=None`` keeps store order. ``epochs=None`` streams forever; otherwise the incomplete last
    batch is dropped, and a range whose ``epochs`` epochs hold fewer than ``batch_size`` tokens is
    refused (it would yield nothing).
    """
    _check_seed("seed", seed)
    _check_stream(batch_size, start_batch, epochs)
    if window_images < 1:
        raise StoreError(f"window_images must be >= 1, got {window_images}")
    start, stop = _image_range(store, start, stop)
    layer = store.resolve_layer(layer)
    token_sel = store.token_layout.positions(tokens)
    n_images = stop - start
    per_image = token_sel.stop - token_sel.start
    per_window = window_images * per_image
    if epochs is not None and epochs * n_images * per_image < batch_size:
        raise StoreError(
            f"images [{start}, {stop}) hold {n_images * per_image} {tokens} tokens per epoch, "
            f"{epochs} epoch(s) cannot fill one batch of {batch_size}: lower batch_size, widen "
            "the image range or raise epochs"
        )
    epoch, within = divmod(start_batch * batch_size, n_images * per_image)
    first_window, skip = divmod(within, per_window)

    def windows() -> Iterator[tuple[tuple[int, int], np.ndarray]]:
        e, first = epoch, first_window
        while epochs is None or e < epochs:
            order = epoch_order(n_images, seed, e)
            for w in range(first, -(-n_images // window_images)):
                images = window_positions(order, w, window_images) + start
                window_nd = store.take(images, layer, token_sel).reshape(-1, store.d_model)
                yield (e, w), shuffle_window_tokens(window_nd, seed, e, w)
            first, e = 0, e + 1

    for batch, _, _ in rebatch(windows(), batch_size, _concat, skip=skip):
        yield torch.from_numpy(batch)


def _concat(pieces: list[np.ndarray]) -> np.ndarray:
    """The pieces of a batch as one array (a single piece as it is, uncopied)."""
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


def image_batches_from_store(
    store: ActivationStore,
    batch_size: int,
    *,
    layer: int | None = None,
    start: int = 0,
    stop: int | None = None,
    shuffle_seed: int | None = None,
    start_batch: int = 0,
    epochs: int | None = 1,
) -> Iterator[torch.Tensor]:
    """Batches of whole images, each (B, T, D) float32, from images [start, stop) of the store.

    The image stream is each epoch's order (store order, or ``epoch_order(n, shuffle_seed,
    epoch)``) concatenated over epochs; batch i is images
    [i * batch_size, (i + 1) * batch_size) of that stream, so batches may span an epoch boundary.
    With a finite ``epochs`` the last batch holds the remaining images and may be smaller.
    """
    _check_seed("shuffle_seed", shuffle_seed)
    _check_stream(batch_size, start_batch, epochs)
    start, stop = _image_range(store, start, stop)
    layer = store.resolve_layer(layer)
    n_images = stop - start
    epoch, pos = divmod(start_batch * batch_size, n_images)

    def orders() -> Iterator[tuple[int, np.ndarray]]:
        e = epoch
        while epochs is None or e < epochs:
            yield e, epoch_order(n_images, shuffle_seed, e) + start
            e += 1

    for images, _, _ in rebatch(orders(), batch_size, _concat, skip=pos, keep_last=True):
        yield _read_images(store, images, layer)


@shaped
def _read_images(
    store: ActivationStore, images: Int[np.ndarray, " images"], layer: int
) -> Float[torch.Tensor, "images tokens d_model"]:
    """(len(images), T, D) float32 activations in the order of ``images`` (repeats allowed)."""
    unique, inverse = np.unique(images, return_inverse=True)
    acts = store.take(unique, layer)
    if len(unique) != len(images) or not np.array_equal(unique, images):
        acts = acts[inverse]
    return torch.from_numpy(acts)
