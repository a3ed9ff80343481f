"""Activation store on disk: a resumable shard writer and a memory-mapped reader.

Layout of a store folder (format described in ``docs/store.md``)::

    .lock                      locked (``lockf``) by the process writing the store
    metadata.json              plan + results; "complete": true once every shard is written
    example_ids.npy            (N,) int64, example id of each stored image, in store order
    labels.npy                 (N,) int64, its label (-1 when unlabelled)
    bad_images.json            images that could not be decoded, skipped
    shards/00000.json          per-shard entry: planned slice, kept ids/labels, bad images, files
    layer_<L>/00000.npy        (n_k, T, D) activations after block L of the images of shard k

Shards cover fixed slices of the planned example order. A shard becomes visible only when its
entry JSON is renamed into place, after all of its ``.npy`` files were; so a killed run leaves
either a complete shard or files that are rewritten on resume.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from patchsae.atomic import TMP_SUFFIX, atomic_file, fsync_dir, write_json
from patchsae.backbones import TokenLayout
from patchsae.checksum import file_checksum, file_problem
from patchsae.config import differing_keys, flatten
from patchsae.data.images import LEGACY_DATA_DEFAULTS, BadRecord, write_bad_report
from patchsae.lock import LOCK, FolderLock

FORMAT_VERSION = 1
METADATA = "metadata.json"
EXAMPLE_IDS = "example_ids.npy"
LABELS = "labels.npy"
BAD_IMAGES = "bad_images.json"
SHARD_DIR = "shards"
RESULT_KEYS = ("complete", "n_images", "n_bad", "shard_counts", "files", "devices", "checksums")
INDEX_FILES = (EXAMPLE_IDS, LABELS, BAD_IMAGES)
NAME_KEYS = ("backbone.name", "data.source", "data.class_names_file")
DTYPES = {"fp16": np.dtype("<f2"), "bf16": np.dtype("<u2"), "fp32": np.dtype("<f4")}


class StoreError(ValueError):
    """A store folder is missing, incomplete, of another format or configured differently."""


def layer_dir(layer: int) -> str:
    return f"layer_{layer}"


def shard_name(k: int) -> str:
    return f"{k:05d}"


def entry_path(root: Path, k: int) -> Path:
    """``root/shards/<k>.json``: the entry of shard ``k``."""
    return root / SHARD_DIR / f"{shard_name(k)}.json"


def shard_path(root: Path, layer: int, k: int) -> Path:
    """``root/layer_<layer>/<k>.npy``: the (n_k, T, D) activations of shard ``k`` at ``layer``."""
    return root / layer_dir(layer) / f"{shard_name(k)}.npy"


def to_storage(acts: torch.Tensor, dtype: str) -> np.ndarray:
    """``acts`` (any shape, any float dtype/device) as a CPU array in the storage ``dtype``.

    bf16 is stored as its raw 16 bits (uint16), since numpy has no bfloat16.
    """
    if dtype == "bf16":
        bits = acts.detach().to(torch.bfloat16).cpu().contiguous().view(torch.int16)
        return bits.numpy().view(np.uint16)
    torch_dtype = torch.float16 if dtype == "fp16" else torch.float32
    return acts.detach().to(torch_dtype).cpu().contiguous().numpy()


def from_storage(values: np.ndarray, dtype: str) -> np.ndarray:
    """Stored values as readable floats: bf16 bits become float32, other dtypes pass through."""
    if dtype == "bf16":
        return (np.asarray(values).astype(np.uint32) << 16).view(np.float32)
    return values


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_file(path) as f:
        np.save(f, array, allow_pickle=False)


def _read_metadata(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise StoreError(
            f"{path} is corrupt ({err}); the store cannot be read or resumed: extract it again "
            "into an empty --out"
        ) from None


@dataclass(frozen=True, kw_only=True)
class StoreMetadata:
    """``metadata.json`` of a store: the plan fixed before any image is processed (compared on
    resume), then, once written, the results (None until then; older stores lack some).

    ``to_dict`` / ``dump`` write the keys in the order below (plan, then the results that are
    set), as ``docs/store.md`` lists them; ``load`` / ``from_dict`` read them back. ``extract``
    sets every plan field; stores written from arrays (tests, benches) may leave the ones after
    ``dtype`` at their defaults.
    """

    format_version: int = FORMAT_VERSION
    backbone: dict[str, Any]
    layers: list[int]
    layers_requested: list[Any] | None = None
    token_layout: dict[str, Any]
    d_model: int
    n_tokens: int
    dtype: str
    data: dict[str, Any] = field(default_factory=dict)
    class_names: list[str] = field(default_factory=list)
    seed: int | None = None
    limit: int | None = None
    shard_images: int | None = None
    batch_size: int | None = None
    n_planned: int | None = None
    n_shards: int | None = None
    checksums: dict[str, str] | None = None
    complete: bool | None = None
    n_images: int | None = None
    n_bad: int | None = None
    shard_counts: list[int] | None = None
    files: dict[str, str] | None = None
    devices: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: every plan key, then the results that are set."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name not in RESULT_KEYS or value is not None:
                out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = METADATA) -> StoreMetadata:
        """The metadata of the JSON object ``data``; unknown or missing keys are a StoreError."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        missing = sorted(
            f.name
            for f in dataclasses.fields(cls)
            if f.default is f.default_factory is dataclasses.MISSING and f.name not in data
        )
        if unknown or missing:
            raise StoreError(
                f"{source} is not store metadata (unknown keys {unknown}, missing keys "
                f"{missing}); extract the store again with this version"
            )
        return cls(**data)

    @classmethod
    def load(cls, path: str | os.PathLike) -> StoreMetadata:
        """The metadata in the file ``path``."""
        return cls.from_dict(_read_metadata(Path(path)), str(path))

    def dump(self, path: str | os.PathLike) -> None:
        """Write ``path`` atomically, as the store writer does (one key per line, indent 1)."""
        write_json(Path(path), self.to_dict(), indent=1)

    @property
    def layout(self) -> TokenLayout:
        return TokenLayout.from_dict(self.token_layout)


