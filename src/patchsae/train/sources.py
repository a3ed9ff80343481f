"""Where training batches come from: an activation store on disk, or a backbone on the fly.

A source yields *global* batches (the whole step's batch; under DDP each rank keeps its slice),
together with the data position right after that batch, so a run can resume at any step:

- ``batch_mode=images``: (B, T, D) activations of ``batch_images`` images, tokens already
  selected (``all``: (B, T, D); ``cls``: (B, 1, D); ``patches``: (B, n_patches, D));
- ``batch_mode=tokens``: (N, D) token-shuffled batches of ``batch_tokens`` tokens.

The last ``eval_images`` images (store order, or the image source's order when streaming) are
held out: never trained on, used by ``eval_batches``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from tqdm import tqdm

from patchsae.backbones import Backbone, TokenLayout, load_backbone
from patchsae.data.images import BadRecord, image_batches, open_images
from patchsae.data.loaders import image_batches_from_store, token_batches
from patchsae.data.rebatch import rebatch
from patchsae.data.shuffle import epoch_order, shuffle_window_tokens, window_positions
from patchsae.data.store import ActivationStore
from patchsae.paths import resolve_local
from patchsae.train.config import TrainConfig


class SourceError(ValueError):
    """The configured source cannot feed this training run."""


def selected_layout(layout: TokenLayout, tokens: str) -> TokenLayout | None:
    """Layout of the tokens kept by ``tokens`` (None for ``cls``: a single token, no patches)."""
    if tokens == "all":
        return layout
    if tokens == "cls":
        return None
    return TokenLayout(n_tokens=layout.n_patches, cls_index=None, patch_start=0, grid=layout.grid)


class BatchSource(Protocol):
    """What the trainer reads from a batch source (``StoreSource`` or ``StreamSource``)."""

    layout: TokenLayout
    eval_layout: TokenLayout | None
    d_model: int
    tokens_per_image: int
    layer_index: int
    trained_on: dict[str, Any]
    store: ActivationStore | None
    backbone: Backbone | None
    bad: Sequence[BadRecord]

    def start_position(self) -> dict[str, Any]:
        """The data position of the first batch (JSON-ready, saved in checkpoints)."""
        ...

    def batches(self, position: dict[str, Any]) -> Iterator[tuple[torch.Tensor, dict[str, Any]]]:
        """Global batches from ``position`` on, each with the position after it."""
        ...

    def eval_batches(self) -> Iterator[torch.Tensor]:
        """The held-out images as ``reconstruction_metrics`` takes them with ``eval_layout``."""
        ...

    def restore(self, described: dict[str, Any]) -> None:
        """Take back what ``describe()`` recorded in the checkpoint being resumed."""
        ...

    def describe(self) -> dict[str, Any]:
        """What the run trains on (recorded with checkpoints)."""
        ...


class Source:
    """Shared bookkeeping of a batch source: layout, sizes, held-out slice."""

    layout: TokenLayout
    d_model: int
    n_images: int
    layer_index: int
    trained_on: dict[str, Any]
    store: ActivationStore | None = None
    backbone: Backbone | None = None
    bad: Sequence[BadRecord] = ()

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.positions = self.layout.positions(cfg.tokens)
        self.eval_layout = selected_layout(self.layout, cfg.tokens)
        self.tokens_per_image = self.positions.stop - self.positions.start
        self.n_train = self.n_images - cfg.eval_images
        if self.n_train <= 0:
            raise SourceError(
                f"eval_images={cfg.eval_images} leaves no images to train on (the source holds "
                f"{self.n_images}); lower eval_images"
            )
        if cfg.batch_mode == "images" and cfg.batch_images > self.n_train:
            raise SourceError(
                f"batch_images={cfg.batch_images} exceeds the {self.n_train} training images; "
                "lower batch_images"
            )

    def select(self, acts_btd: torch.Tensor) -> torch.Tensor:
        """The configured tokens of a (B, T, D) batch: (B, T_sel, D)."""
        return acts_btd[:, self.positions, :]

    def eval_view(self, acts_btd: torch.Tensor) -> torch.Tensor:
        """An eval batch as ``reconstruction_metrics`` takes it with ``eval_layout``."""
        x = self.select(acts_btd)
        return x.reshape(-1, x.shape[-1]) if self.eval_layout is None else x

    def restore(self, described: dict[str, Any]) -> None:
        """Take back what ``describe()`` recorded in the checkpoint being resumed."""

    def describe(self) -> dict[str, Any]:
        """What the run trains on (recorded with checkpoints)."""
        return {
            "n_images": self.n_images,
            "n_train_images": self.n_train,
            "tokens_per_image": self.tokens_per_image,
            "d_model": self.d_model,
            "token_layout": self.layout.to_dict(),
        }


class StoreSource(Source):
    """Batches read from an activation store with the store's loaders (position: batch index)."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.store = ActivationStore.open(cfg.store)
        extracted_from = self.store.meta.backbone.get("name")
        model = resolve_local(cfg.model)
        if model is not None and extracted_from is not None and model != extracted_from:
            raise SourceError(
                f"the store {cfg.store} was extracted from {extracted_from!r}, not model="
                f"{cfg.model!r}: set model={extracted_from} or model=null"
            )
        self.layer_index = self.store.resolve_layer(cfg.layer)
        self.trained_on = {"backbone": dict(self.store.meta.backbone), "layer": self.layer_index}
        self.layout = self.store.token_layout
        self.d_model = self.store.d_model
        self.n_images = len(self.store)
        super().__init__(cfg)

    def start_position(self) -> dict[str, Any]:
        return {"batch": 0}

    def batches(self, position: dict[str, Any]) -> Iterator[tuple[torch.Tensor, dict[str, Any]]]:
        """Global batches from ``position`` on, each with the position after it."""
        cfg, i = self.cfg, int(position["batch"])
        if cfg.batch_mode == "images":
            stream = image_batches_from_store(
                self.store,
                cfg.batch_images,
                layer=self.layer_index,
                start=0,
                stop=self.n_train,
                shuffle_seed=cfg.seed,
                start_batch=i,
                epochs=None,
            )
            stream = (self.select(x) for x in stream)
        else:
            stream = token_batches(
                self.store,
                cfg.batch_tokens,
                seed=cfg.seed,
                layer=self.layer_index,
                tokens=cfg.tokens,
                window_images=cfg.window_images,
                start_batch=i,
                epochs=None,
                start=0,
                stop=self.n_train,
            )
        for x in stream:
            i += 1
            yield x, {"batch": i}

    def eval_batches(self) -> Iterator[torch.Tensor]:
        """The held-out images, in store order, as ``eval_view`` batches."""
        for x in image_batches_from_store(
            self.store,
            self.cfg.eval_batch_images,
            layer=self.layer_index,
            start=self.n_train,
            stop=self.n_images,
        ):
            yield self.eval_view(x)

    def describe(self) -> dict[str, Any]:
        return {"store": str(self.store.root), "layer": self.layer_index, **super().describe()}


