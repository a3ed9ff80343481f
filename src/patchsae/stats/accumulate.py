"""Per-latent statistics of a stream of images, updated one batch at a time.

:class:`LatentAccumulator` keeps only (d_sae,)-, (k, d_sae)- and (n_classes, d_sae)-sized state,
so memory does not grow with the number of images. Definitions (``docs/atlas.md``):

- token set of an image: CLS (unless ``include_cls=False``) and every patch; registers never;
- image-level activation of latent j: mean (or max, ``aggregate="max"``) of its code over the
  token set;
- a latent fires on an image when its image-level activation is > 0;
- top-k reference images: the k images of largest image-level activation among those where the
  latent fires, ties broken by the smaller pass index; empty slots hold index -1 and value 0;
- class counts: number of (image, token) pairs of the token set where the code is > threshold.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from patchsae.backbones import TokenLayout
from patchsae.sae.kernels import Scratch

Aggregate = Literal["mean", "max"]
EMPTY = -1
BLOCK_ELEMENTS = 2**17  # codes per CPU thread in a block: with their 0/1 scratch, 1.5 MiB fp32
DEVICE_BLOCK_ELEMENTS = 2**24


class StatsError(ValueError):
    """Statistics cannot be computed: bad options, or inputs that do not fit together."""


def token_set(layout: TokenLayout, include_cls: bool) -> list[int]:
    """Token positions that make an image's activation: CLS (when kept) and the patches."""
    cls = [layout.cls_index] if include_cls and layout.cls_index is not None else []
    return cls + list(layout.patch_indices)


def _segments(tokens: list[int]) -> list[tuple[int, int]]:
    """Sorted token positions as [start, stop) runs: [0, 1, 2, 5, 6] -> [(0, 3), (5, 7)]."""
    runs: list[tuple[int, int]] = []
    for t in sorted(tokens):
        if runs and runs[-1][1] == t:
            runs[-1] = (runs[-1][0], t + 1)
        else:
            runs.append((t, t + 1))
    return runs


def label_entropy(values_mk: np.ndarray, labels_mk: np.ndarray) -> np.ndarray:
    """(m,) natural-log entropy of the labels of each row's slots, weighted by their values.

    values_mk, labels_mk: (m, k). Slots with label < 0 or value <= 0 do not count; a row with
    no counting slot gets -1.
    """
    m = values_mk.shape[0]
    out = np.full(m, -1.0)
    keep = (labels_mk >= 0) & (values_mk > 0)
    for j in np.flatnonzero(keep.any(axis=1)):
        weights = np.bincount(labels_mk[j][keep[j]], weights=values_mk[j][keep[j]].astype(float))
        p = weights[weights > 0] / weights.sum()
        out[j] = float(-(p * np.log(p)).sum()) + 0.0
    return out