def _complete_entry(
    root: Path, k: int, layers: Sequence[int], verify: bool | dict = False
) -> tuple[dict[str, Any], None] | tuple[None, str]:
    """``(entry, None)`` when shard ``k`` of the store ``root`` is complete on disk, else
    ``(None, why)``.

    Complete: its entry JSON is readable and lists exactly ``layers``, each file existing with
    the recorded size and, with ``verify``, the recorded checksum (entries written before
    checksums existed are checked for size only). ``verify`` may be a dict: it then keeps the
    checksum results by (file, size, mtime), so a file unchanged since is not read again.
    """
    path = entry_path(root, k)
    if not path.is_file():
        return None, f"shard entry {path.relative_to(root)} is missing"
    try:
        entry = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None, f"shard entry {path.relative_to(root)} is corrupt"
    files = entry.get("files", {}) if isinstance(entry, dict) else {}
    if not isinstance(files, dict) or sorted(files) != sorted(str(layer) for layer in layers):
        return None, f"shard entry {path.relative_to(root)} lists layers {sorted(files)}"
    for info in files.values():
        file = root / info["path"]
        if not file.is_file():
            return None, f"shard file {info['path']} is missing"
        if file.stat().st_size != info["bytes"]:
            return None, (
                f"shard file {info['path']} has {file.stat().st_size} bytes, "
                f"{info['bytes']} expected"
            )
        problem = None
        if verify is not False:
            stat = file.stat()
            key = (str(file), stat.st_size, stat.st_mtime_ns)
            cache = verify if isinstance(verify, dict) else {}
            if key not in cache:
                cache[key] = file_problem(file, info.get("checksum"))
            problem = cache[key]
        if problem is not None:
            return None, f"shard file {info['path']} {problem}"
    return entry, None


def shard_problem(root: Path, k: int, layers: Sequence[int], verify: bool = False) -> str | None:
    """Why shard ``k`` of the store ``root`` is not complete on disk, or None when it is;
    ``verify`` also compares the shard files' checksums (reads every byte)."""
    return _complete_entry(root, k, layers, verify)[1]