class StreamSource(Source):
    """Activations computed by the backbone on the fly, through a shuffle buffer.

    The order is that of the store loaders (``patchsae.data.shuffle``): each epoch visits the
    training images in the order ``epoch_order(n_train, seed, epoch)``, cut into windows of
    ``shuffle_buffer_images`` images. A window's activations are computed together; in tokens mode
    the window's images are taken in ascending order and their tokens permuted by
    ``shuffle_window_tokens(..., seed, epoch, window)``, exactly as ``token_batches`` does. So with
    no unreadable images the stream equals that of a store extracted unshuffled from the same
    images. Batches are consecutive slices of this stream of windows, so the data position
    (epoch, window, offset in the window) identifies a batch, and resuming recomputes only the
    current window. Under DDP every rank computes each window in full and keeps its slice.
    """

    def __init__(self, cfg: TrainConfig, device: torch.device) -> None:
        if cfg.layer is None:
            raise SourceError("streaming needs layer= (a block index, e.g. -2)")
        self.backbone = load_backbone(cfg.model, device=device)
        self.images = open_images(cfg.data)
        self.layer_index = self.backbone.resolve_layer(cfg.layer)
        self.trained_on = {"backbone": self.backbone.identity(), "layer": self.layer_index}
        self.layout = self.backbone.token_layout
        self.d_model = self.backbone.d_model
        self.n_images = len(self.images)
        self.bad: list[BadRecord] = []
        self._bad_ids: set[int] = set()
        self._order: tuple[int, np.ndarray] | None = None
        super().__init__(cfg)

    def start_position(self) -> dict[str, Any]:
        return {"epoch": 0, "window": 0, "offset": 0}

    @torch.no_grad()
    def _encode(self, ids: np.ndarray) -> torch.Tensor:
        """(n_good, T_sel, D) float32 CPU activations of images ``ids``, bad images dropped.

        Each bad image is recorded once in ``bad``, however often its window is recomputed.
        """
        parts = []
        batches = image_batches(
            self.images, ids, self.backbone.preprocessor, self.cfg.extract_batch_size
        )
        for batch in tqdm(batches, desc="activations", unit="batch", leave=False):
            for record in batch.bad:
                if record.example_id not in self._bad_ids:
                    self._bad_ids.add(record.example_id)
                    self.bad.append(record)
            if len(batch.example_ids):
                pixels = batch.pixel_values.to(self.backbone.device, self.backbone.dtype)
                acts = self.backbone.encode(pixels, self.layer_index)
                parts.append(self.select(acts).float().cpu())
        if not parts:
            return torch.zeros(0, self.tokens_per_image, self.d_model)
        return torch.cat(parts)

    def _window(self, epoch: int, window: int) -> torch.Tensor | None:
        """Items of one window: (n, T_sel, D) images or (n * T_sel, D) shuffled tokens.

        None when ``window`` is past the end of the epoch.
        """
        size = self.cfg.shuffle_buffer_images
        if window * size >= self.n_train:
            return None
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(self.n_train, self.cfg.seed, epoch))
        order = self._order[1]
        if self.cfg.batch_mode == "images":
            return self._encode(order[window * size : (window + 1) * size])
        tokens_nd = self._encode(window_positions(order, window, size)).reshape(-1, self.d_model)
        return torch.from_numpy(
            shuffle_window_tokens(tokens_nd.numpy(), self.cfg.seed, epoch, window)
        )

    def batches(self, position: dict[str, Any]) -> Iterator[tuple[torch.Tensor, dict[str, Any]]]:
        """Global batches from ``position`` on, each with the position after it."""
        cfg = self.cfg
        size = cfg.batch_images if cfg.batch_mode == "images" else cfg.batch_tokens
        cut = rebatch(self._windows(position), size, torch.cat, skip=position["offset"])
        for batch, (epoch, window), offset in cut:
            yield batch, {"epoch": epoch, "window": window, "offset": offset}

    def _windows(self, position: dict[str, Any]) -> Iterator[tuple[tuple[int, int], torch.Tensor]]:
        """The stream of windows from ``position`` on; an epoch ends with an empty window keyed
        one past its last, where the position of a batch that used up the epoch points."""
        epoch, window = position["epoch"], position["window"]
        epoch_has_items = window > 0
        while True:
            items = self._window(epoch, window)
            if items is None:
                if not epoch_has_items:
                    raise SourceError("every training image is unreadable; see bad_images.json")
                yield (epoch, window), torch.zeros(0)
                epoch, window, epoch_has_items = epoch + 1, 0, False
                continue
            epoch_has_items = epoch_has_items or len(items) > 0
            yield (epoch, window), items
            window += 1

    def eval_batches(self) -> Iterator[torch.Tensor]:
        """The held-out images (the last ``eval_images`` of the source) as ``eval_view`` batches."""
        ids = np.arange(self.n_train, self.n_images, dtype=np.int64)
        step = self.cfg.eval_batch_images
        for k in range(0, len(ids), step):
            acts = self._encode(ids[k : k + step])
            yield acts.reshape(-1, acts.shape[-1]) if self.eval_layout is None else acts

    def restore(self, described: dict[str, Any]) -> None:
        """Bad images met before the checkpoint stay in the report after a resume."""
        for record in described.get("bad_images", []):
            if record["example_id"] not in self._bad_ids:
                self._bad_ids.add(record["example_id"])
                self.bad.append(BadRecord(**record))

    def describe(self) -> dict[str, Any]:
        return {
            "bad_images": [dataclasses.asdict(r) for r in self.bad],
            "model": self.backbone.identity(),
            "data": dataclasses.asdict(self.cfg.data),
            "data_fingerprint": self.images.fingerprint,
            "layer": self.layer_index,
            **super().describe(),
        }


def open_source(cfg: TrainConfig, device: torch.device) -> BatchSource:
    """The batch source ``cfg`` describes (a store, or a backbone streaming images)."""
    return StoreSource(cfg) if cfg.store is not None else StreamSource(cfg, device)
