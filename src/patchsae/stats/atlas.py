"""The atlas folder (format in ``docs/atlas.md``) and :class:`Atlas`, its memory-mapped reader.

::

    ATLAS/
      atlas.json                 format, SAE, backbone, layer, token layout (written once)
      datasets/<name>/
        dataset.json             source, options, counts, files and their checksums;
                                 "complete": true when usable
        <array>.npy              one file per statistic (see FILES)
        .partial/                resume state while ``stats`` runs

Queries read only the rows they need: every array is opened with ``np.load(mmap_mode="r")``
and checked for shape and dtype; :meth:`Atlas.problems` (``patchsae verify``) reads every byte
against the checksums recorded when the arrays were written.
"""

from __future__ import annotations

import json
import os
import re
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from patchsae.backbones import TokenLayout
from patchsae.checksum import file_problem
from patchsae.stats.accumulate import StatsError
from patchsae.stats.views import render_mask, upsample_grid

FORMAT = "patchsae-atlas"
FORMAT_VERSION = 1
ATLAS_JSON = "atlas.json"
DATASETS = "datasets"
DATASET_JSON = "dataset.json"
PARTIAL = ".partial"
FILES_NAME = "{}.npy"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")

# name -> (shape in terms of m = d_sae, k = top_k, c = n_classes, dtype)
FILES: dict[str, tuple[str, str]] = {
    "image_freq": ("(m,)", "float64"),
    "cls_token_freq": ("(m,)", "float64"),
    "patch_token_freq": ("(m,)", "float64"),
    "mean_act_fired": ("(m,)", "float64"),
    "mean_act": ("(m,)", "float64"),
    "image_fire_count": ("(m,)", "int64"),
    "label_entropy": ("(m,)", "float64"),
    "dataset_counts": ("(m,)", "int64"),
    "top_values": ("(m, k)", "float32"),
    "top_index": ("(m, k)", "int64"),
    "top_example_ids": ("(m, k)", "int64"),
    "top_labels": ("(m, k)", "int64"),
    "class_counts": ("(c, m)", "int64"),
    "class_mean_act": ("(c, m)", "float32"),
    "class_images": ("(c,)", "int64"),
    "top_thumb": ("(m, k)", "int64"),
    "top_grids": ("(m, k, gh, gw)", "float16"),
    "thumbs": ("(n_thumbs, th, tw, 3)", "uint8"),
    "thumb_example_ids": ("(n_thumbs,)", "int64"),
}


def check_name(name: str) -> str:
    """A dataset name usable as a folder name (letters, digits, ``_.-``)."""
    if not NAME_RE.match(name):
        raise StatsError(
            f"dataset name {name!r} must be 1-100 letters, digits, '_', '.' or '-' (starting with "
            "a letter or digit); pass name=..."
        )
    return name


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StatsError(f"{path} is not readable JSON ({err}); {what}") from None
    if not isinstance(data, dict):
        raise StatsError(f"{path} must hold a JSON object; {what}")
    return data


def top_latents(values_m: np.ndarray | torch.Tensor, k: int = 10) -> list[tuple[int, float]]:
    """The ``k`` largest entries of (m,) values as ``(latent, value)``, ties to the lower id;
    only entries > 0."""
    values = np.asarray(values_m, dtype=np.float64)
    order = np.lexsort((np.arange(len(values)), -values))[:k]
    return [(int(j), float(values[j])) for j in order if values[j] > 0]


def image_latents(
    codes_tm: np.ndarray | torch.Tensor,
    layout: TokenLayout,
    *,
    patch: int | None = None,
    include_cls: bool = True,
    k: int = 10,
) -> list[tuple[int, float]]:
    """Top latents of one image from its codes (T, d_sae): by image-level (mean) activation, or
    of patch ``patch`` (row-major index in ``layout.grid``) when given."""
    codes = np.asarray(codes_tm, dtype=np.float64)
    if patch is not None:
        if not 0 <= patch < layout.n_patches:
            raise StatsError(f"patch {patch} is outside the {layout.grid} grid")
        return top_latents(codes[layout.patch_start + patch], k)
    from patchsae.stats.accumulate import token_set

    return top_latents(codes[token_set(layout, include_cls)].mean(0), k)


