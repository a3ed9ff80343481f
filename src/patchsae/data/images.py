"""Image sources (ImageFolder, Hugging Face ``datasets``), safe RGB decoding, batched loading.

An :class:`ImageSource` is an unshuffled, indexable list of images; the index of an image in it is
its *example id*, which every later stage (activation store, statistics, atlas) refers to. Bad
images never stop a run: :func:`load_rgb` raises :class:`BadImage` with a reason, and
:func:`image_batches` drops such images from their batch and lists them in ``ImageBatch.bad``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageOps

from patchsae.atomic import write_json
from patchsae.backbones.errors import BackboneError
from patchsae.data.shuffle import seeded_order
from patchsae.paths import check_local_folder
from patchsae.pixels import BadImage, to_rgb

DEFAULT_MAX_PIXELS = 89_478_485
IMAGE_EXTENSIONS = (
    ".bmp",
    ".gif",
    ".jpeg",
    ".jpg",
    ".pbm",
    ".pgm",
    ".png",
    ".ppm",
    ".tif",
    ".tiff",
    ".webp",
)
SPLIT_FOLDER_NAMES = ("train", "training", "val", "valid", "validation", "test", "testing")
NAMES_FILE = "classes.txt"
FINGERPRINT_VERSION = 1


# DataConfig keys added after the first release, with the value that outputs written before
# them (stores, training runs) were made with; a saved config without the key means this value.
LEGACY_DATA_DEFAULTS = {"exif_transpose": False}


class DataError(ValueError):
    """A data source is missing or malformed (wrong path, split, column or class-names file)."""


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from.

    ``source`` is an ImageFolder directory, a folder written by ``datasets``' ``save_to_disk``, or a
    name or path for ``datasets.load_dataset``. ``kind="auto"`` picks ``hf`` for ``save_to_disk``
    folders and for anything that is not a local directory, ``imagefolder`` for other directories.
    ``max_pixels`` (width * height) refuses larger images before they are decoded.
    ``exif_transpose`` turns each image as its EXIF orientation tag says (what a photo viewer
    shows); ``False`` keeps the raw pixels, as stores written before this option did.
    """

    source: str
    kind: Literal["auto", "imagefolder", "hf"] = "auto"
    split: str = "train"
    hf_config: str | None = None
    image_column: str = "image"
    label_column: str | None = "label"
    class_names_file: str | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    exif_transpose: bool = True

    def __post_init__(self) -> None:
        if not self.source:
            raise DataError("data source is empty; set source to an image folder or a dataset")
        if self.max_pixels < 1:
            raise DataError(f"max_pixels must be positive, got {self.max_pixels}")


@dataclass
class BadRecord:
    """One image that could not be used: its example id, where it lives and why it failed."""

    example_id: int
    where: str
    reason: str


@dataclass
class ImageBatch:
    """A batch of consecutive requested examples, bad images removed.

    ``example_ids`` and ``labels`` are (b,), ``pixel_values`` is (b, 3, H, W); ``b`` may be smaller
    than the batch size (even 0) when images in this slice were bad, which are listed in ``bad``.
    """

    example_ids: np.ndarray
    labels: np.ndarray
    pixel_values: torch.Tensor
    bad: list[BadRecord] = field(default_factory=list)


def _check_size(img: Image.Image, max_pixels: int) -> None:
    width, height = img.size
    if width * height > max_pixels:
        raise BadImage(
            f"{width}x{height} = {width * height} pixels exceeds max_pixels={max_pixels} "
            "(raise max_pixels if the image is genuine)"
        )


def _decoded_rgb(img: Image.Image, max_pixels: int, exif_transpose: bool) -> Image.Image:
    _check_size(img, max_pixels)
    img.load()
    if exif_transpose:
        img = ImageOps.exif_transpose(img)
    return to_rgb(img)


