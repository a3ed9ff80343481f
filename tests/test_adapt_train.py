"""Few-shot prompt learning: schedule, splits, augmentation, training, kill -9 and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from assets import CLIP_TOKENIZER, FASHION_MNIST, SHARED
from patchsae.adapt import PromptConfig, load_official
from patchsae.adapt.augment import augment, crop_box
from patchsae.adapt.config import AdaptError
from patchsae.adapt.split import base_novel, few_shot, harmonic_mean
from patchsae.adapt.train import (
    AdaptConfig,
    accuracy,
    adapt_run,
    lr_at_epoch,
    make_plan,
    steps_per_epoch,
)
from patchsae.backbones import load_backbone
from patchsae.cli import main
from patchsae.config import ConfigError, load_config
from patchsae.data.images import DataConfig, open_images
from patchsae.lock import FolderLock
from run_files import dies_after
from tiny_models import tiny_clip

GOLDEN = SHARED / "golden" / "maple"


def test_schedule_matches_the_original_trainer():
    """Dassl's ConstantWarmupScheduler + CosineAnnealingLR as recorded by the golden run: the
    learning rate after epoch e (0-based) is the one epoch e + 1 trains with."""
    if not (GOLDEN / "verification.json").is_file():
        pytest.skip("MaPLe golden folder is absent")
    trace = json.loads((GOLDEN / "verification.json").read_text())["training_lr_after_each_epoch"]
    cfg = AdaptConfig(data=DataConfig(source="x"), out="x")
    assert lr_at_epoch(cfg, 0) == 1e-5
    for epoch, lr in enumerate(trace):
        assert lr_at_epoch(cfg, epoch + 1) == pytest.approx(lr, rel=1e-12)


def test_base_novel_split_sizes():
    assert base_novel(10) == ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9])
    assert base_novel(7) == ([0, 1, 2, 3], [4, 5, 6])
    assert base_novel(2) == ([0], [1])
    with pytest.raises(AdaptError, match="at least 2 classes"):
        base_novel(1)
    assert harmonic_mean(0.8, 0.4) == pytest.approx(2 * 0.32 / 1.2)
    assert harmonic_mean(0.0, 0.0) == 0.0


def test_few_shot_draws_by_seed_and_skips_bad_images():
    labels = np.repeat(np.arange(3), 10)
    shots = few_shot(labels, [0, 2], 4, seed=1)
    assert set(shots) == {0, 2} and all(len(v) == 4 for v in shots.values())
    assert all(labels[i] == c for c, ids in shots.items() for i in ids)
    assert shots == few_shot(labels, [0, 2], 4, seed=1)
    assert shots != few_shot(labels, [0, 2], 4, seed=2)
    bad = set(shots[0][:2])
    skipped = few_shot(labels, [0], 4, seed=1, usable=lambda i: i not in bad)
    assert len(skipped[0]) == 4 and not bad & set(skipped[0])
    assert set(shots[0][2:]) <= set(skipped[0])
    assert few_shot(labels, [1], 50, seed=0)[1] == list(range(10, 20))
    with pytest.raises(AdaptError, match="no usable"):
        few_shot(labels, [1], 2, seed=0, usable=lambda i: False)


def test_crop_box_stays_inside_and_covers_the_scale():
    rng = np.random.default_rng(0)
    for width, height in ((28, 28), (640, 120), (3, 500), (1, 1)):
        for _ in range(200):
            top, left, h, w = crop_box(width, height, (0.08, 1.0), rng)
            assert top >= 0 and top + h <= height and left >= 0 and left + w <= width
            assert h >= 1 and w >= 1
    image = Image.fromarray(np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)).convert("RGB")
    a = augment(image, (32, 32), (0.5, 1.0), np.random.default_rng(3))
    assert a.size == (32, 32)
    assert a.tobytes() == augment(image, (32, 32), (0.5, 1.0), np.random.default_rng(3)).tobytes()


def test_config_validation():
    data = {"data": {"source": "x"}, "out": "o"}
    with pytest.raises(ConfigError, match="shots must be >= 1"):
        load_config(AdaptConfig, None, ["data.source=x", "out=o", "shots=0"])
    with pytest.raises(ConfigError, match="crop_scale"):
        AdaptConfig(**{**data, "data": DataConfig("x"), "crop_scale": (0.5, 0.2)})
    with pytest.raises(ConfigError, match="coop learns the text context only"):
        load_config(
            AdaptConfig, None, ["data.source=x", "out=o", "prompt.method=coop", "prompt.depth=3"]
        )


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    if not (CLIP_TOKENIZER.is_dir() and FASHION_MNIST.is_dir()):
        pytest.skip("needs the CLIP tokenizer and fashion-mnist-small in ../shared")
    folder = tmp_path_factory.mktemp("tiny-clip")
    model, processor = tiny_clip(
        width=32, n_layers=3, heads=2, image_size=32, patch_size=8, projection_dim=16
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def run_args(folder: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"model={folder}",
        f"tokenizer={CLIP_TOKENIZER}",
        f"data.source={FASHION_MNIST}",
        f"out={out}",
        "prompt.depth=3",
        "shots=2",
        "epochs=2",
        "eval_split=null",
        *extra,
    ]


def colour_folder(root: Path) -> Path:
    """An ImageFolder of noisy solid-colour 32 px images: 4 classes x 6 images per split."""
    colours = {
        "red": (220, 30, 30),
        "green": (30, 200, 40),
        "blue": (30, 40, 220),
        "yellow": (230, 220, 30),
    }
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name, rgb in colours.items():
            (root / split / name).mkdir(parents=True)
            for i in range(6):
                pixels = np.clip(np.array(rgb) + rng.normal(0, 40, (32, 32, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(root / split / name / f"{i}.png")
    return root


@pytest.mark.shared
def test_training_raises_training_accuracy(tmp_path):
    """Full-batch MaPLe on 4 colour classes. The tiny CLIP's token embeddings are scaled up x10:
    with the random init's 0.02 every class name gives nearly the same text feature (cosine
    0.99), which no prompt can separate."""
    if not CLIP_TOKENIZER.is_dir():
        pytest.skip("needs the CLIP tokenizer in ../shared")
    model, processor = tiny_clip(
        width=32, n_layers=3, heads=2, image_size=32, patch_size=8, projection_dim=16
    )
    with torch.no_grad():
        model.text_model.embeddings.token_embedding.weight.mul_(10)
    model.save_pretrained(tmp_path / "clip")
    processor.save_pretrained(tmp_path / "clip")
    cfg = load_config(
        AdaptConfig,
        None,
        [
            f"model={tmp_path / 'clip'}",
            f"tokenizer={CLIP_TOKENIZER}",
            f"data.source={colour_folder(tmp_path / 'colours')}",
            f"out={tmp_path / 'run'}",
            "prompt.depth=3",
            "protocol=all",
            "shots=6",
            "batch_size=24",
            "epochs=30",
            "lr=0.5",
            "warmup_epochs=0",
            "augment=false",
        ],
    )
    source = open_images(cfg.data)
    plan = make_plan(cfg, source)
    assert plan.groups == {"all": [0, 1, 2, 3]} and len(plan.train_ids) == 24
    base = load_backbone(tmp_path / "clip", tokenizer=CLIP_TOKENIZER)
    out = adapt_run(cfg, progress=False)
    adapted = load_backbone(out)
    before_after = accuracy(
        {"before": base, "after": adapted},
        {"before": adapted.templates, "after": adapted.templates},
        source,
        plan.train_classes,
        plan.class_names,
        batch_size=32,
        progress=False,
    )
    assert before_after["n_images"] == 24
    assert before_after["after"] >= before_after["before"] + 0.25, before_after
    results = json.loads((out / "results.json").read_text())
    assert results["epoch_mean_loss"][-1] < results["epoch_mean_loss"][0] - 0.2
    assert results["results"]["all"]["n_images"] == 24
    assert not (out / "checkpoint.safetensors").exists()


@pytest.mark.shared
def test_base_to_novel_plan_and_results(tiny_folder, tmp_path):
    cfg = load_config(
        AdaptConfig, None, run_args(tiny_folder, tmp_path / "run", "epochs=1", "eval_split=test")
    )
    source = open_images(cfg.data)
    plan = make_plan(cfg, source)
    assert plan.groups == {"base": [0, 1, 2, 3, 4], "novel": [5, 6, 7, 8, 9]}
    assert len(plan.train_ids) == 10 and set(source.labels[plan.train_ids]) == {0, 1, 2, 3, 4}
    assert steps_per_epoch(10, 4) == 2 and steps_per_epoch(3, 4) == 1
    scored = json.loads((adapt_run(cfg, progress=False) / "results.json").read_text())["results"]
    assert scored["base"]["n_images"] == scored["novel"]["n_images"] == 150
    for model in ("adapted", "zero_shot"):
        hm = scored["harmonic_mean"][model]
        assert hm == pytest.approx(harmonic_mean(scored["base"][model], scored["novel"][model]))


def cli(args: list[str], killed: bool = False) -> subprocess.Popen:
    """``patchsae adapt maple ARGS`` in a subprocess; ``killed`` dies after its first checkpoint."""
    program = ["-m", "patchsae"]
    if killed:
        program = ["-c", dies_after("patchsae.adapt.train._save_checkpoint")]
    return subprocess.Popen(
        [sys.executable, *program, "adapt", "maple", *args],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


@pytest.mark.shared
def test_kill_9_then_resume_equals_an_uninterrupted_run(tiny_folder, tmp_path):
    args = ["checkpoint_every=1", "epochs=3"]
    whole = cli(run_args(tiny_folder, tmp_path / "whole", *args))
    assert whole.wait() == 0, whole.stderr.read().decode()[-2000:]
    killed = tmp_path / "killed"
    proc = cli(run_args(tiny_folder, killed, *args), killed=True)
    assert proc.wait() == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert (killed / "checkpoint.safetensors").is_file()
    assert not (killed / "adapter.json").exists()
    again = cli(run_args(tiny_folder, killed, *args))
    assert again.wait() == 2 and b"--resume" in again.stderr.read()
    resumed = cli([*run_args(tiny_folder, killed, *args), "--resume"])
    assert resumed.wait() == 0, resumed.stderr.read().decode()[-2000:]
    a, b = (
        load_file(tmp_path / "whole" / "adapter.safetensors"),
        load_file(killed / "adapter.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    loss = [json.loads((f / "results.json").read_text()) for f in (tmp_path / "whole", killed)]
    assert loss[0] == loss[1]


@pytest.mark.shared
def test_resume_refuses_another_config_and_finished_runs_do_nothing(tiny_folder, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = load_config(AdaptConfig, None, run_args(tiny_folder, out, "epochs=1"))
    adapt_run(cfg, progress=False)
    before = (out / "adapter.safetensors").read_bytes()
    adapt_run(cfg, resume=True, progress=False)
    assert "already complete" in capsys.readouterr().out
    assert (out / "adapter.safetensors").read_bytes() == before
    other = load_config(AdaptConfig, None, run_args(tiny_folder, out, "epochs=1", "lr=0.1"))
    with pytest.raises(AdaptError, match=r"differs from the saved one in \['config.lr'\]"):
        adapt_run(other, resume=True, progress=False)
    with (
        FolderLock(out, RuntimeError("held")),
        pytest.raises(AdaptError, match="in use by another adapt run"),
    ):
        adapt_run(cfg, resume=True, progress=False)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file").write_text("x")
    with pytest.raises(AdaptError, match="not an adapt run"):
        adapt_run(
            load_config(AdaptConfig, None, run_args(tiny_folder, tmp_path / "junk")), progress=False
        )


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    assert (
        main(["adapt", "coop", f"data.source={tmp_path / 'none'}", f"out={tmp_path}", "shots=0"])
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "shots must be >= 1" in err[0]
    assert (
        main(["adapt", "maple", f"data.source={tmp_path / 'none'}", f"out={tmp_path / 'o'}"]) == 2
    )
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.shared
def test_import_official_checkpoint_cli(tmp_path):
    if not GOLDEN.is_dir():
        pytest.skip("MaPLe golden folder is absent")
    ckpt = GOLDEN / "MultiModalPromptLearner" / "model.pth.tar-5"
    out = tmp_path / "imported"
    assert (
        main(["adapt", "import", str(ckpt), "--model", str(GOLDEN / "clip"), "--out", str(out)])
        == 0
    )
    imported = load_backbone(out)
    direct = load_official(ckpt, load_backbone(GOLDEN / "clip"), PromptConfig())
    assert imported.identity()["adapter"] == direct.identity()["adapter"]
    assert (
        main(
            [
                "adapt",
                "import",
                str(ckpt),
                "depth=3",
                "--model",
                str(GOLDEN / "clip"),
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
