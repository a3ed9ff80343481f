"""``patchsae extract``: matches HF forwards, skips bad images, reuse rules, kill -9 resume."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from assets import DINOV2, FASHION_MNIST
from patchsae.cli import main
from patchsae.config import ConfigError
from patchsae.data.images import DataConfig, open_images, shuffled_order
from patchsae.data.store import ActivationStore, StoreError, StoreMetadata
from patchsae.extract import ExtractConfig, config_from_args, extract, register
from tiny_models import save_tiny_vit

RUNNER = (
    "import sys; from patchsae.config import load_config; "
    "from patchsae.extract import ExtractConfig, extract; "
    "extract(load_config(ExtractConfig, None, sys.argv[1:]))"
)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="patchsae")
    register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-block ViT (width 32, 32 px, patch 8: 17 tokens) saved with save_pretrained."""
    folder = tmp_path_factory.mktemp("tinyvit")
    return save_tiny_vit(folder, width=32, n_layers=3, heads=2, image_size=32, patch_size=8)


def make_folder(root: Path, per_class: int, bad: bool) -> Path:
    """ImageFolder with classes a/ and b/ of random RGB PNGs; optionally two broken files."""
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (20 + i % 5, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / cls / f"{i:03d}.png")
    if bad:
        (root / "a" / "001.png").write_bytes(b"not a png at all")
        good = (root / "b" / "002.png").read_bytes()
        (root / "b" / "002.png").write_bytes(good[: len(good) // 2])
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folder(tmp_path_factory.mktemp("imgs"), per_class=6, bad=True)


def config(model: Path, data: Path, out: Path, **kw) -> ExtractConfig:
    base = dict(
        model=str(model),
        data=DataConfig(source=str(data)),
        layers=(1, -1),
        out=str(out),
        batch_size=2,
        shard_images=4,
        num_workers=0,
        dtype="fp32",
    )
    return ExtractConfig(**{**base, **kw})


def hf_hidden_states(model_dir: Path, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir).eval()
    with torch.inference_mode():
        return model(pixel_values=pixel_values, output_hidden_states=True).hidden_states


def test_extract_matches_hf_and_skips_bad_images(
    tiny_model: Path, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = extract(config(tiny_model, images, tmp_path / "store", num_workers=2))
    printed = capsys.readouterr().out
    assert "skipped 2 bad image(s)" in printed and "001.png" in printed and str(out) in printed
    store = ActivationStore.open(out)
    source = open_images(DataConfig(source=str(images)))
    bad_ids = {1, 8}
    kept = [i for i in range(12) if i not in bad_ids]
    np.testing.assert_array_equal(store.example_ids, kept)
    np.testing.assert_array_equal(store.labels, source.labels[kept])
    report = json.loads((out / "bad_images.json").read_text())
    assert [r["example_id"] for r in report] == [1, 8]
    assert report[0]["where"].endswith("a/001.png") and "identify" in report[0]["reason"]
    assert report[1]["where"].endswith("b/002.png")
    meta = store.metadata
    assert meta["layers"] == [1, 2] and meta["layers_requested"] == [1, -1]
    assert meta["n_images"] == 10 and meta["n_bad"] == 2 and meta["shard_counts"] == [3, 4, 3]
    assert meta["backbone"]["family"] == "vit" and len(meta["backbone"]["folder_hash"]) == 64
    assert meta["data"]["fingerprint"] == source.fingerprint and meta["class_names"] == ["a", "b"]
    assert (meta["n_tokens"], meta["d_model"], meta["dtype"]) == (17, 32, "fp32")
    assert meta["token_layout"]["grid"] == [4, 4]
    assert store.meta == StoreMetadata.load(out / "metadata.json")
    assert store.meta.shard_counts == [3, 4, 3] and store.meta.n_planned == 12
    store.meta.dump(tmp_path / "copy.json")  # the typed metadata writes the same bytes
    assert (tmp_path / "copy.json").read_bytes() == (out / "metadata.json").read_bytes()
    pixels = torch.cat([source_preprocess(tiny_model, source, i) for i in kept])
    hidden = hf_hidden_states(tiny_model, pixels)
    for layer in (1, 2):
        expected = hidden[layer + 1].numpy()
        got = np.stack([store.get(i, layer) for i in range(len(store))])
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(store.get(0, -1), hidden[3][0].numpy(), atol=1e-5, rtol=0)


def source_preprocess(model_dir: Path, source, i: int) -> torch.Tensor:
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(model_dir)
    return processor(images=[source.load(i)], return_tensors="pt")["pixel_values"]


def test_seed_limit_and_reuse_rules(
    tiny_model: Path, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cfg = config(tiny_model, images, tmp_path / "store", seed=7, limit=9, dtype="fp16")
    out = extract(cfg)
    planned = shuffled_order(12, 7)[:9]
    store = ActivationStore.open(out)
    np.testing.assert_array_equal(store.example_ids, [i for i in planned if i not in (1, 8)])
    assert store.metadata["seed"] == 7 and store.metadata["limit"] == 9
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert extract(cfg) == out
    assert "already complete" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    for change, key in [
        ({"dtype": "bf16"}, "dtype"),
        ({"layers": (0,)}, "layers"),
        ({"seed": 8}, "seed"),
        ({"limit": 10}, "limit"),
        ({"shard_images": 8}, "shard_images"),
    ]:
        with pytest.raises(StoreError, match=rf"differs in: .*\b{key}\b.*new --out"):
            extract(dataclasses.replace(cfg, **change))
    argv = ["extract", "--model", str(tiny_model), "--data", str(images), "--out", str(out)]
    argv += ["--layer", "1", "-1", "--batch-size", "2", "--shard-images", "4", "--limit", "9"]
    capsys.readouterr()
    assert main([*argv, "--seed", "7", "--dtype", "bf16", "num_workers=0"]) == 2
    assert "(differs in: dtype); use a new --out" in capsys.readouterr().err
    assert main([*argv, "--seed", "7", "--dtype", "fp16", "num_workers=0"]) == 0
    assert "already complete" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    with pytest.raises(ConfigError, match="exceeds the 12 images"):
        extract(config(tiny_model, images, tmp_path / "other", limit=13))
    with pytest.raises(ValueError, match="out of range"):
        extract(config(tiny_model, images, tmp_path / "other2", layers=(5,)))


def test_resume_recomputes_only_missing_shards(
    tiny_model: Path, images: Path, tmp_path: Path
) -> None:
    cfg = config(tiny_model, images, tmp_path / "store", dtype="bf16", seed=1)
    out = extract(cfg)
    expected = tree(out)
    meta = json.loads((out / "metadata.json").read_text())
    (out / "metadata.json").write_text(json.dumps({**meta, "complete": False}))
    for name in ("00000.json", "00002.json"):
        (out / "shards" / name).unlink()
    (out / "layer_1" / "00002.npy").write_bytes(b"garbage")
    (out / "layer_2" / "00001.npy.rows.tmp").write_bytes(b"partial")
    kept = out / "layer_1" / "00001.npy"
    mtime = kept.stat().st_mtime_ns
    time.sleep(0.01)
    with pytest.raises(StoreError, match="incomplete"):
        ActivationStore.open(out)
    extract(cfg)
    assert kept.stat().st_mtime_ns == mtime
    assert tree(out) == expected


def test_resume_accepts_the_same_paths_spelled_differently(
    tiny_model: Path,
    images: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tiny_model.parent)
    cfg = config(Path(tiny_model.name), images, tmp_path / "store", limit=4)
    out = extract(dataclasses.replace(cfg, data=DataConfig(source=f"{images}/")))
    meta = ActivationStore.open(out).metadata
    assert meta["backbone"]["name"] == str(tiny_model.resolve())
    assert meta["data"]["source"] == str(images.resolve())
    assert "config" not in meta and "split" not in meta and meta["data"]["split"] == "train"
    assert meta["devices"] == ["cpu"]
    assert json.loads((out / "shards" / "00000.json").read_text())["device"] == "cpu"
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    extract(dataclasses.replace(cfg, model=str(tiny_model)))
    assert "already complete" in capsys.readouterr().out
    moved = tmp_path / "moved_model"
    shutil.copytree(tiny_model, moved)
    with pytest.raises(StoreError, match="other paths or names.*rerun with the original") as err:
        extract(dataclasses.replace(cfg, model=str(moved)))
    assert str(tiny_model.resolve()) in str(err.value) and "delete" not in str(err.value)


def test_complete_store_with_missing_shard_file_is_repaired(
    tiny_model: Path, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cfg = config(tiny_model, images, tmp_path / "store")
    out = extract(cfg)
    expected = tree(out)
    (out / "layer_2" / "00001.npy").unlink()
    with pytest.raises(StoreError, match="layer_2/00001.npy is missing.*rerun the same extract"):
        ActivationStore.open(out)
    capsys.readouterr()
    extract(cfg)
    assert "already complete" not in capsys.readouterr().out
    assert tree(out) == expected


def test_help_shows_defaults(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        parse(["extract", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, default in [
        ("--batch-size", 32),
        ("--shard-images", 1024),
        ("--num-workers", 2),
        ("--dtype", "fp16"),
        ("--device", "cpu"),
    ]:
        assert re.search(rf"{flag} \S+ (?:(?!--).)*\(default {default}\)", text), flag


def test_cli_builds_config(tmp_path: Path) -> None:
    yaml_path = tmp_path / "extract.yaml"
    yaml_path.write_text("model: m\ndata: {source: d, split: val}\nbatch_size: 4\nlimit: 3\n")
    args = parse(
        ["extract", "--config", str(yaml_path), "--out", "o", "--limit", "5", "--dtype", "bf16"]
        + ["--shard-images", "8", "--layer", "3", "-1", "seed=9", "data.max_pixels=100"]
    )
    cfg = config_from_args(args)
    assert (cfg.model, cfg.out, cfg.layers, cfg.dtype) == ("m", "o", (3, -1), "bf16")
    assert (cfg.batch_size, cfg.limit, cfg.seed, cfg.shard_images) == (4, 5, 9, 8)
    assert cfg.data == DataConfig(source="d", split="val", max_pixels=100)
    bad_shards = ["extract", "--model", "m", "--data", "d", "--layer", "1", "--out", "o"]
    with pytest.raises(ConfigError, match="multiple of batch_size"):
        config_from_args(parse(bad_shards + ["--batch-size", "3"]))
    with pytest.raises(ConfigError, match="missing required"):
        config_from_args(parse(["extract", "--model", "m", "--layer", "1", "--out", "o"]))


def run_extract(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", RUNNER, *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def kill_after(proc: subprocess.Popen, marker: Path, timeout: float = 120) -> None:
    """SIGKILL ``proc`` as soon as ``marker`` exists; fail if the run ended before that."""
    deadline = time.monotonic() + timeout
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "extract did not start writing shards"
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_sigkill_resume_is_bit_identical(tiny_model: Path, tmp_path: Path) -> None:
    data = make_folder(tmp_path / "imgs", per_class=60, bad=True)
    common = [f"model={tiny_model}", f"data.source={data}", "layers=[0,2]", "batch_size=2"]
    common += ["shard_images=4", "num_workers=0", "dtype=bf16", "seed=3"]
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    proc = run_extract([*common, f"out={reference}"])
    killed = run_extract([*common, f"out={resumed}"])
    kill_after(killed, resumed / "shards" / "00001.json")
    assert json.loads((resumed / "metadata.json").read_text())["complete"] is False
    for entry_path in (resumed / "shards").glob("*.json"):
        entry = json.loads(entry_path.read_text())
        for info in entry["files"].values():
            assert (resumed / info["path"]).stat().st_size == info["bytes"]
    first_shard_mtime = (resumed / "layer_0" / "00000.npy").stat().st_mtime_ns
    assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()
    final = run_extract([*common, f"out={resumed}"])
    assert final.wait(timeout=600) == 0, final.stderr.read().decode()
    assert (resumed / "layer_0" / "00000.npy").stat().st_mtime_ns == first_shard_mtime
    expected, got = tree(reference), tree(resumed)
    assert sorted(got) == sorted(expected)
    assert len([name for name in got if name.endswith(".npy")]) == 2 * 30 + 2
    for name, content in expected.items():
        assert got[name] == content, f"{name} differs after kill -9 and resume"
    assert ActivationStore.open(resumed).metadata["n_images"] == 118


@pytest.mark.shared
@pytest.mark.skipif(not (DINOV2.is_dir() and FASHION_MNIST.is_dir()), reason="needs ../shared")
def test_smoke_dinov2_fashion_mnist(tmp_path: Path) -> None:
    from transformers import AutoImageProcessor, Dinov2Model

    model_dir = DINOV2
    data_dir = FASHION_MNIST
    out = tmp_path / "store"
    argv = ["extract", "--model", str(model_dir), "--data", str(data_dir), "--split", "test"]
    argv += ["--layer", "2", "-8", "--limit", "16", "--dtype", "fp32", "--out", str(out)]
    argv += ["--batch-size", "8", "--shard-images", "8", "--num-workers", "0"]
    assert main(argv) == 0
    store = ActivationStore.open(out)
    assert len(store) == 16 and store.layers == [2, 4]
    assert store.token_layout.n_tokens == 257 and store.d_model == 384
    source = open_images(DataConfig(source=str(data_dir), split="test"))
    processor = AutoImageProcessor.from_pretrained(model_dir)
    pixels = processor(images=[source.load(i) for i in range(16)], return_tensors="pt")
    model = Dinov2Model.from_pretrained(model_dir, num_hidden_layers=5).eval()
    with torch.inference_mode():
        hidden = model(**pixels, output_hidden_states=True).hidden_states
    for layer in (2, 4):
        np.testing.assert_allclose(store.images(0, 16, layer), hidden[layer + 1], atol=1e-4)
    np.testing.assert_array_equal(store.labels, source.labels[:16])


def test_thin_images_and_dangling_symlinks_are_skipped(tiny_model: Path, tmp_path: Path) -> None:
    """A processor that fits images into the model's size (as DINOv2's does) cannot handle a
    1 x 3000 image; it and a dangling symlink are listed as bad and the run finishes."""
    from transformers import BitImageProcessor

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    BitImageProcessor(
        size={"max_height": 32, "max_width": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(model)
    data = make_folder(tmp_path / "imgs", per_class=3, bad=False)
    Image.new("RGB", (1, 3000)).save(data / "a" / "thin.png")
    Image.new("RGB", (3000, 1)).save(data / "b" / "flat.png")
    (data / "b" / "link.png").symlink_to(tmp_path / "missing.png")
    out = extract(config(model, data, tmp_path / "store", num_workers=1))
    report = json.loads((out / "bad_images.json").read_text())
    assert sorted(Path(r["where"]).name for r in report) == ["flat.png", "link.png", "thin.png"]
    assert len(ActivationStore.open(out)) == 6


def test_store_from_before_exif_orientation_resumes_on_raw_pixels(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A store whose metadata has no data.exif_transpose was made on raw pixels: it resumes,
    and the shards it recomputes are the raw-pixel ones."""
    data = tmp_path / "imgs"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        exif = Image.Exif()
        exif[0x0112] = 6
        img = Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
        img.save(data / f"{i}.jpg", exif=exif.tobytes())
    cfg = config(tiny_model, data, tmp_path / "raw")
    raw = extract(dataclasses.replace(cfg, data=DataConfig(str(data), exif_transpose=False)))
    upright = extract(config(tiny_model, data, tmp_path / "upright"))
    assert ActivationStore.open(upright).metadata["data"]["exif_transpose"] is True
    assert not np.array_equal(
        ActivationStore.open(raw).get(0), ActivationStore.open(upright).get(0)
    )
    expected = tree(raw)
    meta = json.loads((raw / "metadata.json").read_text())
    del meta["data"]["exif_transpose"]
    (raw / "metadata.json").write_text(json.dumps({**meta, "complete": False}, indent=1) + "\n")
    (raw / "shards" / "00000.json").unlink()
    capsys.readouterr()
    extract(cfg)
    assert "resuming it on raw pixels" in capsys.readouterr().out
    assert {k: v for k, v in tree(raw).items() if "layer" in k} == {
        k: v for k, v in expected.items() if "layer" in k
    }
    assert "exif_transpose" not in json.loads((raw / "metadata.json").read_text())["data"]