def index_problem(root: Path, metadata: dict[str, Any]) -> str | None:
    """Why the index files of a complete store do not hold what ``metadata`` recorded, or None.

    Stores written before checksums existed are checked for presence only.
    """
    recorded = metadata.get("checksums") or {}
    for name in INDEX_FILES:
        problem = file_problem(root / name, recorded.get(name))
        if problem is not None:
            return f"{name} {problem}"
    return None


def verify_store(root: str | os.PathLike) -> list[str]:
    """Every problem of the store folder ``root``, reading every byte: metadata, index files,
    each shard's entry, size and checksum. An empty list: the store is intact."""
    root = Path(root)
    metadata = _read_metadata(root / METADATA)
    if not metadata.get("complete"):
        return [f"{root} is incomplete: rerun the extract command that writes it"]
    problems = [index_problem(root, metadata)]
    problems += [
        shard_problem(root, k, metadata["layers"], verify=True)
        for k in range(len(metadata["shard_counts"]))
    ]
    return [p for p in problems if p is not None]


class ShardWriter:
    """Collects the activations of one shard, straight into memory-mapped temporary ``.npy`` files.

    ``append`` takes the kept images of consecutive batches; ``commit`` renames the files into place
    and then writes the shard entry. Files are sized for ``n_planned`` images; when bad images were
    dropped the kept rows are copied into a smaller file at commit.
    """

    def __init__(
        self,
        root: Path,
        index: int,
        n_planned: int,
        layers: Sequence[int],
        n_tokens: int,
        d_model: int,
        dtype: str,
    ) -> None:
        self.root, self.index, self.dtype = root, index, dtype
        self.n_rows = 0
        self.arrays: dict[int, np.ndarray] = {}
        for layer in layers:
            path = shard_path(self.root, layer, self.index)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._rows_tmp(path)
            shape = (n_planned, n_tokens, d_model)
            self.arrays[layer] = np.lib.format.open_memmap(
                tmp, mode="w+", dtype=DTYPES[dtype], shape=shape
            )

    @staticmethod
    def _rows_tmp(path: Path) -> Path:
        return path.with_name(path.name + ".rows" + TMP_SUFFIX)

    def append(self, values: dict[int, np.ndarray]) -> None:
        """Append a batch: ``values[layer]`` is (b, T, D) for every layer of the shard, already in
        the storage dtype (as :func:`to_storage` returns it), so it is copied without conversion.
        """
        arrays = {layer: np.asarray(v) for layer, v in values.items()}
        sizes = {int(a.shape[0]) for a in arrays.values()}
        if len(sizes) != 1 or set(arrays) != set(self.arrays):
            raise StoreError(f"shard batch must hold the layers {sorted(self.arrays)} of one size")
        expected = DTYPES[self.dtype]
        wrong = sorted(str(a.dtype) for a in arrays.values() if a.dtype != expected)
        if wrong:
            raise StoreError(
                f"shard batch holds {wrong[0]} values, a {self.dtype} store takes {expected}: "
                f"convert them with to_storage(acts, {self.dtype!r})"
            )
        b = sizes.pop()
        for layer, array in arrays.items():
            self.arrays[layer][self.n_rows : self.n_rows + b] = array
        self.n_rows += b

    def commit(self, entry: dict[str, Any]) -> dict[str, Any]:
        """Move the shard's files into place, then write its entry; returns the entry written."""
        files = {}
        for layer, array in self.arrays.items():
            path = shard_path(self.root, layer, self.index)
            tmp = self._rows_tmp(path)
            if self.n_rows == array.shape[0]:
                array.flush()
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            else:
                atomic_save_npy(path, np.asarray(array[: self.n_rows]))
                tmp.unlink()
            files[str(layer)] = {
                "path": path.relative_to(self.root).as_posix(),
                "bytes": path.stat().st_size,
                "checksum": file_checksum(path),
            }
        for layer in self.arrays:  # the renamed shard files stay after a power cut
            fsync_dir(shard_path(self.root, layer, self.index).parent)
        self.arrays = {}
        entry = {**entry, "shard": self.index, "n_images": self.n_rows, "files": files}
        path = entry_path(self.root, self.index)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, entry, indent=1)
        fsync_dir(path.parent)
        return entry