def _check_dataset_meta(path: Path, meta: dict[str, Any]) -> None:
    """Refuse a ``dataset.json`` without the keys and types queries rely on."""
    ok = (
        isinstance(meta.get("name"), str)
        and isinstance(meta.get("files"), dict)
        and isinstance(meta.get("class_names"), list)
        and isinstance(meta.get("has_labels"), bool)
        and isinstance(meta.get("n_images"), int)
        and isinstance(meta.get("options"), dict)
        and isinstance(meta["options"].get("top_k"), int)
    )
    if not ok:
        raise StatsError(f"{path} lacks keys of format {FORMAT_VERSION}; rerun patchsae stats")


class AtlasDataset:
    """One dataset of an atlas: statistics as memory-mapped arrays, thumbnails, masks."""

    def __init__(self, root: Path, meta: dict[str, Any], d_sae: int) -> None:
        self.root, self.meta, self.d_sae = root, meta, d_sae
        self.name: str = meta["name"]
        self.class_names: list[str] = list(meta.get("class_names", []))
        self._maps: dict[str, np.ndarray] = {}

    def __repr__(self) -> str:
        return f"AtlasDataset({self.name!r}, n_images={self.meta['n_images']})"

    def array(self, name: str) -> np.ndarray:
        """The memory-mapped array ``name`` (one of ``FILES``)."""
        if name not in self._maps:
            file = self.meta["files"].get(name)
            if file is None:
                raise StatsError(f"dataset {self.name!r} has no {name!r} array")
            if file != f"{name}.npy":
                raise StatsError(
                    f"{self.root / DATASET_JSON} names {file!r} for {name!r}, not {name}.npy; "
                    "the atlas is damaged: rerun patchsae stats"
                )
            path = self.root / file
            try:
                array = np.load(path, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError, EOFError) as err:
                raise StatsError(
                    f"{path} is not a readable .npy array ({err}); rerun patchsae stats"
                ) from None
            self._check_shape(name, array)
            self._maps[name] = array
        return self._maps[name]

    def problems(self) -> list[str]:
        """Every file of the dataset against its recorded checksum (datasets written before
        checksums: readability only), and every array's shape and dtype."""
        recorded = self.meta.get("checksums") or {}
        out = []
        for name, file in sorted(self.meta["files"].items()):
            problem = file_problem(self.root / file, recorded.get(name))
            if problem is not None:
                out.append(f"{self.root / file} {problem}; rerun patchsae stats for {self.name!r}")
            elif name in FILES:
                try:
                    self.array(name)
                except StatsError as err:
                    out.append(str(err))
        return out

    def _check_shape(self, name: str, array: np.ndarray) -> None:
        """Refuse an array whose shape or dtype differs from ``FILES`` (a damaged atlas)."""
        spec, dtype = FILES[name]
        sizes = {
            "m": self.d_sae,
            "k": self.meta["options"]["top_k"],
            "c": len(self.class_names),
        }
        dims = [d.strip() for d in spec.strip("()").split(",") if d.strip()]
        want = [sizes.get(d) for d in dims]
        if (
            array.dtype != np.dtype(dtype)
            or array.ndim != len(dims)
            or any(w is not None and w != n for w, n in zip(want, array.shape, strict=True))
        ):
            raise StatsError(
                f"{self.root / FILES_NAME.format(name)} is {array.dtype} {array.shape}, expected "
                f"{dtype} {spec} with m={self.d_sae}; the atlas is damaged: rerun patchsae stats"
            )

    def class_name(self, label: int) -> str | None:
        return self.class_names[label] if 0 <= label < len(self.class_names) else None

    def latent(self, j: int, n_classes: int = 5) -> dict[str, Any]:
        """Statistics of latent ``j``: frequencies, mean activations, label entropy, top classes
        (by class counts) and its reference images."""
        refs = [
            {
                "slot": s,
                "index": int(self.array("top_index")[j, s]),
                "example_id": int(self.array("top_example_ids")[j, s]),
                "label": int(self.array("top_labels")[j, s]),
                "class_name": self.class_name(int(self.array("top_labels")[j, s])),
                "value": float(self.array("top_values")[j, s]),
            }
            for s in range(self.meta["options"]["top_k"])
            if self.array("top_index")[j, s] >= 0
        ]
        out = {
            "latent": int(j),
            "dataset": self.name,
            **{
                key: float(self.array(key)[j])
                for key in (
                    "image_freq",
                    "cls_token_freq",
                    "patch_token_freq",
                    "mean_act_fired",
                    "mean_act",
                    "label_entropy",
                )
            },
            "dataset_count": int(self.array("dataset_counts")[j]),
            "references": refs,
        }
        if self.meta["has_labels"]:
            counts = np.asarray(self.array("class_counts")[:, j])
            out["top_classes"] = [
                {"label": c, "class_name": self.class_name(c), "count": int(v)}
                for c, v in top_latents(counts, n_classes)
            ]
        return out

    def class_latents(
        self, label: int, k: int = 10, by: str = "class_counts"
    ) -> list[tuple[int, float]]:
        """Top latents of class ``label`` by ``class_counts`` or ``class_mean_act``."""
        if not self.meta["has_labels"]:
            raise StatsError(f"dataset {self.name!r} has no labels, so no class statistics")
        if not 0 <= label < len(self.class_names):
            raise StatsError(f"class {label} is outside 0..{len(self.class_names) - 1}")
        if by not in ("class_counts", "class_mean_act"):
            raise StatsError(f"by must be 'class_counts' or 'class_mean_act', got {by!r}")
        return top_latents(self.array(by)[label], k)

    def class_rankings(self, by: str = "class_counts") -> np.ndarray:
        """(n_classes, d_sae) int64: latent ids per class, most active first (ties: lower id)."""
        values = np.asarray(self.array(by), dtype=np.float64)
        ids = np.broadcast_to(np.arange(values.shape[1]), values.shape)
        return np.lexsort((ids, -values), axis=-1).astype(np.int64)

    def dataset_ranking(self) -> np.ndarray:
        """(d_sae,) int64: latent ids by dataset-level counts, largest first (ties: lower id)."""
        counts = np.asarray(self.array("dataset_counts"), dtype=np.float64)
        return np.lexsort((np.arange(len(counts)), -counts)).astype(np.int64)

    def low_entropy(self, max_entropy: float = 0.0, min_refs: int = 2) -> list[int]:
        """Latents whose references are dominated by one class: defined label entropy <=
        ``max_entropy`` over at least ``min_refs`` references, lowest entropy first."""
        entropy = np.asarray(self.array("label_entropy"))
        n_refs = (np.asarray(self.array("top_index")) >= 0).sum(1)
        ok = np.flatnonzero((entropy >= 0) & (entropy <= max_entropy) & (n_refs >= min_refs))
        return [int(j) for j in ok[np.lexsort((ok, entropy[ok]))]]

    def dense(self, min_freq: float = 0.5) -> list[int]:
        """Latents firing on at least ``min_freq`` of the images, most frequent first."""
        freq = np.asarray(self.array("image_freq"))
        ok = np.flatnonzero(freq >= min_freq)
        return [int(j) for j in ok[np.lexsort((ok, -freq[ok]))]]

    def thumbnail(self, j: int, slot: int, mask: str | None = None) -> np.ndarray:
        """(th, tw, 3) uint8 thumbnail of reference ``slot`` of latent ``j`` (the model's view),
        with its mask drawn in style ``heat`` or ``darken`` when ``mask`` is given."""
        if "thumbs" not in self.meta["files"]:
            raise StatsError(f"dataset {self.name!r} was computed without thumbnails")
        row = int(self.array("top_thumb")[j, slot])
        if row < 0:
            raise StatsError(f"latent {j} has no reference in slot {slot}")
        image = np.asarray(self.array("thumbs")[row])
        if mask is None:
            return image
        return render_mask(image, self.mask(j, slot, image.shape[1::-1]), mask)

    def mask(self, j: int, slot: int, size_wh: tuple[int, int] | None = None) -> np.ndarray:
        """Activation of latent ``j`` over the patch grid of reference ``slot``: (gh, gw) float32,
        or spread over a ``size_wh`` picture of the model's view."""
        grid = np.asarray(self.array("top_grids")[j, slot], dtype=np.float32)
        return grid if size_wh is None else upsample_grid(grid, size_wh)


