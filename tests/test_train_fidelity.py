"""CLIP downstream fidelity logged by the trainer at every evaluation step."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import patchsae.metrics
import patchsae.train
from assets import CLIP_TOKENIZER
from patchsae.backbones import load_backbone
from patchsae.config import ConfigError, from_dict
from patchsae.data.images import DataConfig, image_batches, open_images, shuffled_order
from patchsae.extract import ExtractConfig, extract
from patchsae.metrics.fidelity import downstream_fidelity
from patchsae.sae.config import SAEConfig
from patchsae.sae.io import load
from patchsae.sae.registry import make_sae
from patchsae.train import TrainConfig, train
from patchsae.train.config import FidelityConfig
from tiny_models import tiny_clip
from tiny_stores import make_store

CLASSES = ("bird", "cat", "dog")
TEMPLATES = ("a photo of a {name}.", "a blurry {name}.")
KEYS = ("ce_original", "ce_spliced", "ce_zero", "fraction_recovered")
KEYS += ("acc_original", "acc_spliced", "acc_zero", "n_images")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-block CLIP of width 64 on 32x32 images (16 patches + CLS), saved without tokenizer."""
    if not CLIP_TOKENIZER.is_dir():
        pytest.skip(f"CLIP tokenizer not found at {CLIP_TOKENIZER}")
    model, processor = tiny_clip(
        width=64, n_layers=2, heads=4, image_size=32, patch_size=8, projection_dim=32
    )
    folder = tmp_path_factory.mktemp("tinyclip")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ImageFolder with three named classes of four random 32x32 RGB images each."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir()
        for i in range(4):
            pixels = rng.integers(0, 256, (32, 32, 3)) // (c + 1)
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def store(clip_dir: Path, images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("store") / "s"
    cfg = ExtractConfig(
        model=str(clip_dir),
        data=DataConfig(source=str(images)),
        layers=(0,),
        out=str(out),
        batch_size=4,
        shard_images=4,
        num_workers=0,
        dtype="fp32",
        seed=1,
    )
    return extract(cfg)


def fidelity_dict(images: Path) -> dict:
    return {
        "data": {"source": str(images)},
        "limit": 9,
        "seed": 3,
        "batch_size": 4,
        "templates": list(TEMPLATES),
        "tokenizer": str(CLIP_TOKENIZER),
    }


def train_config(store: Path, out: Path, images: Path, **overrides) -> TrainConfig:
    data = {
        "store": str(store),
        "out": str(out),
        "sae": {"d_in": 64, "d_sae": 128},
        "batch_images": 4,
        "total_images": 16,
        "warmup_steps": 2,
        "eval_images": 4,
        "eval_every": 2,
        "eval_batch_images": 4,
        "log_every": 1,
        "b_dec_init_maxiter": 10,
        "fidelity": fidelity_dict(images),
    }
    return from_dict(TrainConfig, {**data, **overrides})


def test_fidelity_logged_at_eval_steps_matches_direct_call(
    clip_dir: Path, images: Path, store: Path, tmp_path: Path
) -> None:
    out = train(train_config(store, tmp_path / "run", images))
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in lines if any(k.startswith("eval/") for k in r)]
    assert [r["step"] for r in evals] == [0, 2, 4]
    for r in evals:
        assert "eval/fvu" in r
        assert all(f"eval/fidelity/{k}" in r for k in KEYS)
        assert r["eval/fidelity/n_images"] == 9
        assert r["eval/fidelity/ce_original"] == evals[0]["eval/fidelity/ce_original"]
    train_lines = [r for r in lines if "loss" in r]
    assert not any(k.startswith("eval/fidelity") for r in train_lines for k in r)
    assert evals[0]["eval/fidelity/ce_spliced"] != evals[-1]["eval/fidelity/ce_spliced"]

    backbone = load_backbone(clip_dir, tokenizer=CLIP_TOKENIZER)
    source = open_images(DataConfig(source=str(images)))
    order = shuffled_order(len(source), 3)[:9]
    batches = (
        (b.pixel_values, b.labels) for b in image_batches(source, order, backbone.preprocessor, 4)
    )
    direct = downstream_fidelity(
        backbone, load(out), 0, batches, list(CLASSES), templates=TEMPLATES, progress=False
    )
    final = evals[-1]
    for k in KEYS:
        assert final[f"eval/fidelity/{k}"] == pytest.approx(direct[k], rel=1e-6, abs=1e-9)