class StoreWriter:
    """Creates or resumes a store folder for a fixed ``plan`` (the metadata known before the run).

    Opening a folder that holds a store of another plan raises :class:`StoreError` naming the keys
    that differ. While the writer is open, the folder is locked (``patchsae.lock.FolderLock``):
    a second writer on the same folder, in this process or another, is refused.

    ``attach=True`` joins a store that another process of the same ``torchrun`` extraction (rank
    0) has opened, checked and locked: no lock and no folder check; the plan is read back from its
    ``metadata.json``, so every rank writes with the plan rank 0 resumed.
    """

    def __init__(
        self, root: str | os.PathLike, plan: StoreMetadata, *, attach: bool = False
    ) -> None:
        self.root = Path(root)
        self.plan = plan.to_dict()
        self._folder_lock: FolderLock | None = None
        self._verified: dict[tuple[str, int, int], str | None] = {}  # checksum results
        self.damage: str | None = None  # why a complete store had to be reopened
        if attach:
            existing = _read_metadata(self.root / METADATA)
            self.plan = {k: v for k, v in existing.items() if k not in RESULT_KEYS}
            self.complete = False
            return
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"--out {self.root} is a file, not a folder; pass a store folder")
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            self.complete = self._check_folder()
        except BaseException:
            self.close()
            raise

    def _lock(self) -> None:
        busy = StoreError(
            f"another process (or another writer in this process) is writing to {self.root}; "
            "wait for it or use another --out"
        )
        self._folder_lock = FolderLock(self.root, busy)

    def _check_folder(self) -> bool:
        """Compare with or create ``metadata.json``; True when the store is complete on disk."""
        meta_path = self.root / METADATA
        if not meta_path.is_file():
            leftovers = [p.name for p in self.root.iterdir() if p.name != LOCK]
            if leftovers:
                raise StoreError(
                    f"{self.root} is not empty ({', '.join(sorted(leftovers)[:5])}) and holds no "
                    f"{METADATA}; use a new --out or an empty folder"
                )
            write_json(meta_path, {**self.plan, "complete": False}, indent=1)
            return False
        existing = _read_metadata(meta_path)
        previous = {k: v for k, v in existing.items() if k not in RESULT_KEYS}
        diff = differing_keys(previous, self.plan)
        legacy = {f"data.{k}" for k in LEGACY_DATA_DEFAULTS if k not in previous.get("data", {})}
        if diff and set(diff) <= legacy:
            # written before these options existed: resumed as it was made (see data_option)
            self.plan, diff = previous, []
        if diff and set(diff) <= set(NAME_KEYS):
            flat = flatten(previous)
            was = ", ".join(f"{k}={flat.get(k)!r}" for k in diff)
            raise StoreError(
                f"{self.root} holds a store of the same model and images under other paths or "
                f"names ({was}); rerun with the original options to resume or reuse it"
            )
        if diff:
            raise StoreError(
                f"{self.root} holds a store made with a different configuration "
                f"(differs in: {', '.join(diff)}); use a new --out or delete that folder"
            )
        complete = bool(existing.get("complete"))
        n_shards = len(existing.get("shard_counts", []))
        if complete:
            problems = [index_problem(self.root, existing)]
            problems += [self._shard_problem(k) for k in range(n_shards)]
            damaged = [p for p in problems if p is not None]
            if damaged:
                self.damage = damaged[0]
                write_json(meta_path, {**self.plan, "complete": False}, indent=1)
                complete = False
        if not complete:
            for tmp in self.root.rglob(f"*{TMP_SUFFIX}"):
                tmp.unlink()
        return complete

    def close(self) -> None:
        """Release the lock (idempotent)."""
        if self._folder_lock is not None:
            self._folder_lock.release()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def data_option(self, key: str) -> Any:
        """The store's ``data.<key>``; a store written before ``key`` existed gives the legacy
        value it was made with (``LEGACY_DATA_DEFAULTS``)."""
        return self.plan["data"].get(key, LEGACY_DATA_DEFAULTS.get(key))

    def _shard_problem(self, k: int) -> str | None:
        """Why shard ``k`` is not complete and intact (an unchanged file is hashed once)."""
        return _complete_entry(self.root, k, self.plan["layers"], verify=self._verified)[1]

    def shard_entry(self, k: int) -> dict[str, Any] | None:
        """The entry of shard ``k`` if the shard is complete on disk: files exist with the
        recorded sizes and checksums (damaged shards are recomputed)."""
        return _complete_entry(self.root, k, self.plan["layers"], verify=self._verified)[0]

    def shard(self, k: int, n_planned: int) -> ShardWriter:
        """A writer for shard ``k`` sized for ``n_planned`` images."""
        p = self.plan
        return ShardWriter(
            self.root, k, n_planned, p["layers"], p["n_tokens"], p["d_model"], p["dtype"]
        )

    def finalize(self, entries: list[dict[str, Any]], bad: list[BadRecord]) -> Path:
        """Write the index files, ``bad_images.json`` and the complete ``metadata.json``.

        ``devices`` in the metadata lists the device types named by the entries' ``device``.
        """
        ids = [np.asarray(e["example_ids"], dtype=np.int64) for e in entries]
        labels = [np.asarray(e["labels"], dtype=np.int64) for e in entries]
        atomic_save_npy(self.root / EXAMPLE_IDS, np.concatenate(ids) if ids else np.zeros(0, int))
        atomic_save_npy(self.root / LABELS, np.concatenate(labels) if labels else np.zeros(0, int))
        write_bad_report(bad, self.root / BAD_IMAGES)
        results = {
            "checksums": {name: file_checksum(self.root / name) for name in INDEX_FILES},
            "complete": True,
            "n_images": int(sum(e["n_images"] for e in entries)),
            "n_bad": len(bad),
            "shard_counts": [int(e["n_images"]) for e in entries],
            "files": {"example_ids": EXAMPLE_IDS, "labels": LABELS, "bad_images": BAD_IMAGES},
            "devices": sorted({str(e["device"]) for e in entries if "device" in e}),
        }
        write_json(self.root / METADATA, {**self.plan, **results}, indent=1)
        self.complete = True
        return self.root


