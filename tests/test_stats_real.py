"""Real data: an atlas of the Fashion-MNIST test split from DINOv2-S and an SAE trained on the
train split; printed summary feeds the docs (entropy-0 latents, their classes, Fig. 3)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from assets import DINOV2, FASHION_MNIST
from patchsae.config import from_dict
from patchsae.data.images import DataConfig
from patchsae.extract import ExtractConfig, extract
from patchsae.stats import Atlas, StatsConfig, compute_stats
from patchsae.train import TrainConfig, train

pytestmark = [
    pytest.mark.shared,
    pytest.mark.slow,
    pytest.mark.skipif(
        not (DINOV2.is_dir() and (FASHION_MNIST / "test").is_dir()), reason="needs ../shared assets"
    ),
]


def store_of(split: str, out: Path, limit: int | None) -> Path:
    return extract(
        ExtractConfig(
            model=str(DINOV2),
            data=DataConfig(source=str(FASHION_MNIST), split=split),
            layers=(-2,),
            out=str(out),
            batch_size=20,
            dtype="fp32",
            seed=0 if limit else None,
            limit=limit,
            shard_images=100 if limit is None else limit,
            num_workers=0,
        )
    )


def test_atlas_of_fashion_mnist_test_split(tmp_path: Path) -> None:
    torch.set_num_threads(2)  # real data: use both cores; conftest restores 1 afterwards
    train_store = store_of("train", tmp_path / "train", limit=100)
    cfg = from_dict(
        TrainConfig,
        {
            "store": str(train_store),
            "out": str(tmp_path / "run"),
            "sae": {"d_in": 384, "d_sae": 4 * 384, "l1_coefficient": 8e-5},
            "batch_mode": "tokens",
            "batch_tokens": 512,
            "b_dec_init": "geometric_median_tokens",
            "total_tokens": 512 * 200,
            "total_images": None,
            "warmup_steps": 20,
            "checkpoint_every": 200,
            "eval_every": 200,
            "log_every": 100,
        },
    )
    sae_dir = train(cfg)
    test_store = store_of("test", tmp_path / "test", limit=None)
    compute_stats(StatsConfig(sae=str(sae_dir), store=str(test_store), out=str(tmp_path / "atlas")))
    ds = Atlas.open(tmp_path / "atlas").dataset("fashion-mnist-small-test")
    assert ds.meta["n_images"] == 300 and ds.class_names[0] == "T-shirt/top"
    freq, entropy = np.asarray(ds.array("image_freq")), np.asarray(ds.array("label_entropy"))
    top_labels, n_refs = ds.array("top_labels"), (np.asarray(ds.array("top_index")) >= 0).sum(1)
    np.testing.assert_array_equal(ds.array("class_images"), np.full(10, 30))
    pure = [j for j in ds.low_entropy(0.0, min_refs=10)]
    by_class = np.bincount([int(top_labels[j, 0]) for j in pure], minlength=10)
    counts = np.asarray(ds.array("class_counts"))
    agree = np.mean([counts[:, j].argmax() == top_labels[j, 0] for j in pure]) if pure else 0.0
    print(
        f"\natlas of fashion-mnist-small test (300 images) with a d_sae=1536 SAE: "
        f"{(freq == 0).sum()} latents never fire, {(freq >= 0.5).sum()} fire on >= half the "
        f"images, {len(pure)} have label entropy 0 over 10 references; by class: "
        + ", ".join(f"{ds.class_names[c]} {n}" for c, n in enumerate(by_class) if n)
        + f"; top class by counts agrees with the references for {agree:.0%} of them; "
        f"median log10 freq {np.median(np.log10(freq[freq > 0])):.2f}, entropy defined for "
        f"{(entropy >= 0).sum()}"
    )
    assert len(pure) > 0 and agree > 0.5
    filled = np.asarray(ds.array("top_thumb")) >= 0
    assert (filled == (np.asarray(ds.array("top_index")) >= 0)).all()
    assert ds.array("thumbs").shape[1:] == (96, 96, 3)
    j = pure[0]
    assert ds.thumbnail(j, 0, mask="heat").shape == (96, 96, 3)
    assert n_refs[j] == 10