def test_fidelity_without_eval_images_still_evaluates(
    images: Path, store: Path, tmp_path: Path
) -> None:
    cfg = train_config(store, tmp_path / "run", images, eval_images=0, total_images=8)
    lines = [json.loads(ln) for ln in (train(cfg) / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in lines if "eval/fidelity/ce_spliced" in r]
    assert [r["step"] for r in evals] == [0, 2]
    assert not any("eval/fvu" in r for r in lines)


def test_fidelity_needs_clip_backbone(images: Path, tmp_path: Path) -> None:
    dino = {"name": "tiny-dino", "family": "dinov2", "n_layers": 2}
    root = make_store(
        tmp_path / "dino-store", np.random.default_rng(0).normal(size=(8, 5, 8)), dino
    )
    cfg = train_config(root, tmp_path / "run", images, sae={"d_in": 8, "d_sae": 16})
    with pytest.raises(ConfigError, match="CLIP backbone.*dinov2"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_fidelity_config_validation(images: Path) -> None:
    assert FidelityConfig is patchsae.train.FidelityConfig is patchsae.metrics.FidelityConfig
    spec = from_dict(FidelityConfig, fidelity_dict(images))
    assert spec.data == DataConfig(source=str(images)) and spec.templates == TEMPLATES
    with pytest.raises(ConfigError, match="placeholder"):
        from_dict(FidelityConfig, {**fidelity_dict(images), "templates": ["a photo"]})
    with pytest.raises(ConfigError, match="limit"):
        from_dict(FidelityConfig, {**fidelity_dict(images), "limit": 0})


def test_scorer_encodes_prompts_once_and_scores_only_the_splice_after_the_first_call(
    clip_dir: Path, images: Path, monkeypatch
) -> None:
    cfg = from_dict(FidelityConfig, fidelity_dict(images))
    scorer = patchsae.metrics.FidelityScorer(cfg, 0, model=str(clip_dir))
    backbone = scorer.backbone
    texts, forwards = [], []
    encode_text, forward_from = backbone.encode_text, backbone.forward_from

    def counting_text(prompts):
        texts.append(list(prompts))
        return encode_text(prompts)

    def counting_forward(acts, layer):
        forwards.append(acts.abs().sum().item() == 0)
        return forward_from(acts, layer)

    monkeypatch.setattr(backbone, "encode_text", counting_text)
    monkeypatch.setattr(backbone, "forward_from", counting_forward)
    saes = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        saes.append(make_sae(SAEConfig(d_in=64, d_sae=128)))
    first = scorer(saes[0])
    assert len(texts) == 1 and len(forwards) == 3 * 3  # 9 images in batches of 4: 3 batches
    second = scorer(saes[1])
    assert len(texts) == 1, "the prompts were encoded again"
    assert len(forwards) == 9 + 3 and not any(forwards[9:]), "only the spliced pass should rerun"
    assert second["n_bad_images"] == first["n_bad_images"] == 0
    source = open_images(DataConfig(source=str(images)))
    order = shuffled_order(len(source), 3)[:9]
    for sae, got in zip(saes, (first, second), strict=True):
        batches = (
            (b.pixel_values, b.labels)
            for b in image_batches(source, order, backbone.preprocessor, 4)
        )
        direct = downstream_fidelity(
            backbone, sae, 0, batches, list(CLASSES), templates=TEMPLATES, progress=False
        )
        assert {k: v for k, v in got.items() if k != "n_bad_images"} == direct
    assert second["ce_spliced"] != first["ce_spliced"]


def test_downstream_fidelity_scores_the_variants_asked(clip_dir: Path, images: Path) -> None:
    from patchsae.metrics.fidelity import FidelityError, zero_shot_classifier

    backbone = load_backbone(clip_dir, tokenizer=CLIP_TOKENIZER)
    source = open_images(DataConfig(source=str(images)))
    torch.manual_seed(0)
    sae = make_sae(SAEConfig(d_in=64, d_sae=128))
    text = zero_shot_classifier(backbone, list(CLASSES), TEMPLATES)

    def run(**kwargs) -> dict:
        batches = (
            (b.pixel_values, b.labels)
            for b in image_batches(source, np.arange(8), backbone.preprocessor, 4)
        )
        return downstream_fidelity(
            backbone, sae, 0, batches, list(CLASSES), templates=TEMPLATES, progress=False, **kwargs
        )

    full = run()
    only = run(text_embeddings=text, variants=("spliced",))
    assert only == {
        "ce_spliced": full["ce_spliced"],
        "acc_spliced": full["acc_spliced"],
        "n_images": 8,
    }
    with pytest.raises(FidelityError, match="variants"):
        run(variants=("spliced", "nope"))
