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

Aggregate = Literal["mean", "max"]
EMPTY = -1


class StatsError(ValueError):
    """Statistics cannot be computed: bad options, or inputs that do not fit together."""


def token_set(layout: TokenLayout, include_cls: bool) -> list[int]:
    """Token positions that make an image's activation: CLS (when kept) and the patches."""
    cls = [layout.cls_index] if include_cls and layout.cls_index is not None else []
    return cls + list(layout.patch_indices)


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
        self.tokens = torch.tensor(token_set(layout, include_cls), dtype=torch.long)
        self.patches = torch.tensor(list(layout.patch_indices), dtype=torch.long)
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
            "top_values": torch.full((k, m), -math.inf, dtype=f64),
            "top_index": torch.full((k, m), EMPTY, dtype=i64),
            "top_example_ids": torch.full((k, m), EMPTY, dtype=i64),
            "top_labels": torch.full((k, m), EMPTY, dtype=i64),
        }

    def image_activations(self, codes_btm: Tensor) -> Tensor:
        """(B, d_sae) float64 image-level activations of codes (B, T, d_sae)."""
        sel = codes_btm.index_select(1, self.tokens.to(codes_btm.device))
        agg = sel.mean(1) if self.aggregate == "mean" else sel.amax(1)
        return agg.double()

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
        img_bm = self.image_activations(codes_btm).cpu()
        fires = img_bm > 0
        s["n_images"] += len(img_bm)
        s["image_fire_count"] += fires.sum(0)
        s["act_sum"] += img_bm.sum(0)
        s["fired_act_sum"] += img_bm.masked_fill(~fires, 0.0).sum(0)
        if self.layout.cls_index is not None:
            s["cls_fire_count"] += (codes_btm[:, self.layout.cls_index] > 0).sum(0).cpu()
        patches = codes_btm.index_select(1, self.patches.to(codes_btm.device))
        s["patch_fire_count"] += (patches > 0).sum((0, 1)).cpu()
        sel = codes_btm.index_select(1, self.tokens.to(codes_btm.device))
        above_bm = (sel > self.threshold).sum(1).cpu()
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
        s, b, m = self.state, len(img_bm), self.d_sae
        values = torch.cat([s["top_values"], img_bm.masked_fill(~fires, -math.inf)])
        order = torch.sort(values, dim=0, descending=True, stable=True).indices[: self.top_k]
        s["top_values"] = values.gather(0, order)
        empty = s["top_values"] == -math.inf
        for key, new in (
            ("top_index", index),
            ("top_example_ids", example_ids.to(torch.int64).cpu()),
            ("top_labels", labels),
        ):
            merged = torch.cat([s[key], new[:, None].expand(b, m)]).gather(0, order)
            s[key] = merged.masked_fill(empty, EMPTY)

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
        top_values = np.where(s["top_index"] >= 0, s["top_values"], 0.0).T.astype(np.float32)
        top_labels = np.ascontiguousarray(s["top_labels"].T)
        n_patch_tokens = n * len(self.patches)
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
            "top_index": np.ascontiguousarray(s["top_index"].T),
            "top_example_ids": np.ascontiguousarray(s["top_example_ids"].T),
            "top_labels": top_labels,
            "label_entropy": label_entropy(top_values, top_labels),
            "dataset_counts": s["dataset_counts"],
            "class_counts": s["class_counts"],
            "class_mean_act": (s["class_act_sum"] / np.maximum(class_images, 1)[:, None]).astype(
                np.float32
            ),
            "class_images": class_images,
        }