def load_rgb(
    image: str | os.PathLike | bytes | Image.Image,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    exif_transpose: bool = True,
) -> Image.Image:
    """Decode ``image`` (a path, encoded bytes or a PIL image) fully and return it as RGB.

    The size is checked from the header before any pixel is decoded; PIL's own decompression-bomb
    limit (``PIL.Image.MAX_IMAGE_PIXELS``) also applies. With ``exif_transpose`` the image is
    turned upright as its EXIF orientation tag says. Any failure raises :class:`BadImage`.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if isinstance(image, Image.Image):
                return _decoded_rgb(image, max_pixels, exif_transpose)
            stream = io.BytesIO(image) if isinstance(image, (bytes, bytearray)) else image
            with Image.open(stream) as img:
                return _decoded_rgb(img, max_pixels, exif_transpose)
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadImage(f"decompression bomb refused by PIL: {err}") from None
    except Image.UnidentifiedImageError:
        raise BadImage("not an image file PIL can identify") from None
    except Exception as err:
        raise BadImage(f"cannot decode: {type(err).__name__}: {err}") from None


def _canonical_hash(description: dict[str, Any]) -> str:
    text = json.dumps(description, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _read_names_file(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"class names file {path} does not exist; fix class_names_file")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class ImageSource:
    """An unshuffled list of images; the example id of an image is its index here.

    Attributes: ``fingerprint`` (sha256 hex of what the source holds), ``class_names`` (label id ->
    name, empty when unknown), ``labels`` (N,) int64 with -1 for unlabelled examples.
    """

    fingerprint: str
    class_names: list[str]
    labels: np.ndarray
    max_pixels: int
    exif_transpose: bool = True

    def __len__(self) -> int:
        return len(self.labels)

    def describe(self, i: int) -> str:
        """Where example ``i`` lives: a file path or ``name[split][i]``."""
        raise NotImplementedError

    def _raw(self, i: int) -> str | bytes | Image.Image:
        """The undecoded example ``i`` as accepted by :func:`load_rgb`."""
        raise NotImplementedError

    def load(self, i: int) -> Image.Image:
        """Example ``i`` decoded to RGB; raises :class:`BadImage` with the reason."""
        if not 0 <= i < len(self):
            raise IndexError(f"example id {i} out of range [0, {len(self)})")
        return load_rgb(self._raw(i), self.max_pixels, self.exif_transpose)


class FolderSource(ImageSource):
    """ImageFolder layout ``root[/split]/<class>/<file>``, or ``root[/split]/<file>`` unlabelled."""

    def __init__(self, cfg: DataConfig) -> None:
        root = Path(cfg.source).expanduser()
        if not root.is_dir():
            raise DataError(f"image folder {root} does not exist or is not a directory")
        split_dir = root / cfg.split
        resolved_split: str | None = cfg.split
        if not split_dir.is_dir():
            present = _subfolders(root)
            splits = [name for name in present if name.lower() in SPLIT_FOLDER_NAMES]
            if splits:
                raise DataError(
                    f"{root} has split folders {splits} but no {cfg.split!r}; "
                    "set split to one of them"
                )
            split_dir, resolved_split = root, None
        self.root = split_dir
        self.max_pixels = cfg.max_pixels
        self.exif_transpose = cfg.exif_transpose
        class_dirs = _subfolders(split_dir)
        top_files = _image_files(split_dir, recursive=False)
        if class_dirs and top_files:
            raise DataError(
                f"{split_dir} holds both class folders and image files ({top_files[0]}); "
                "put every image inside a class folder, or remove the folders for unlabelled data"
            )
        paths: list[str] = []
        labels: list[int] = []
        if class_dirs:
            for label, name in enumerate(class_dirs):
                files = _image_files(split_dir / name, recursive=True)
                paths += [f"{name}/{f}" for f in files]
                labels += [label] * len(files)
        else:
            paths = top_files
            labels = [-1] * len(paths)
        if not paths:
            raise DataError(
                f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found under {split_dir}; "
                "for a Hugging Face dataset (a hub clone with parquet or arrow files) set kind=hf"
            )
        self.paths = paths
        self.labels = np.asarray(labels, dtype=np.int64)
        self.class_names = self._class_names(cfg, root, split_dir, class_dirs)
        sizes = [_file_size(split_dir / p) for p in paths]
        self.fingerprint = _canonical_hash(
            {
                "version": FINGERPRINT_VERSION,
                "kind": "imagefolder",
                "split": resolved_split,
                "files": [[p, s] for p, s in zip(paths, sizes, strict=True)],
            }
        )

    @staticmethod
    def _class_names(
        cfg: DataConfig, root: Path, split_dir: Path, class_dirs: list[str]
    ) -> list[str]:
        if cfg.class_names_file is not None:
            names_path: Path | None = Path(cfg.class_names_file)
        else:
            candidates = [split_dir / NAMES_FILE, root / NAMES_FILE]
            names_path = next((p for p in candidates if p.is_file()), None)
        if names_path is None or not class_dirs:
            return list(class_dirs)
        names = _read_names_file(names_path)
        if len(names) != len(class_dirs):
            raise DataError(
                f"class names file {names_path} has {len(names)} names but {split_dir} has "
                f"{len(class_dirs)} class folders; give one name per line, in sorted folder order"
            )
        return names

    def describe(self, i: int) -> str:
        return str(self.root / self.paths[i])

    _raw = describe  # the undecoded example is its file path


def _file_size(path: Path) -> int:
    """The size of ``path`` in bytes; -1 when it cannot be read (a dangling symbolic link), so the
    listing goes on and loading it later reports a bad image."""
    try:
        return path.stat().st_size
    except OSError:
        return -1


def _subfolders(folder: Path) -> list[str]:
    """Sorted names of the sub-folders of ``folder``; hidden ones (``.name``) skipped."""
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _image_files(folder: Path, recursive: bool) -> list[str]:
    """Image files under ``folder`` as sorted POSIX paths relative to it; hidden files skipped."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")] if recursive else []
        rel = Path(dirpath).relative_to(folder)
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append((rel / name).as_posix())
    return sorted(found)


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


