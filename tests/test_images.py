"""Tests for patchsae.data.images: decoding, sources, fingerprints, batches, bad-image report."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from assets import FASHION_MNIST
from patchsae.config import ConfigError, load_config
from patchsae.data.images import (
    BadImage,
    BadRecord,
    DataConfig,
    DataError,
    image_batches,
    load_rgb,
    open_images,
    shuffled_order,
    write_bad_report,
)
from patchsae.data.shuffle import epoch_order, keyed_rng


class ToTensor:
    """Picklable preprocess: nearest resize, then (b, 3, size, size) floats in [0, 1]."""

    def __init__(self, size: int = 8) -> None:
        self.size = size

    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        arrays = [np.asarray(im.resize((self.size, self.size), Image.NEAREST)) for im in images]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


def png_bytes(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def noise_image(size: int = 64, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming ``width`` x ``height`` grayscale pixels, with a tiny IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


# ---------------------------------------------------------------- mode conversions


def pixel(img: Image.Image, xy=(0, 0)) -> tuple[int, int, int]:
    out = load_rgb(img)
    assert out.mode == "RGB" and out.size == img.size
    return out.getpixel(xy)


def test_rgb_unchanged():
    img = noise_image(16)
    assert np.array_equal(np.asarray(load_rgb(img)), np.asarray(img))


def test_gray_replicated():
    assert pixel(Image.new("L", (3, 2), 128)) == (128, 128, 128)


def test_bilevel():
    img = Image.new("1", (2, 1), 0)
    img.putpixel((1, 0), 1)
    assert pixel(img, (0, 0)) == (0, 0, 0)
    assert pixel(img, (1, 0)) == (255, 255, 255)


def test_palette():
    img = Image.new("P", (2, 1), 0)
    img.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    img.putpixel((1, 0), 1)
    assert pixel(img, (0, 0)) == (10, 20, 30)
    assert pixel(img, (1, 0)) == (200, 100, 50)


def test_palette_transparency_on_white():
    img = Image.new("P", (2, 1), 0)
    img.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    img.putpixel((1, 0), 1)
    img.info["transparency"] = 0
    assert pixel(img, (0, 0)) == (255, 255, 255)
    assert pixel(img, (1, 0)) == (200, 100, 50)
    decoded = load_rgb(png_bytes(img, transparency=0))
    assert decoded.getpixel((0, 0)) == (255, 255, 255)
    assert decoded.getpixel((1, 0)) == (200, 100, 50)


def test_gray_transparency_on_white():
    img = Image.new("L", (2, 1), 7)
    img.putpixel((1, 0), 90)
    decoded = load_rgb(png_bytes(img, transparency=7))
    assert decoded.getpixel((0, 0)) == (255, 255, 255)
    assert decoded.getpixel((1, 0)) == (90, 90, 90)


def test_rgb_transparency_on_white():
    img = Image.new("RGB", (2, 1), (1, 2, 3))
    img.putpixel((1, 0), (9, 9, 9))
    decoded = load_rgb(png_bytes(img, transparency=(1, 2, 3)))
    assert decoded.getpixel((0, 0)) == (255, 255, 255)
    assert decoded.getpixel((1, 0)) == (9, 9, 9)


def test_rgba_composited_on_white():
    img = Image.new("RGBA", (3, 1))
    img.putpixel((0, 0), (0, 0, 0, 0))
    img.putpixel((1, 0), (10, 20, 30, 255))
    img.putpixel((2, 0), (0, 0, 0, 128))
    assert pixel(img, (0, 0)) == (255, 255, 255)
    assert pixel(img, (1, 0)) == (10, 20, 30)
    assert pixel(img, (2, 0)) == (127, 127, 127)


def test_la_composited_on_white():
    img = Image.new("LA", (2, 1))
    img.putpixel((0, 0), (0, 0))
    img.putpixel((1, 0), (100, 255))
    assert pixel(img, (0, 0)) == (255, 255, 255)
    assert pixel(img, (1, 0)) == (100, 100, 100)


def test_cmyk():
    img = Image.new("CMYK", (3, 1), (0, 0, 0, 0))
    img.putpixel((1, 0), (255, 0, 0, 0))
    img.putpixel((2, 0), (0, 0, 0, 255))
    assert pixel(img, (0, 0)) == (255, 255, 255)
    assert pixel(img, (1, 0)) == (0, 255, 255)
    assert pixel(img, (2, 0)) == (0, 0, 0)
    assert load_rgb(png_bytes(img, "JPEG", quality=100)).getpixel((0, 0))[0] > 250


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_sixteen_bit_scaled_not_clipped(mode):
    values = np.arange(256, dtype=np.int64) * 257
    arr = values.reshape(16, 16)
    img = Image.fromarray(arr.astype(np.uint16)) if mode == "I;16" else Image.new("I", (16, 16))
    if mode == "I":
        img.putdata(values.tolist())
    assert img.mode == mode
    out = np.asarray(load_rgb(img))
    assert np.array_equal(out[..., 0].ravel(), np.arange(256))
    assert np.array_equal(out[..., 0], out[..., 2])
    assert pixel(Image.new(mode, (1, 1), 65535)) == (255, 255, 255)
    assert pixel(Image.new(mode, (1, 1), 32896)) == (128, 128, 128)


def test_sixteen_bit_png_file(tmp_path):
    path = tmp_path / "deep.png"
    Image.new("I;16", (4, 4), 65535).save(path)
    assert load_rgb(path).getpixel((0, 0)) == (255, 255, 255)


def test_int_mode_out_of_range_clamped():
    img = Image.new("I", (2, 1), -5)
    img.putpixel((1, 0), 100000)
    assert pixel(img, (0, 0)) == (0, 0, 0)
    assert pixel(img, (1, 0)) == (255, 255, 255)


def test_float_mode_refused():
    with pytest.raises(BadImage, match="mode F"):
        load_rgb(Image.new("F", (2, 2), 0.5))


# ---------------------------------------------------------------- bad images


def test_truncated_png():
    data = png_bytes(noise_image(64))
    with pytest.raises(BadImage):
        load_rgb(data[: len(data) // 2])


def test_truncated_jpeg():
    data = png_bytes(noise_image(64), "JPEG", quality=95)
    with pytest.raises(BadImage, match="truncated"):
        load_rgb(data[: len(data) // 2])


def test_random_bytes_named_png(tmp_path):
    path = tmp_path / "noise.png"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    with pytest.raises(BadImage, match="not an image"):
        load_rgb(path)


def test_text_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not an image at all\n")
    with pytest.raises(BadImage, match="not an image"):
        load_rgb(path)


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(BadImage):
        load_rgb(path)


def test_missing_file(tmp_path):
    with pytest.raises(BadImage, match="FileNotFoundError"):
        load_rgb(tmp_path / "gone.png")


def test_over_max_pixels():
    data = png_bytes(Image.new("RGB", (20, 10)))
    assert load_rgb(data, max_pixels=200).size == (20, 10)
    with pytest.raises(BadImage, match="20x10 = 200 pixels exceeds max_pixels=199"):
        load_rgb(data, max_pixels=199)
    with pytest.raises(BadImage, match="exceeds max_pixels"):
        load_rgb(Image.new("RGB", (20, 10)), max_pixels=199)


def test_bomb_header_refused_without_decoding():
    data = bomb_png(100_000, 100_000)
    start = time.perf_counter()
    with pytest.raises(BadImage, match="pixels"):
        load_rgb(data)
    with pytest.raises(BadImage, match="exceeds max_pixels=1000000"):
        load_rgb(bomb_png(2000, 1000), max_pixels=1_000_000)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("side", [12, 20])
def test_pil_bomb_limit_becomes_bad_image(monkeypatch, side):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(BadImage, match="decompression bomb"):
        load_rgb(png_bytes(Image.new("L", (side, side))), max_pixels=10**9)


# ---------------------------------------------------------------- image folders


def write_image(path: Path, value: int, size=(6, 4)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size, value).save(path)


@pytest.fixture
def folder(tmp_path):
    """root/train/{b_cat, a_dog}/... and root/test/a_dog/...; the value of each image is unique."""
    root = tmp_path / "ds"
    write_image(root / "train" / "b_cat" / "2.png", 20)
    write_image(root / "train" / "b_cat" / "10.png", 21)
    write_image(root / "train" / "b_cat" / "nested" / "1.png", 22)
    write_image(root / "train" / "a_dog" / "x.JPG", 10)
    write_image(root / "train" / "a_dog" / "y.png", 11)
    (root / "train" / "a_dog" / "readme.txt").write_text("skip me")
    (root / "train" / "a_dog" / ".hidden.png").write_bytes(b"skip me")
    write_image(root / "test" / "a_dog" / "z.png", 12)
    write_image(root / "test" / "b_cat" / "w.png", 23)
    return root


def test_imagefolder_listing(folder):
    src = open_images(DataConfig(source=str(folder)))
    rel = [Path(src.describe(i)).relative_to(folder / "train").as_posix() for i in range(len(src))]
    assert rel == [
        "a_dog/x.JPG",
        "a_dog/y.png",
        "b_cat/10.png",
        "b_cat/2.png",
        "b_cat/nested/1.png",
    ]
    assert src.class_names == ["a_dog", "b_cat"]
    assert src.labels.dtype == np.int64
    assert src.labels.tolist() == [0, 0, 1, 1, 1]
    values = [load_rgb(src.describe(i)).getpixel((0, 0))[0] for i in range(len(src))]
    assert [src.load(i).getpixel((0, 0))[0] for i in range(len(src))] == values
    assert src.load(4).getpixel((0, 0)) == (22, 22, 22)


def test_imagefolder_split_and_errors(folder, tmp_path):
    test = open_images(DataConfig(source=str(folder), split="test"))
    assert len(test) == 2 and test.labels.tolist() == [0, 1]
    with pytest.raises(DataError, match=r"split folders \['test', 'train'\]"):
        open_images(DataConfig(source=str(folder), split="validation"))
    with pytest.raises(DataError, match="does not exist"):
        open_images(DataConfig(source=str(tmp_path / "nope"), kind="imagefolder"))
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="no image files"):
        open_images(DataConfig(source=str(tmp_path / "empty")))
    write_image(folder / "train" / "stray.png", 1)
    with pytest.raises(DataError, match="both class folders and image files"):
        open_images(DataConfig(source=str(folder)))


def test_imagefolder_without_split_or_classes(tmp_path):
    write_image(tmp_path / "flat" / "b.png", 2)
    write_image(tmp_path / "flat" / "a.png", 1)
    src = open_images(DataConfig(source=str(tmp_path / "flat")))
    assert src.labels.tolist() == [-1, -1] and src.class_names == []
    assert src.load(0).getpixel((0, 0)) == (1, 1, 1)
    write_image(tmp_path / "classes" / "k" / "a.png", 1)
    src = open_images(DataConfig(source=str(tmp_path / "classes")))
    assert src.labels.tolist() == [0] and src.class_names == ["k"]


def test_names_file(folder, tmp_path):
    (folder / "classes.txt").write_text("Dog\nCat\n")
    assert open_images(DataConfig(source=str(folder))).class_names == ["Dog", "Cat"]
    names = tmp_path / "names.txt"
    names.write_text("hound\n\nfeline\n")
    cfg = DataConfig(source=str(folder), class_names_file=str(names))
    assert open_images(cfg).class_names == ["hound", "feline"]
    names.write_text("only one\n")
    with pytest.raises(DataError, match="1 names but .* 2 class folders"):
        open_images(cfg)
    with pytest.raises(DataError, match="does not exist"):
        open_images(DataConfig(source=str(folder), class_names_file=str(tmp_path / "x.txt")))


def test_fingerprint(folder, tmp_path):
    first = open_images(DataConfig(source=str(folder))).fingerprint
    assert len(first) == 64
    assert open_images(DataConfig(source=str(folder))).fingerprint == first
    assert open_images(DataConfig(source=str(folder), split="test")).fingerprint != first
    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(folder, moved)
    assert open_images(DataConfig(source=str(moved))).fingerprint == first
    write_image(folder / "train" / "a_dog" / "new.png", 5)
    added = open_images(DataConfig(source=str(folder))).fingerprint
    assert added != first
    write_image(folder / "train" / "a_dog" / "new.png", 5, size=(30, 30))
    assert open_images(DataConfig(source=str(folder))).fingerprint not in (first, added)


def test_config_validation():
    cfg = load_config(DataConfig, None, ["source=/x", "kind=hf", "label_column=null"])
    assert cfg.kind == "hf" and cfg.label_column is None
    with pytest.raises(ConfigError, match="max_pixels"):
        load_config(DataConfig, None, ["source=/x", "max_pixels=0"])
    with pytest.raises(ConfigError, match="kind"):
        load_config(DataConfig, None, ["source=/x", "kind=zip"])


# ---------------------------------------------------------------- Hugging Face datasets


def make_hf(tmp_path: Path, dict_splits: bool = False) -> Path:
    import datasets

    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["ant", "bee"])}
    )
    images = [Image.new("L", (5, 5), 40 + i) for i in range(4)] + [{"bytes": b"junk", "path": None}]
    ds = datasets.Dataset.from_dict({"image": images, "label": [1, 0, 1, 0, 1]}, features=features)
    path = tmp_path / "hfds"
    if dict_splits:
        ds = datasets.DatasetDict({"train": ds, "test": ds.select([3, 1])})
    ds.save_to_disk(str(path))
    return path


def test_hf_saved_dataset(tmp_path):
    path = make_hf(tmp_path)
    src = open_images(DataConfig(source=str(path)))
    assert len(src) == 5
    assert src.labels.tolist() == [1, 0, 1, 0, 1]
    assert src.class_names == ["ant", "bee"]
    assert src.load(2).getpixel((4, 4)) == (42, 42, 42)
    assert src.describe(3) == f"{path}[train][3]"
    with pytest.raises(BadImage, match="not an image"):
        src.load(4)
    again = open_images(DataConfig(source=str(path), kind="hf"))
    assert again.fingerprint == src.fingerprint
    unlabelled = open_images(DataConfig(source=str(path), label_column=None))
    assert unlabelled.labels.tolist() == [-1] * 5 and unlabelled.fingerprint != src.fingerprint
    with pytest.raises(DataError, match="no column 'img'"):
        open_images(DataConfig(source=str(path), image_column="img"))
    with pytest.raises(DataError, match="label_column=null"):
        open_images(DataConfig(source=str(path), label_column="y"))


def test_hf_dataset_dict_splits(tmp_path):
    path = make_hf(tmp_path, dict_splits=True)
    train = open_images(DataConfig(source=str(path)))
    test = open_images(DataConfig(source=str(path), split="test"))
    assert len(train) == 5 and len(test) == 2
    assert test.labels.tolist() == [0, 0]
    assert test.load(0).getpixel((0, 0)) == (43, 43, 43)
    assert test.fingerprint != train.fingerprint
    with pytest.raises(DataError, match=r"splits \['train', 'test'\]"):
        open_images(DataConfig(source=str(path), split="val"))


def test_hf_string_labels(tmp_path):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("string")})
    ds = datasets.Dataset.from_dict(
        {"image": [Image.new("L", (2, 2), v) for v in (1, 2, 3)], "label": ["z", "a", "z"]},
        features=features,
    )
    ds.save_to_disk(str(tmp_path / "s"))
    src = open_images(DataConfig(source=str(tmp_path / "s")))
    assert src.class_names == ["a", "z"] and src.labels.tolist() == [1, 0, 1]


# ---------------------------------------------------------------- order and batches


def test_shuffled_order():
    assert shuffled_order(5, None).tolist() == [0, 1, 2, 3, 4]
    order = shuffled_order(100, 3)
    assert order.dtype == np.int64 and sorted(order.tolist()) == list(range(100))
    assert np.array_equal(order, shuffled_order(100, 3))
    assert not np.array_equal(order, shuffled_order(100, 4))
    expected = np.random.Generator(np.random.PCG64(3)).permutation(100)
    assert np.array_equal(order, expected)
    assert shuffled_order(0, 1).shape == (0,)


def test_shuffled_order_is_the_unkeyed_shared_stream():
    assert np.array_equal(shuffled_order(40, 5), keyed_rng(5).permutation(40))
    assert not np.array_equal(shuffled_order(40, 5), epoch_order(40, 5, 0)), (
        "the planned order and the first training epoch must be independent draws"
    )
    with pytest.raises(ValueError, match="n must be >= 0"):
        shuffled_order(-1, 0)


@pytest.fixture
def mixed_folder(tmp_path):
    """12 images in 2 classes; example ids 3 (random bytes) and 8 (truncated) are bad."""
    root = tmp_path / "mixed"
    for i in range(12):
        path = root / f"c{i % 2}" / f"{i:02d}.png"
        write_image(path, 10 * i, size=(8 + i, 8))
    (root / "c1" / "03.png").write_bytes(b"\x00garbage" * 20)
    good = png_bytes(noise_image(32, seed=1))
    (root / "c0" / "08.png").write_bytes(good[: len(good) // 3])
    return root


def collect(batches):
    return [(b.example_ids.tolist(), b.labels.tolist(), b.pixel_values, b.bad) for b in batches]


def test_batches_follow_order_and_drop_bad(mixed_folder):
    src = open_images(DataConfig(source=str(mixed_folder)))
    names = [Path(src.describe(i)).name for i in range(len(src))]
    bad_ids = {names.index("03.png"), names.index("08.png")}
    order = shuffled_order(len(src), 7)
    pre = ToTensor()
    batches = list(image_batches(src, order, pre, batch_size=5))
    assert [len(b.example_ids) + len(b.bad) for b in batches] == [5, 5, 2]
    seen = []
    for k, b in enumerate(batches):
        chunk = order[5 * k : 5 * (k + 1)]
        assert b.example_ids.tolist() == [i for i in chunk if i not in bad_ids]
        assert sorted(r.example_id for r in b.bad) == sorted(i for i in chunk if i in bad_ids)
        assert b.labels.tolist() == src.labels[b.example_ids].tolist()
        assert b.pixel_values.shape == (len(b.example_ids), 3, 8, 8)
        for row, i in enumerate(b.example_ids):
            assert torch.equal(b.pixel_values[row], pre([src.load(int(i))])[0])
        seen += b.example_ids.tolist() + [r.example_id for r in b.bad]
    assert sorted(seen) == list(range(12))
    records = [r for b in batches for r in b.bad]
    assert {Path(r.where).name for r in records} == {"03.png", "08.png"}
    assert all(r.reason for r in records)


def test_workers_equal_single_process(mixed_folder):
    src = open_images(DataConfig(source=str(mixed_folder)))
    order = shuffled_order(len(src), 11)
    single = collect(image_batches(src, order, ToTensor(), batch_size=4, num_workers=0))
    multi = collect(image_batches(src, order, ToTensor(), batch_size=4, num_workers=2))
    assert len(single) == len(multi) == 3
    for (ids0, lab0, px0, bad0), (ids1, lab1, px1, bad1) in zip(single, multi, strict=True):
        assert ids0 == ids1 and lab0 == lab1 and bad0 == bad1
        assert torch.equal(px0, px1)


class ProcessorPreprocess:
    """Picklable preprocess through a transformers image processor."""

    def __init__(self, processor) -> None:
        self.processor = processor

    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        return self.processor(images=images, return_tensors="pt")["pixel_values"]


def test_hf_source_with_workers_and_image_processor(tmp_path):
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(
        size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}
    )
    src = open_images(DataConfig(source=str(make_hf(tmp_path))))
    pre = ProcessorPreprocess(processor)
    single = collect(image_batches(src, [4, 0, 1, 2, 3], pre, batch_size=2, num_workers=0))
    multi = collect(image_batches(src, [4, 0, 1, 2, 3], pre, batch_size=2, num_workers=2))
    assert [ids for ids, *_ in multi] == [[0], [1, 2], [3]]
    assert [r.example_id for r in multi[0][3]] == [4]
    assert multi[0][2].shape == (1, 3, 16, 16)
    for (ids0, lab0, px0, bad0), (ids1, lab1, px1, bad1) in zip(single, multi, strict=True):
        assert ids0 == ids1 and lab0 == lab1 and bad0 == bad1
        assert torch.equal(px0, px1)
    direct = processor(images=[src.load(2)], return_tensors="pt")["pixel_values"]
    assert torch.equal(multi[1][2][1:], direct)


def test_all_bad_batch_is_empty_but_yielded(mixed_folder):
    src = open_images(DataConfig(source=str(mixed_folder)))
    names = [Path(src.describe(i)).name for i in range(len(src))]
    bad_ids = [names.index("03.png"), names.index("08.png")]
    batches = list(image_batches(src, bad_ids + [0], ToTensor(), batch_size=2))
    assert len(batches) == 2
    assert batches[0].pixel_values.shape == (0, 3, 8, 8)
    assert batches[0].example_ids.shape == (0,) and len(batches[0].bad) == 2
    assert batches[1].example_ids.tolist() == [0]


def test_batch_argument_errors(mixed_folder):
    src = open_images(DataConfig(source=str(mixed_folder)))
    with pytest.raises(ValueError, match=r"\[0, 12\)"):
        image_batches(src, [0, 12], ToTensor(), batch_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        image_batches(src, [0], ToTensor(), batch_size=0)
    with pytest.raises(ValueError, match="1-D integer"):
        image_batches(src, np.zeros((2, 2), dtype=np.int64), ToTensor(), batch_size=2)


def test_write_bad_report(tmp_path):
    path = tmp_path / "out" / "bad.json"
    records = [BadRecord(3, "a/b.png", "truncated"), BadRecord(8, "ds[train][8]", "not an image")]
    write_bad_report(records, path)
    assert json.loads(path.read_text()) == [
        {"example_id": 3, "where": "a/b.png", "reason": "truncated"},
        {"example_id": 8, "where": "ds[train][8]", "reason": "not an image"},
    ]
    write_bad_report([], path)
    assert json.loads(path.read_text()) == []
    assert [p.name for p in path.parent.iterdir()] == ["bad.json"]


# ---------------------------------------------------------------- real data


@pytest.mark.shared
@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="shared fashion-mnist-small absent")
@pytest.mark.parametrize(("split", "count"), [("test", 300), ("train", 1000)])
def test_fashion_mnist(split, count):
    src = open_images(DataConfig(source=str(FASHION_MNIST), split=split))
    assert len(src) == count
    names = (FASHION_MNIST / "classes.txt").read_text().splitlines()
    assert src.class_names == names and len(names) == 10
    assert np.bincount(src.labels).tolist() == [count // 10] * 10
    with open(FASHION_MNIST / "manifest.csv", newline="") as f:
        manifest = {row["path"]: row for row in csv.DictReader(f) if row["split"] == split}
    assert len(manifest) == count
    for i in range(len(src)):
        rel = Path(src.describe(i)).relative_to(FASHION_MNIST).as_posix()
        row = manifest[rel]
        folder_index = int(Path(rel).parent.name.split("_")[0])
        assert src.labels[i] == folder_index == int(row["label"])
        assert src.class_names[src.labels[i]] == row["class_name"]
        rgb = np.asarray(src.load(i))
        assert rgb.shape == (28, 28, 3)
        assert np.array_equal(rgb[..., 0], rgb[..., 2])
        assert hashlib.sha256(rgb[..., 0].tobytes()).hexdigest() == row["sha256_pixels"]


def test_hidden_folders_are_not_classes(folder):
    clean = open_images(DataConfig(source=str(folder)))
    write_image(folder / "train" / ".ipynb_checkpoints" / "c.png", 5)
    write_image(folder / ".cache" / "a" / "d.png", 6)
    src = open_images(DataConfig(source=str(folder)))
    assert src.class_names == ["a_dog", "b_cat"]
    assert src.labels.tolist() == clean.labels.tolist() == [0, 0, 1, 1, 1]
    assert src.fingerprint == clean.fingerprint
    flat = folder / "train" / "a_dog"
    write_image(flat / ".ipynb_checkpoints" / "e.png", 7)
    unlabelled = open_images(DataConfig(source=str(flat)))
    assert unlabelled.class_names == [] and len(unlabelled) == 2


def test_local_looking_sources_are_not_dataset_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    for source in (str(tmp_path / "nonexistent"), "./x", "~/x"):
        with pytest.raises(DataError, match=f"folder {source} does not exist"):
            open_images(DataConfig(source=source))
    write_image(tmp_path / "one.png", 1)
    for source in (str(tmp_path / "one.png"), "~/one.png"):
        with pytest.raises(DataError, match=f"{source} is a file, not a folder"):
            open_images(DataConfig(source=source))
    write_image(tmp_path / "home_ds" / "k" / "a.png", 3)
    src = open_images(DataConfig(source="~/home_ds"))
    assert src.class_names == ["k"] and src.load(0).getpixel((0, 0)) == (3, 3, 3)


def test_messages_name_the_cli_keys(tmp_path):
    path = make_hf(tmp_path)
    with pytest.raises(DataError, match=r"data\.label_column=null"):
        open_images(DataConfig(source=str(path), label_column="y"))
    clone = tmp_path / "hub_clone" / "data"
    clone.mkdir(parents=True)
    (clone / "train-00000-of-00001.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match="no image files.*set kind=hf"):
        open_images(DataConfig(source=str(tmp_path / "hub_clone")))


# ---------------------------------------------------------------- hostile folders and images


def fits_in_16(images: list[Image.Image]) -> torch.Tensor:
    """A picklable preprocess that fails like the DINOv2 processor on very thin images: it fits
    the image into 16 x 16, so 1 x 40 px rounds to a zero-width image and raises."""
    from transformers import BitImageProcessor

    processor = BitImageProcessor(
        size={"max_height": 16, "max_width": 16}, crop_size={"height": 16, "width": 16}
    )
    return torch.as_tensor(processor(images=images, return_tensors="pt")["pixel_values"])


def test_thin_image_is_a_bad_image_and_the_batch_goes_on(tmp_path):
    for name, size in [
        ("0.png", (20, 20)),
        ("1.png", (1, 40)),
        ("2.png", (40, 1)),
        ("3.png", (9, 9)),
    ]:
        noise_image(64).resize(size).save(tmp_path / name)
    source = open_images(DataConfig(source=str(tmp_path)))
    with pytest.raises(ValueError, match="height and width must be > 0"):
        fits_in_16([source.load(1)])
    (batch,) = image_batches(source, [0, 1, 2, 3], fits_in_16, batch_size=4)
    assert batch.example_ids.tolist() == [0, 3]
    torch.testing.assert_close(batch.pixel_values, fits_in_16([source.load(0), source.load(3)]))
    assert [r.example_id for r in batch.bad] == [1, 2]
    assert all("preprocessor cannot handle" in r.reason for r in batch.bad)
    assert "1x40" in batch.bad[0].reason and batch.bad[0].where.endswith("1.png")


def test_processor_unfit_for_the_model_is_not_a_bad_image(tmp_path):
    from patchsae.backbones.errors import BackboneError

    noise_image(64).save(tmp_path / "0.png")

    def unfit(images):
        raise BackboneError("the image processor produced (8, 8) px images")

    with pytest.raises(BackboneError):
        list(image_batches(open_images(DataConfig(source=str(tmp_path))), [0], unfit, 1))


def test_dangling_symlink_is_a_bad_image(tmp_path):
    (tmp_path / "a").mkdir()
    noise_image(16).save(tmp_path / "a" / "0.png")
    (tmp_path / "a" / "1.png").symlink_to(tmp_path / "gone.png")
    source = open_images(DataConfig(source=str(tmp_path)))
    assert len(source) == 2
    (batch,) = image_batches(source, [0, 1], ToTensor(), batch_size=2)
    assert batch.example_ids.tolist() == [0]
    (record,) = batch.bad
    assert record.example_id == 1 and "FileNotFoundError" in record.reason


def exif_photo(orientation: int) -> bytes:
    """A 30 x 20 JPEG, left half black, right half white, tagged with ``orientation``."""
    pixels = np.zeros((20, 30, 3), dtype=np.uint8)
    pixels[:, 15:] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    return png_bytes(Image.fromarray(pixels), "JPEG", exif=exif.tobytes(), quality=95)


def test_exif_orientation_applied_by_default():
    upright = load_rgb(exif_photo(6))  # 6: rotate 90 degrees clockwise to view
    assert upright.size == (20, 30)
    column = np.asarray(upright)[:, 10].mean(axis=-1)
    assert column[:10].mean() < 30 and column[-10:].mean() > 225  # black on top after turning
    raw = load_rgb(exif_photo(6), exif_transpose=False)
    assert raw.size == (30, 20)


def test_exif_option_reaches_the_source(tmp_path):
    (tmp_path / "0.jpg").write_bytes(exif_photo(6))
    assert open_images(DataConfig(source=str(tmp_path))).load(0).size == (20, 30)
    raw = open_images(DataConfig(source=str(tmp_path), exif_transpose=False))
    assert raw.load(0).size == (30, 20)
