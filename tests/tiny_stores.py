"""Activation stores written directly from arrays, for tests that need no backbone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from patchsae.backbones import TokenLayout
from patchsae.data.store import StoreMetadata, StoreWriter


def make_store(
    root: Path,
    acts_ntd: np.ndarray,
    backbone: dict[str, Any] | None = None,
    labels: np.ndarray | None = None,
    class_names: list[str] | None = None,
    grid: tuple[int, int] | None = None,
) -> Path:
    """A one-shard fp32 store of ``acts_ntd`` (N, T, D) with CLS at 0 and T - 1 patches.

    ``backbone`` is the metadata's backbone entry (default: an unnamed-family model "tiny");
    ``labels`` (N,) default to -1 and ``class_names`` to none; ``grid`` is the patch grid
    (default (1, T - 1)).
    """
    n, t, d = acts_ntd.shape
    layout = TokenLayout(n_tokens=t, cls_index=0, patch_start=1, grid=grid or (1, t - 1))
    plan = StoreMetadata(
        layers=[0],
        dtype="fp32",
        d_model=d,
        n_tokens=t,
        token_layout=layout.to_dict(),
        backbone=backbone or {"name": "tiny", "n_layers": 2},
        class_names=list(class_names or []),
    )
    with StoreWriter(root, plan) as writer:
        shard = writer.shard(0, n)
        shard.append({0: torch.from_numpy(np.ascontiguousarray(acts_ntd, dtype=np.float32))})
        label_list = [-1] * n if labels is None else [int(v) for v in labels]
        entry = shard.commit({"example_ids": list(range(n)), "labels": label_list})
        writer.finalize([entry], [])
    return root