class HFSource(ImageSource):
    """A Hugging Face ``datasets`` split; images are decoded by :func:`load_rgb`."""

    def __init__(self, cfg: DataConfig) -> None:
        import datasets

        path = Path(cfg.source).expanduser()
        local = path.is_dir()
        try:
            if local and _is_saved_dataset(path):
                loaded = datasets.load_from_disk(str(path))
                if isinstance(loaded, datasets.DatasetDict):
                    if cfg.split not in loaded:
                        raise DataError(
                            f"{path} has splits {list(loaded)} but no {cfg.split!r}; "
                            "set split to one of them"
                        )
                    loaded = loaded[cfg.split]
                ds = loaded
            else:
                ds = datasets.load_dataset(cfg.source, cfg.hf_config, split=cfg.split)
        except DataError:
            raise
        except Exception as err:
            raise DataError(
                f"cannot open dataset {cfg.source!r} (config {cfg.hf_config!r}, split "
                f"{cfg.split!r}): {type(err).__name__}: {err}"
            ) from None
        columns = list(ds.column_names)
        if cfg.image_column not in columns:
            raise DataError(
                f"dataset {cfg.source!r} has no column {cfg.image_column!r}; "
                f"set image_column to one of {columns}"
            )
        if isinstance(ds.features[cfg.image_column], datasets.Image):
            ds = ds.cast_column(cfg.image_column, datasets.Image(decode=False))
        self.ds = ds
        self.name = cfg.source
        self.split = cfg.split
        self.image_column = cfg.image_column
        self.max_pixels = cfg.max_pixels
        self.exif_transpose = cfg.exif_transpose
        self.labels, self.class_names = self._labels(ds, cfg, columns)
        if cfg.class_names_file is not None:
            self.class_names = _read_names_file(Path(cfg.class_names_file))
        self.fingerprint = _canonical_hash(
            {
                "version": FINGERPRINT_VERSION,
                "kind": "hf",
                "name": path.resolve().name if local else cfg.source,
                "config": cfg.hf_config,
                "split": cfg.split,
                "image_column": cfg.image_column,
                "label_column": cfg.label_column,
                "dataset_fingerprint": ds._fingerprint,
            }
        )

    @staticmethod
    def _labels(ds: Any, cfg: DataConfig, columns: list[str]) -> tuple[np.ndarray, list[str]]:
        import datasets

        if cfg.label_column is None:
            return np.full(len(ds), -1, dtype=np.int64), []
        if cfg.label_column not in columns:
            raise DataError(
                f"dataset {cfg.source!r} has no column {cfg.label_column!r}; set label_column "
                f"(data.label_column on the command line) to one of {columns}, or "
                "data.label_column=null for unlabelled data"
            )
        values = ds.with_format("arrow")[cfg.label_column].to_numpy(zero_copy_only=False)
        feature = ds.features[cfg.label_column]
        if isinstance(feature, datasets.ClassLabel):
            return values.astype(np.int64), list(feature.names)
        if values.dtype.kind in "iu":
            return values.astype(np.int64), []
        if values.dtype.kind in "OU":
            names = sorted({str(v) for v in values})
            index = {name: i for i, name in enumerate(names)}
            return np.asarray([index[str(v)] for v in values], dtype=np.int64), names
        raise DataError(
            f"label column {cfg.label_column!r} has type {feature}; labels must be integers, "
            "class labels or strings"
        )

    def describe(self, i: int) -> str:
        return f"{self.name}[{self.split}][{i}]"

    def _raw(self, i: int) -> str | bytes | Image.Image:
        value = self.ds[int(i)][self.image_column]
        if isinstance(value, dict):
            if value.get("bytes"):
                return value["bytes"]
            if value.get("path"):
                return value["path"]
            raise BadImage("image entry has neither bytes nor a path")
        if isinstance(value, (str, bytes, Image.Image)):
            return value
        raise BadImage(f"image column holds {type(value).__name__}, not an image, bytes or path")


def open_images(cfg: DataConfig) -> ImageSource:
    """Open the images described by ``cfg`` (see :class:`DataConfig` for how ``kind`` is chosen)."""
    folder = check_local_folder(
        cfg.source, DataError, fix="pass the image folder (or dataset folder) that holds it"
    )
    kind = cfg.kind
    if kind == "auto":
        kind = "imagefolder" if folder is not None and not _is_saved_dataset(folder) else "hf"
    return FolderSource(cfg) if kind == "imagefolder" else HFSource(cfg)