class Atlas:
    """An atlas folder opened for queries (nothing is read until asked for)."""

    def __init__(self, root: Path, meta: dict[str, Any]) -> None:
        self.root, self.meta = root, meta
        self.d_sae: int = int(meta["sae"]["d_sae"])
        self.token_layout = TokenLayout.from_dict(meta["token_layout"])

    @classmethod
    def open(cls, root: str | os.PathLike) -> Atlas:
        """Open the atlas folder ``root``; refuses unknown formats."""
        root = Path(root)
        path = root / ATLAS_JSON
        if not path.is_file():
            raise StatsError(
                f"{root} is not an atlas (no {ATLAS_JSON}); build one with patchsae stats"
            )
        meta = read_json(path, "rebuild the atlas with patchsae stats")
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise StatsError(
                f"{path} is format {meta.get('format')!r} version {meta.get('format_version')!r}; "
                f"this patchsae reads {FORMAT!r} version {FORMAT_VERSION}"
            )
        return cls(root, meta)

    def __repr__(self) -> str:
        return f"Atlas({str(self.root)!r}, d_sae={self.d_sae}, datasets={list(self.datasets)})"

    @cached_property
    def datasets(self) -> dict[str, AtlasDataset]:
        """Complete datasets by name, sorted by name."""
        out = {}
        folder = self.root / DATASETS
        for path in sorted(folder.glob(f"*/{DATASET_JSON}")) if folder.is_dir() else []:
            meta = read_json(path, "rerun patchsae stats for this dataset")
            if meta.get("complete") is True:
                _check_dataset_meta(path, meta)
                out[meta["name"]] = AtlasDataset(path.parent, meta, self.d_sae)
        return out

    def problems(self) -> list[str]:
        """Every problem of the atlas's complete datasets (see ``AtlasDataset.problems``) and
        each dataset left incomplete by an interrupted ``stats`` run."""
        out = []
        for path in sorted((self.root / DATASETS).glob(f"*/{DATASET_JSON}")):
            try:
                complete = read_json(path, "rerun patchsae stats").get("complete") is True
            except StatsError as err:
                out.append(str(err))
                continue
            if not complete:
                out.append(f"{path.parent} is incomplete (stats was interrupted); rerun it")
        try:
            for dataset in self.datasets.values():
                out += dataset.problems()
        except StatsError as err:
            out.append(str(err))
        return out

    def dataset(self, name: str | None = None) -> AtlasDataset:
        """The dataset ``name`` (the only one when None)."""
        if name is None:
            if len(self.datasets) != 1:
                raise StatsError(
                    f"the atlas holds datasets {list(self.datasets)}; name one (dataset=...)"
                )
            return next(iter(self.datasets.values()))
        if name not in self.datasets:
            raise StatsError(
                f"no complete dataset {name!r} in the atlas; it has {list(self.datasets)}"
            )
        return self.datasets[name]

    def latent(self, j: int) -> dict[str, Any]:
        """Statistics of latent ``j`` in every dataset of the atlas."""
        if not 0 <= j < self.d_sae:
            raise StatsError(f"latent {j} is outside 0..{self.d_sae - 1}")
        return {"latent": j, "datasets": [ds.latent(j) for ds in self.datasets.values()]}