def _load_npy(root: Path, name: str | Path, mmap: bool = False) -> np.ndarray:
    """``root/name`` read (or memory-mapped) by numpy; an unreadable file is a StoreError."""
    try:
        return np.load(root / name, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise StoreError(
            f"{root} is damaged: {Path(name).as_posix()} is not a readable .npy file ({err}); "
            "rerun the same extract command, which recomputes it"
        ) from None


class ActivationStore:
    """A complete store, read through memory maps (nothing is loaded up front).

    ``store[i]`` is the (T, D) activation of image ``i`` in store order at the first layer
    (stored dtype; float32 for bf16 stores); ``get(i, layer)`` picks a layer.
    """

    def __init__(self, root: Path, metadata: dict[str, Any]) -> None:
        self.root = root
        self.metadata = metadata
        self.meta = StoreMetadata.from_dict(metadata, str(root / METADATA))
        self.layers: list[int] = list(self.meta.layers)
        self.dtype: str = self.meta.dtype
        self.d_model: int = int(self.meta.d_model)
        self.n_tokens: int = int(self.meta.n_tokens)
        self.token_layout = self.meta.layout
        counts = np.asarray(self.meta.shard_counts, dtype=np.int64)
        self.shard_counts = counts
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        problem = index_problem(root, metadata)
        if problem is not None:
            raise StoreError(
                f"{root} is damaged: {problem}; rerun the same extract command, which rewrites it"
            )
        self.example_ids = _load_npy(root, EXAMPLE_IDS)
        self.labels = _load_npy(root, LABELS)
        self._maps: dict[tuple[int, int], np.ndarray] = {}
        if len(self.example_ids) != self.offsets[-1] or len(self.labels) != self.offsets[-1]:
            raise StoreError(f"{root}: index files do not match the shard counts; re-extract it")

    @classmethod
    def open(cls, root: str | os.PathLike) -> ActivationStore:
        """Open the store folder ``root``.

        Refuses unknown formats, incomplete stores and stores whose shard files are missing or
        of another size than recorded in their shard entries.
        """
        root = Path(root)
        meta_path = root / METADATA
        if not meta_path.is_file():
            raise StoreError(f"{root} is not an activation store (no {METADATA}); run extract")
        metadata = _read_metadata(meta_path)
        version = metadata.get("format_version")
        if version != FORMAT_VERSION:
            raise StoreError(
                f"{root} has store format_version {version}, this patchsae reads version "
                f"{FORMAT_VERSION}; re-extract it with this version"
            )
        if not metadata.get("complete"):
            raise StoreError(
                f"{root} is incomplete (extraction was interrupted); rerun the same extract "
                "command to finish it"
            )
        for k in range(len(metadata["shard_counts"])):
            problem = shard_problem(root, k, metadata["layers"])
            if problem is not None:
                raise StoreError(
                    f"{root} is damaged: {problem}; rerun the same extract command, which "
                    "recomputes the missing shards"
                )
        return cls(root, metadata)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def resolve_layer(self, layer: int | None) -> int:
        """A stored layer: ``None`` is the first, negative values count from the backbone's end."""
        if layer is None:
            return self.layers[0]
        n_layers = int(self.metadata["backbone"]["n_layers"])
        resolved = layer + n_layers if layer < 0 else layer
        if resolved not in self.layers:
            raise StoreError(f"layer {layer} is not in this store; stored layers: {self.layers}")
        return resolved

    def _map(self, layer: int, k: int) -> np.ndarray:
        key = (layer, k)
        if key not in self._maps:
            path = shard_path(self.root, layer, k)
            self._maps[key] = _load_npy(self.root, path.relative_to(self.root), mmap=True)
        return self._maps[key]

    def _locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"image {i} out of range [0, {len(self)})")
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return k, i - int(self.offsets[k])

    def get(self, i: int, layer: int | None = None) -> np.ndarray:
        """(T, D) activations of image ``i`` (store order) at ``layer``."""
        i = int(i) + len(self) if int(i) < 0 else int(i)
        k, j = self._locate(i)
        return from_storage(self._map(self.resolve_layer(layer), k)[j], self.dtype)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def images(self, start: int, stop: int, layer: int | None = None) -> np.ndarray:
        """(stop - start, T, D) activations of images [start, stop) at ``layer``.

        fp32/fp16 stores: a memory-mapped view when the range lies in one shard, else a copy in
        the stored dtype. bf16 stores: always a float32 copy (the bits are converted).
        """
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"images [{start}, {stop}) out of range [0, {len(self)}]")
        layer = self.resolve_layer(layer)
        parts = []
        k = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while start < stop:
            end = min(stop, int(self.offsets[k + 1]))
            base = int(self.offsets[k])
            if end > start:
                parts.append(self._map(layer, k)[start - base : end - base])
            start, k = end, k + 1
        if not parts:
            return np.zeros((0, self.n_tokens, self.d_model), dtype=np.float32)
        out = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return from_storage(out, self.dtype)

    def take(
        self, indices: np.ndarray, layer: int | None = None, tokens: slice = slice(None)
    ) -> np.ndarray:
        """(n, t, D) float32 activations of the images ``indices`` (sorted, unique, store order).

        Reads one fancy-indexed slice per shard; ``tokens`` selects token positions.
        """
        indices = np.asarray(indices, dtype=np.int64)
        layer = self.resolve_layer(layer)
        shard_of = np.searchsorted(self.offsets, indices, side="right") - 1
        parts = []
        for k in np.unique(shard_of):
            local = indices[shard_of == k] - self.offsets[k]
            mm = self._map(layer, int(k))
            lo, hi = int(local[0]), int(local[-1]) + 1
            rows = mm[lo:hi, tokens] if hi - lo == len(local) else mm[local, tokens]
            parts.append(from_storage(rows, self.dtype))
        if not parts:
            return np.zeros((0, 0, self.d_model), dtype=np.float32)
        return np.concatenate(parts, dtype=np.float32)