def shuffled_order(n: int, seed: int | None) -> np.ndarray:
    """Example ids 0..n-1 in a seeded random order (identity when ``seed`` is None), int64 (n,).

    The permutation by ``keyed_rng(seed)`` of ``patchsae.data.shuffle``, i.e. ``PCG64(seed)``.
    """
    return seeded_order(n, seed)


class _Examples(torch.utils.data.Dataset):
    """Item j = (example id, label, RGB image or BadRecord, where) for ``example_ids[j]``."""

    def __init__(self, source: ImageSource, example_ids: np.ndarray) -> None:
        self.source = source
        self.example_ids = example_ids

    def __len__(self) -> int:
        return len(self.example_ids)

    def __getitem__(self, j: int) -> tuple[int, int, Image.Image | BadRecord, str]:
        i = int(self.example_ids[j])
        where = self.source.describe(i)
        try:
            image: Image.Image | BadRecord = self.source.load(i)
        except BadImage as err:
            image = BadRecord(example_id=i, where=where, reason=str(err))
        return i, int(self.source.labels[i]), image, where


@dataclass
class _Collate:
    """Preprocess the good images of a slice; list the bad ones. Runs in the loader workers.

    An image the preprocessor cannot handle (e.g. 1 x 3000 px, resized to zero width) is bad
    too: when the whole slice fails, its images are preprocessed one by one to find which. A
    :class:`BackboneError` (a processor unfit for the model) is not about one image and stops.
    """

    preprocess: Callable[[list[Image.Image]], torch.Tensor]

    def __call__(self, items: list[tuple[int, int, Image.Image | BadRecord, str]]) -> ImageBatch:
        good = [(i, label, img) for i, label, img, _ in items if isinstance(img, Image.Image)]
        try:
            pixels = [self.preprocess([img for _, _, img in good])] if good else []
        except BackboneError:
            raise
        except Exception:
            items, pixels = self._one_by_one(items)
            good = [(i, label, img) for i, label, img, _ in items if isinstance(img, Image.Image)]
        if not pixels:
            pixels = [self.preprocess([Image.new("RGB", (64, 64))])[:0]]
        return ImageBatch(
            example_ids=np.asarray([i for i, _, _ in good], dtype=np.int64),
            labels=np.asarray([label for _, label, _ in good], dtype=np.int64),
            pixel_values=torch.cat(pixels),
            bad=[img for _, _, img, _ in items if isinstance(img, BadRecord)],
        )

    def _one_by_one(
        self, items: list[tuple[int, int, Image.Image | BadRecord, str]]
    ) -> tuple[list[tuple[int, int, Image.Image | BadRecord, str]], list[torch.Tensor]]:
        """``items`` with the images the preprocessor refuses made BadRecords, and the pixels
        of the others (one (1, 3, H, W) tensor each)."""
        checked, pixels = [], []
        for i, label, img, where in items:
            if isinstance(img, Image.Image):
                try:
                    pixels.append(self.preprocess([img]))
                except BackboneError:
                    raise
                except Exception as err:
                    reason = (
                        f"the preprocessor cannot handle this {img.width}x{img.height} image "
                        f"({type(err).__name__}: {err})"
                    )
                    img = BadRecord(example_id=i, where=where, reason=reason)
            checked.append((i, label, img, where))
        return checked, pixels


def image_batches(
    source: ImageSource,
    example_ids: Sequence[int] | np.ndarray,
    preprocess: Callable[[list[Image.Image]], torch.Tensor],
    batch_size: int,
    num_workers: int = 0,
) -> Iterator[ImageBatch]:
    """Batches of ``example_ids`` in order, decoded and preprocessed in DataLoader workers.

    ``preprocess`` maps a list of RGB images to a (b, 3, H, W) tensor and must be picklable. Batch
    k covers ``example_ids[k * batch_size : (k + 1) * batch_size]`` minus its bad images.
    """
    ids = np.asarray(example_ids)
    if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
        raise ValueError(f"example_ids must be a 1-D integer array, got {ids.dtype} {ids.shape}")
    ids = ids.astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= len(source)):
        raise ValueError(
            f"example_ids must lie in [0, {len(source)}), got [{ids.min()}, {ids.max()}]"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    loader = torch.utils.data.DataLoader(
        _Examples(source, ids),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_Collate(preprocess),
    )
    return (batch for batch in loader)


def write_bad_report(records: list[BadRecord], path: str | os.PathLike) -> None:
    """Write ``records`` as a JSON list of {example_id, where, reason}, atomically."""
    write_json(path, [dataclasses.asdict(r) for r in records], indent=1)
