"""``patchsae quickstart`` offline, end to end on a tiny model and image folder; resumable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from patchsae.cli import main
from patchsae.sae import load
from patchsae.stats import Atlas
from tiny_atlas import image_folder
from tiny_models import tiny_clip

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("quickstart")
    model, processor = tiny_clip(32, 2, 2, 32, 8, 16)
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    image_folder(root / "images" / "train")
    image_folder(root / "images" / "test", n_per_class=2)
    return root / "model", root / "images"


def quickstart(model: Path, images: Path, out: Path) -> list[str]:
    return [
        "quickstart",
        "--model", str(model),
        "--data", str(images),
        "--split", "train",
        "--out", str(out),
        "--layer", "1",
        "--limit", "0",
        "--expansion", "2",
        "--epochs", "2",
        "--no-explore",
    ]  # fmt: skip


def arrays(atlas: Atlas) -> dict[str, np.ndarray]:
    ds = atlas.dataset()
    return {name: np.asarray(ds.array(name)) for name in ds.meta["files"]}


def test_offline_end_to_end_then_resume(inputs, tmp_path, capsys):
    model, images = inputs
    out = tmp_path / "qs"
    assert main(quickstart(model, images, out)) == 0
    printed = capsys.readouterr().out
    steps = ("extract", "store"), ("train", "sae"), ("evaluate", "store-test"), ("stats", "atlas")
    steps += (("figures", "figures"),)
    for step, folder in steps:
        assert f"== {step}: {out / folder}" in printed
    for figure in ("scatter.png", "scatter.html", "heatmap.png", "references.png"):
        path = out / "figures" / figure
        assert str(path) in printed
        head = path.read_bytes()[:64]
        assert head.startswith(b"\x89PNG") if figure.endswith("png") else b"<html" in head.lower()
    held_out = json.loads((out / "sae" / "eval-test.json").read_text())
    assert held_out["images"] == [0, 4]  # the 4 test images, not the 12 train images
    assert 0 <= held_out["reconstruction"]["fvu"] < 2
    assert "fvu" in printed
    sae = load(out / "sae")
    assert sae.cfg.d_in == 32 and sae.cfg.d_sae == 64
    atlas = Atlas.open(out / "atlas")
    assert atlas.d_sae == 64 and atlas.dataset().meta["n_images"] == 12
    first = arrays(atlas)
    assert first["image_freq"].max() > 0  # the trained SAE fires on the images
    # a second run finds every step done and changes nothing
    assert main(quickstart(model, images, out)) == 0
    assert "already complete" in capsys.readouterr().out
    again = arrays(Atlas.open(out / "atlas"))
    assert all(np.array_equal(first[k], again[k]) for k in first)


def test_unreachable_hub_names_the_offline_flags(inputs, tmp_path):
    _, images = inputs
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PYTHONPATH": str(ROOT / "src"),
    }
    args = quickstart(Path("patchsae-test/no-such-model"), images, tmp_path / "qs")
    done = subprocess.run(
        [sys.executable, "-m", "patchsae", *args], env=env, capture_output=True, text=True
    )
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("patchsae quickstart: error:") and "--model MODEL_FOLDER" in last
    assert "Traceback" not in done.stderr