class LatentAccumulator:
    """Streaming per-latent statistics over images given as SAE codes (B, T, d_sae).

    Feed batches in pass order with :meth:`update`; :meth:`state_dict` / :meth:`load_state_dict`
    save and restore everything (resume), :meth:`result` returns the final arrays.
    """

    def __init__(
        self,
        d_sae: int,
        layout: TokenLayout,
        *,
        n_classes: int,
        top_k: int = 10,
        threshold: float = 0.2,
        aggregate: Aggregate = "mean",
        include_cls: bool = True,
    ) -> None:
        if top_k < 1:
            raise StatsError(f"top_k must be >= 1, got {top_k}")
        if aggregate not in ("mean", "max"):
            raise StatsError(f"aggregate must be 'mean' or 'max', got {aggregate!r}")
        if n_classes < 0:
            raise StatsError(f"n_classes must be >= 0, got {n_classes}")
        self.d_sae, self.layout, self.n_classes = d_sae, layout, n_classes
        self.top_k, self.threshold, self.aggregate = top_k, threshold, aggregate
        self.n_set = len(token_set(layout, include_cls))
        self.segments = _segments(token_set(layout, include_cls))
        self.include_cls = include_cls and layout.cls_index is not None
        self._scratch = Scratch()  # the 0/1 masks' buffer: no fresh pages on every batch
        m, k = d_sae, top_k
        i64, f64 = torch.int64, torch.float64
        self.state: dict[str, Tensor] = {
            "n_images": torch.zeros((), dtype=i64),
            "image_fire_count": torch.zeros(m, dtype=i64),
            "act_sum": torch.zeros(m, dtype=f64),
            "fired_act_sum": torch.zeros(m, dtype=f64),
            "cls_fire_count": torch.zeros(m, dtype=i64),
            "patch_fire_count": torch.zeros(m, dtype=i64),
            "dataset_counts": torch.zeros(m, dtype=i64),
            "class_counts": torch.zeros(n_classes, m, dtype=i64),
            "class_act_sum": torch.zeros(n_classes, m, dtype=f64),
            "class_images": torch.zeros(n_classes, dtype=i64),
            "top_values": torch.full((m, k), -math.inf, dtype=f64),
            "top_index": torch.full((m, k), EMPTY, dtype=i64),
            "top_example_ids": torch.full((m, k), EMPTY, dtype=i64),
            "top_labels": torch.full((m, k), EMPTY, dtype=i64),
        }

    @staticmethod
    def _token_sum(view_btm: Tensor) -> Tensor:
        """(B, d_sae): sum over tokens of (B, t, d_sae), as one batched product with ones (far
        faster on CPU than a reduction over the middle axis)."""
        ones = torch.ones(
            view_btm.shape[0], 1, view_btm.shape[1], dtype=view_btm.dtype, device=view_btm.device
        )
        return torch.bmm(ones, view_btm).squeeze(1)

    def _blocks(self, n_images: int, device: torch.device) -> list[tuple[slice, slice]]:
        """(images, tokens) slices of the blocks that cover a batch's token set.

        A block holds about ``BLOCK_ELEMENTS`` codes per CPU thread, so that it and its scratch
        stay in the cores' caches (a long segment is cut into near-equal token runs of one
        image), or ``DEVICE_BLOCK_ELEMENTS`` on an accelerator (few large kernels)."""
        cpu = device.type == "cpu"
        per_block = BLOCK_ELEMENTS * torch.get_num_threads() if cpu else DEVICE_BLOCK_ELEMENTS
        rows = max(1, per_block // self.d_sae)
        blocks = []
        for start, stop in self.segments:
            length = stop - start
            if rows >= length:
                step = rows // length
                images = [slice(i, min(i + step, n_images)) for i in range(0, n_images, step)]
                blocks += [(i, slice(start, stop)) for i in images]
            else:
                parts = -(-length // rows)
                bounds = [start + length * p // parts for p in range(parts + 1)]
                runs = [slice(lo, hi) for lo, hi in zip(bounds, bounds[1:], strict=False)]
                blocks += [(slice(i, i + 1), run) for i in range(n_images) for run in runs]
        return blocks

    def _count(self, codes_btm: Tensor) -> tuple[Tensor, Tensor]:
        """Over the token set: the (image, token) pairs with code > 0 summed over the batch,
        (d_sae,) int64, and per image the tokens with code > threshold, (B, d_sae) int64.

        Block by block (:meth:`_blocks`), one broadcast comparison writes both 0/1 masks into
        a reused float32 scratch and one batched product with ones adds them to per-image
        float32 sums (exact: float sums of 0/1 are exact integers below 2**24 tokens). A block
        is read from memory once for both comparisons and its scratch never leaves the cache.
        """
        b, m, device = codes_btm.shape[0], self.d_sae, codes_btm.device
        blocks = self._blocks(b, device)
        sums = torch.zeros(b, 2, 1, m, device=device)  # per image: [code > 0, code > threshold]
        thresholds = torch.tensor([0.0, self.threshold], dtype=codes_btm.dtype, device=device)
        most_images = max(i.stop - i.start for i, _ in blocks)
        most_tokens = max(t.stop - t.start for _, t in blocks)
        ones = torch.ones(2 * most_images, 1, most_tokens, device=device)
        for images, tokens in blocks:
            block = codes_btm[images, tokens]
            n_img, n_tok = block.shape[:2]
            masks = self._scratch.get("masks", (n_img, 2, n_tok, m), sums)
            torch.gt(block[:, None], thresholds.view(1, 2, 1, 1), out=masks)
            sums[images].view(2 * n_img, 1, m).baddbmm_(
                ones[: 2 * n_img, :, :n_tok], masks.view(2 * n_img, n_tok, m)
            )
        counts = sums.squeeze(2).long()
        return counts[:, 0].sum(0), counts[:, 1]

    def reduce(self, codes_btm: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per image and latent, over the token set: image-level activation (B, d_sae) float64;
        then the counts of :meth:`_count`: positive (image, token) pairs (d_sae,) and tokens
        above the threshold (B, d_sae), int64."""
        img = None
        for start, stop in self.segments:
            view = codes_btm[:, start:stop]
            if self.aggregate == "mean":
                part = self._token_sum(view).double()
            else:
                part = view.amax(1).double()
            if img is None:
                img = part
            else:
                img = img + part if self.aggregate == "mean" else torch.maximum(img, part)
        assert img is not None
        if self.aggregate == "mean":
            img = img / self.n_set
        pos, above = self._count(codes_btm)
        return img.cpu(), pos.cpu(), above.cpu()

    def image_activations(self, codes_btm: Tensor) -> Tensor:
        """(B, d_sae) float64 image-level activations of codes (B, T, d_sae)."""
        return self.reduce(codes_btm)[0]

    @torch.no_grad()
    def update(self, codes_btm: Tensor, index: Tensor, example_ids: Tensor, labels: Tensor) -> None:
        """Add a batch: codes (B, T, d_sae); index, example_ids, labels (B,) int64.

        ``index`` is each image's position in the pass and must increase across calls (ties in
        the top-k go to the smaller index). Labels are -1 (unlabelled) or < n_classes.
        """
        s = self.state
        if codes_btm.ndim != 3 or codes_btm.shape[-1] != self.d_sae:
            raise StatsError(f"codes must be (B, T, {self.d_sae}), got {tuple(codes_btm.shape)}")
        labels = labels.to(torch.int64).cpu()
        if len(labels) and (int(labels.max()) >= self.n_classes or int(labels.min()) < EMPTY):
            raise StatsError(
                f"labels must lie in -1..{self.n_classes - 1} (the class names known), got "
                f"{int(labels.min())}..{int(labels.max())}: the labels and class names disagree"
            )
        img_bm, pos_m, above_bm = self.reduce(codes_btm)
        fires = img_bm > 0
        s["n_images"] += len(img_bm)
        s["image_fire_count"] += fires.sum(0)
        s["act_sum"] += img_bm.sum(0)
        s["fired_act_sum"] += img_bm.masked_fill(~fires, 0.0).sum(0)
        cls_pos = None
        if self.layout.cls_index is not None:
            cls_pos = (codes_btm[:, self.layout.cls_index] > 0).sum(0).cpu()
            s["cls_fire_count"] += cls_pos
        if self.include_cls:
            assert cls_pos is not None
            s["patch_fire_count"] += pos_m - cls_pos
        else:
            s["patch_fire_count"] += pos_m
        s["dataset_counts"] += above_bm.sum(0)
        labelled = labels >= 0
        if labelled.any():
            lab = labels[labelled]
            s["class_counts"].index_add_(0, lab, above_bm[labelled])
            s["class_act_sum"].index_add_(0, lab, img_bm[labelled])
            s["class_images"].index_add_(0, lab, torch.ones_like(lab))
        self._merge_top(img_bm, fires, index.to(torch.int64).cpu(), example_ids, labels)

    def _merge_top(
        self, img_bm: Tensor, fires: Tensor, index: Tensor, example_ids: Tensor, labels: Tensor
    ) -> None:
        """Merge the batch into the (m, k) top-k arrays; only latents with a candidate above
        their current k-th value are touched (a tie with it loses: its index is larger)."""
        s, b = self.state, len(img_bm)
        cand_bm = img_bm.masked_fill(~fires, -math.inf)
        cols = (cand_bm > s["top_values"][:, -1]).any(0).nonzero().squeeze(1)
        if len(cols) == 0:
            return
        values = torch.cat([s["top_values"][cols], cand_bm[:, cols].t()], dim=1)
        order = torch.sort(values, dim=1, descending=True, stable=True).indices[:, : self.top_k]
        top = values.gather(1, order)
        s["top_values"][cols] = top
        empty = top == -math.inf
        for key, new in (
            ("top_index", index),
            ("top_example_ids", example_ids.to(torch.int64).cpu()),
            ("top_labels", labels),
        ):
            merged = torch.cat([s[key][cols], new[None, :].expand(len(cols), b)], dim=1)
            s[key][cols] = merged.gather(1, order).masked_fill(empty, EMPTY)

    def state_dict(self) -> dict[str, Tensor]:
        return {key: value.clone() for key, value in self.state.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if set(state) != set(self.state) or any(
            state[key].shape != value.shape for key, value in self.state.items()
        ):
            raise StatsError("saved statistics do not match these options; delete the partial run")
        self.state = {key: value.clone() for key, value in state.items()}

    def result(self) -> dict[str, np.ndarray]:
        """Final arrays (latent-major), see ``docs/atlas.md``; never NaN."""
        s = {key: value.numpy() for key, value in self.state.items()}
        n = int(s["n_images"])
        fired = s["image_fire_count"]
        top_values = np.where(s["top_index"] >= 0, s["top_values"], 0.0).astype(np.float32)
        top_labels = s["top_labels"]
        n_patch_tokens = n * self.layout.n_patches
        cls_freq = s["cls_fire_count"] / max(n, 1)
        if self.layout.cls_index is None:
            cls_freq = np.full(self.d_sae, -1.0)
        class_images = s["class_images"]
        return {
            "image_freq": fired / max(n, 1),
            "cls_token_freq": cls_freq,
            "patch_token_freq": s["patch_fire_count"] / max(n_patch_tokens, 1),
            "mean_act_fired": np.divide(
                s["fired_act_sum"], fired, out=np.zeros(self.d_sae), where=fired > 0
            ),
            "mean_act": s["act_sum"] / max(n, 1),
            "image_fire_count": fired,
            "top_values": top_values,
            "top_index": s["top_index"],
            "top_example_ids": s["top_example_ids"],
            "top_labels": top_labels,
            "label_entropy": label_entropy(top_values, top_labels),
            "dataset_counts": s["dataset_counts"],
            "class_counts": s["class_counts"],
            "class_mean_act": (s["class_act_sum"] / np.maximum(class_images, 1)[:, None]).astype(
                np.float32
            ),
            "class_images": class_images,
        }
