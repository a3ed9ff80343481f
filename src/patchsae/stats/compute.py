"""``compute_stats``: one streaming pass of an SAE over a dataset's activations -> an atlas dataset.

The activations come from an activation store (``store=``) or are computed on the fly by the
backbone (``model=``, ``data=``, ``layer=``) through the extraction code path
(``image_batches`` + ``Backbone.encode``). A second, small pass over the reference images only
records their masks (patch grids) and thumbnails. State is saved atomically every
``checkpoint_seconds``; after a kill the same command resumes and writes the same atlas.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from patchsae.atomic import atomic_file, write_json, write_with
from patchsae.backbones import Backbone, TokenLayout, load_backbone
from patchsae.checksum import file_checksum
from patchsae.config import ConfigError, to_dict
from patchsae.data import (
    ActivationStore,
    DataConfig,
    ImageSource,
    image_batches,
    image_batches_from_store,
    open_images,
)
from patchsae.data.images import BadImage
from patchsae.data.store import atomic_save_npy, differing_keys
from patchsae.lock import LOCK, FolderLock
from patchsae.paths import resolve_local
from patchsae.sae import SAE, load
from patchsae.stats.accumulate import Aggregate, LatentAccumulator, StatsError
from patchsae.stats.atlas import (
    ATLAS_JSON,
    DATASET_JSON,
    DATASETS,
    FORMAT,
    FORMAT_VERSION,
    PARTIAL,
    check_name,
    read_json,
)
from patchsae.stats.views import thumb_size, thumbnail, view_box

STATE = "state.safetensors"
CODES_BUDGET = 2**24
"""Float entries of SAE codes held at once when the batch size is chosen automatically."""


@dataclass(frozen=True)
class StatsConfig:
    """What ``patchsae stats`` computes; see ``docs/atlas.md`` for the definitions.

    Source: ``store`` (an activation store; ``layer`` picks a stored layer, default its first) or
    ``model`` + ``data`` + ``layer`` (activations computed on the fly). ``name`` names the
    dataset inside the atlas ``out`` (default: the data folder's name and split).
    ``batch_images`` None picks a batch that holds about 16M code values.
    """

    sae: str
    out: str
    store: str | None = None
    model: str | None = None
    data: DataConfig | None = None
    layer: int | None = None
    name: str | None = None
    top_k: int = 10
    threshold: float = 0.2
    aggregate: Aggregate = "mean"
    include_cls: bool = True
    batch_images: int | None = None
    thumbnails: bool = True
    thumb_size: int = 96
    export_tokens: bool = False
    num_workers: int = 0
    device: str = "cpu"
    checkpoint_seconds: float = 60.0

    def __post_init__(self) -> None:
        if (self.store is None) == (self.model is None):
            raise ConfigError(
                "set exactly one source: store=DIR, or model=NAME with data.source=IMAGES and "
                "layer=L"
            )
        if self.model is not None and (self.data is None or self.layer is None):
            raise ConfigError(
                "model= computes activations on the fly: also set data.source= and layer="
            )
        if self.top_k < 1 or self.thumb_size < 8:
            raise ConfigError(
                f"top_k must be >= 1 and thumb_size >= 8, got {self.top_k}, {self.thumb_size}"
            )
        if self.batch_images is not None and self.batch_images < 1:
            raise ConfigError(f"batch_images must be >= 1 or null, got {self.batch_images}")
        if self.checkpoint_seconds < 0 or self.num_workers < 0:
            raise ConfigError("checkpoint_seconds and num_workers must be >= 0")


def sae_identity(sae: SAE, path: str) -> dict[str, Any]:
    """What identifies an SAE in an atlas: its config, save id (ours) and a hash of its weights."""
    digest = hashlib.sha256()
    for key, value in sorted(sae.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    cfg_json = Path(path) / "cfg.json"
    save_id = None
    if cfg_json.is_file():
        save_id = read_json(cfg_json, "a readable SAE cfg.json is needed").get("save_id")
    return {
        "path": resolve_local(path),
        "arch": sae.arch,
        "d_in": sae.cfg.d_in,
        "d_sae": sae.cfg.d_sae,
        "save_id": save_id,
        "weights_sha256": digest.hexdigest(),
    }


class Batch:
    """Activations of a batch of images in pass order: acts (B, T, D), index / example_ids /
    labels (B,) int64."""

    def __init__(
        self, acts: torch.Tensor, index: np.ndarray, example_ids: np.ndarray, labels: np.ndarray
    ):
        self.acts, self.index, self.example_ids, self.labels = acts, index, example_ids, labels


class StoreStream:
    """Images of an activation store, in store order (index = store row)."""

    def __init__(self, cfg: StatsConfig) -> None:
        self.store = ActivationStore.open(cfg.store)
        self.layer = self.store.resolve_layer(cfg.layer)
        meta = self.store.metadata
        self.layout, self.d_model = self.store.token_layout, self.store.d_model
        self.class_names: list[str] = list(meta.get("class_names", []))
        self.n_images = len(self.store)
        self.backbone_identity = {**meta["backbone"]}
        self.data_meta: dict[str, Any] = dict(meta.get("data") or {})
        self._source: ImageSource | None = None
        self._backbone: Backbone | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "store": resolve_local(str(self.store.root)),
            "data": self.data_meta,
            "n_images": self.n_images,
        }

    def default_name(self) -> str:
        source = self.data_meta.get("source") or self.store.root.name
        return _name_from(source, self.data_meta.get("split"))

    def labels_all(self) -> np.ndarray:
        return self.store.labels

    def batches(self, batch_size: int, start_batch: int) -> Iterator[Batch]:
        if start_batch * batch_size >= self.n_images:
            return
        row = start_batch * batch_size
        for acts in image_batches_from_store(
            self.store, batch_size, layer=self.layer, start_batch=start_batch
        ):
            rows = np.arange(row, row + len(acts), dtype=np.int64)
            row += len(acts)
            yield Batch(acts, rows, self.store.example_ids[rows], self.store.labels[rows])

    def acts_for(self, index: np.ndarray) -> torch.Tensor:
        """(n, T, D) activations of the store rows ``index`` (sorted, unique)."""
        return torch.from_numpy(self.store.take(index, self.layer))

    def image_source(self) -> tuple[ImageSource, Backbone]:
        """The store's images (checked against its fingerprint) and backbone, for thumbnails."""
        if self._source is None:
            fields = {
                k: v for k, v in self.data_meta.items() if k not in ("fingerprint", "n_source")
            }
            try:
                source = open_images(DataConfig(**fields))
            except (ValueError, OSError, TypeError) as err:
                raise StatsError(
                    f"thumbnails need the store's images ({fields.get('source')}), which cannot be "
                    f"opened ({err}); make them available or pass thumbnails=false"
                ) from None
            if source.fingerprint != self.data_meta.get("fingerprint"):
                raise StatsError(
                    f"the images at {fields.get('source')} are not those the store was extracted "
                    "from (fingerprint differs); pass thumbnails=false or restore them"
                )
            self._source = source
            self._backbone = load_backbone(self.backbone_identity["name"])
        assert self._backbone is not None
        return self._source, self._backbone


class ImageStream:
    """Images of an image source in source order (index = example id), encoded by the backbone."""

    def __init__(self, cfg: StatsConfig) -> None:
        assert cfg.model is not None and cfg.data is not None and cfg.layer is not None
        self.cfg = cfg
        self.backbone = load_backbone(cfg.model, device=cfg.device)
        self.source = open_images(cfg.data)
        self.layer = self.backbone.resolve_layer(cfg.layer)
        self.layout, self.d_model = self.backbone.token_layout, self.backbone.d_model
        self.class_names = list(self.source.class_names)
        self.n_images = len(self.source)
        self.backbone_identity = {**self.backbone.identity(), "n_layers": self.backbone.n_layers}
        self.n_bad = 0

    def describe(self) -> dict[str, Any]:
        data = dataclasses.replace(
            self.cfg.data,
            source=resolve_local(self.cfg.data.source),
            class_names_file=resolve_local(self.cfg.data.class_names_file),
        )
        return {
            "store": None,
            "data": {
                **to_dict(data),
                "fingerprint": self.source.fingerprint,
                "n_source": self.n_images,
            },
            "n_images": self.n_images,
        }

    def default_name(self) -> str:
        assert self.cfg.data is not None
        return _name_from(self.cfg.data.source, self.cfg.data.split)

    def labels_all(self) -> np.ndarray:
        return self.source.labels

    @torch.no_grad()
    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.backbone.encode(pixels, self.layer).float()

    def batches(self, batch_size: int, start_batch: int) -> Iterator[Batch]:
        ids = np.arange(start_batch * batch_size, self.n_images, dtype=np.int64)
        for batch in image_batches(
            self.source, ids, self.backbone.preprocessor, batch_size, self.cfg.num_workers
        ):
            self.n_bad += len(batch.bad)
            acts = self._encode(batch.pixel_values) if len(batch.example_ids) else None
            if acts is None:
                acts = torch.zeros(0, self.layout.n_tokens, self.d_model)
            yield Batch(acts.cpu(), batch.example_ids, batch.example_ids, batch.labels)

    def acts_for(self, index: np.ndarray) -> torch.Tensor:
        parts = [
            self._encode(b.pixel_values).cpu()
            for b in image_batches(self.source, index, self.backbone.preprocessor, 32)
        ]
        return torch.cat(parts)

    def image_source(self) -> tuple[ImageSource, Backbone]:
        return self.source, self.backbone


def _name_from(source: str, split: str | None) -> str:
    base = Path(str(source).rstrip("/")).name or "dataset"
    name = f"{base}-{split}" if split else base
    return "".join(c if c.isalnum() or c in "_.-" else "_" for c in name)[:100]


def _open_stream(cfg: StatsConfig) -> StoreStream | ImageStream:
    return StoreStream(cfg) if cfg.store is not None else ImageStream(cfg)


def _check_atlas(root: Path, plan: dict[str, Any]) -> None:
    """Create ``atlas.json`` or check that the existing atlas was made with the same SAE,
    backbone and layer."""
    path = root / ATLAS_JSON
    if not path.is_file():
        if any(p.name != LOCK for p in root.iterdir()):
            raise StatsError(
                f"{root} is not empty and holds no {ATLAS_JSON}; use a new out= folder"
            )
        write_json(path, plan)
        return
    diff = differing_keys(read_json(path, "use a new out= folder"), plan)
    if diff:
        raise StatsError(
            f"{root} is an atlas of another SAE, backbone or layer (differs in: "
            f"{', '.join(diff)}); use a new out= folder for this one"
        )


def _check_dataset(folder: Path, plan: dict[str, Any]) -> bool:
    """Create ``dataset.json`` (incomplete) or compare the plan; True when already complete."""
    path = folder / DATASET_JSON
    if path.is_file():
        existing = read_json(path, f"delete {folder} and rerun")
        previous = {k: v for k, v in existing.items() if k not in RESULT_KEYS}
        diff = differing_keys(previous, plan)
        if diff:
            raise StatsError(
                f"{folder} holds dataset {plan['name']!r} computed differently (differs in: "
                f"{', '.join(diff)}); pick another name= or delete that folder"
            )
        if existing.get("complete") is True:
            return True
    else:
        write_json(path, {**plan, "complete": False})
    return False


RESULT_KEYS = ("complete", "files", "checksums", "n_bad", "notes", "n_thumbs")


def _auto_batch(n_tokens: int, d_sae: int) -> int:
    return max(1, min(256, CODES_BUDGET // (n_tokens * d_sae)))


def compute_stats(cfg: StatsConfig, *, timings: dict[str, float] | None = None) -> Path:
    """Compute (or finish) dataset ``cfg.name`` of the atlas ``cfg.out``; returns its folder.

    ``timings``, when given, receives seconds spent in ``setup``, ``pass`` (the streaming
    pass), ``references`` (masks and thumbnails) and ``write``.
    """
    t0 = time.perf_counter()
    device = torch.device(cfg.device)
    sae = load(cfg.sae, device=device)
    stream = _open_stream(cfg)
    if sae.cfg.d_in != stream.d_model:
        raise StatsError(
            f"the SAE reads d_in={sae.cfg.d_in} activations but layer {stream.layer} of "
            f"{stream.backbone_identity.get('name')!r} has width {stream.d_model}: use the SAE "
            "trained on this backbone and layer"
        )
    origin_note = check_trained_on(sae, stream.layer, stream.backbone_identity)
    root = Path(cfg.out)
    if root.exists() and not root.is_dir():
        raise StatsError(f"out={root} is a file; pass an atlas folder")
    root.mkdir(parents=True, exist_ok=True)
    busy = StatsError(
        f"another patchsae stats is writing to {root}; wait for it to finish or use another out="
    )
    with FolderLock(root, busy):
        return _compute_locked(cfg, sae, stream, root, t0, timings, origin_note)


def check_trained_on(sae: SAE, layer: int, backbone: dict[str, Any]) -> str | None:
    """Refuse activations of another layer or backbone than the SAE records it was trained on.

    Returns a note when the SAE records nothing (only its width was checked) or when the two
    backbones cannot be compared (one is a local folder, known by its hash, the other by name).
    """
    record = sae.trained_on
    if record is None:
        return "the SAE records no backbone or layer: only its width d_in was checked"
    theirs = record["backbone"]
    name = theirs.get("name")
    if record["layer"] != layer:
        raise StatsError(
            f"the SAE was trained on layer {record['layer']} of {name!r}, these activations are "
            f"layer {layer}: use layer={record['layer']} (or a store holding it)"
        )
    hashes = (theirs.get("folder_hash"), backbone.get("folder_hash"))
    if None not in hashes:
        same = hashes[0] == hashes[1]
    elif hashes == (None, None):
        same = name == backbone.get("name")
    else:
        return f"the SAE's backbone {name!r} and {backbone.get('name')!r} could not be compared"
    if not same:
        raise StatsError(
            f"the SAE was trained on backbone {name!r}, these activations come from "
            f"{backbone.get('name')!r}: use the SAE trained on this backbone, or that backbone"
        )
    return None


def _compute_locked(
    cfg: StatsConfig,
    sae: SAE,
    stream: StoreStream | ImageStream,
    root: Path,
    t0: float,
    timings: dict[str, float] | None,
    origin_note: str | None,
) -> Path:
    """``compute_stats`` once the atlas folder is locked."""
    labels_all = stream.labels_all()
    class_names = stream.class_names
    has_labels = bool(len(class_names)) and bool((labels_all >= 0).any())
    notes = [] if has_labels else ["no labels or class names: class statistics skipped"]
    notes += [origin_note] if origin_note else []
    batch_size = cfg.batch_images or _auto_batch(stream.layout.n_tokens, sae.cfg.d_sae)
    _check_atlas(
        root,
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "sae": sae_identity(sae, cfg.sae),
            "backbone": stream.backbone_identity,
            "layer": stream.layer,
            "token_layout": stream.layout.to_dict(),
        },
    )
    name = check_name(cfg.name or stream.default_name())
    folder = root / DATASETS / name
    options = {
        "top_k": cfg.top_k,
        "threshold": cfg.threshold,
        "aggregate": cfg.aggregate,
        "include_cls": cfg.include_cls,
        "batch_images": batch_size,
        "thumbnails": cfg.thumbnails,
        "thumb_size": cfg.thumb_size,
        "export_tokens": cfg.export_tokens,
    }
    plan = {
        "name": name,
        **stream.describe(),
        "class_names": class_names if has_labels else [],
        "has_labels": has_labels,
        "options": options,
    }
    if _check_dataset(folder, plan):
        tqdm.write(f"{folder} is already complete; nothing to do")
        return folder
    acc = LatentAccumulator(
        sae.cfg.d_sae,
        stream.layout,
        n_classes=len(class_names) if has_labels else 0,
        top_k=cfg.top_k,
        threshold=cfg.threshold,
        aggregate=cfg.aggregate,
        include_cls=cfg.include_cls,
    )
    t1 = time.perf_counter()
    _stream_pass(cfg, sae, stream, acc, folder / PARTIAL, batch_size, has_labels)
    t2 = time.perf_counter()
    result = acc.result()
    arrays = _references(cfg, sae, stream, result, batch_size)
    t3 = time.perf_counter()
    files = {}
    for key, array in {**result, **arrays}.items():
        atomic_save_npy(folder / f"{key}.npy", np.ascontiguousarray(array))
        files[key] = f"{key}.npy"
    if cfg.export_tokens:
        shutil.copyfile(folder / PARTIAL / "tokens.npz", folder / "tokens.npz")
        files["tokens"] = "tokens.npz"
    n_bad = getattr(stream, "n_bad", 0)
    checksums = {key: file_checksum(folder / name) for key, name in files.items()}
    write_json(
        folder / DATASET_JSON,
        {
            **plan,
            "n_images": int(acc.state["n_images"]),
            "n_bad": n_bad,
            "n_thumbs": int(len(arrays.get("thumbs", ()))),
            "notes": notes,
            "files": files,
            "checksums": checksums,
            "complete": True,
        },
    )
    shutil.rmtree(folder / PARTIAL, ignore_errors=True)
    if timings is not None:
        timings.update(setup=t1 - t0, references=t3 - t2, write=time.perf_counter() - t3)
        timings["pass"] = t2 - t1
    for note in notes:
        tqdm.write(f"note: {note}")
    tqdm.write(f"wrote {folder} ({int(acc.state['n_images'])} images)")
    return folder


def _load_state(partial: Path, acc: LatentAccumulator) -> int:
    """Restore the saved statistics; returns the next batch (0 when nothing was saved)."""
    path = partial / STATE
    if not path.is_file():
        return 0
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
            meta = dict(handle.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise StatsError(f"{path} is damaged ({err}); delete {partial} to restart") from None
    acc.load_state_dict(state)
    return int(meta["next_batch"])


def _save_state(partial: Path, acc: LatentAccumulator, next_batch: int) -> None:
    tensors = {k: v.contiguous() for k, v in acc.state_dict().items()}
    metadata = {"next_batch": str(next_batch)}
    write_with(partial / STATE, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


@torch.no_grad()
def _stream_pass(
    cfg: StatsConfig,
    sae: SAE,
    stream: StoreStream | ImageStream,
    acc: LatentAccumulator,
    partial: Path,
    batch_size: int,
    has_labels: bool,
) -> None:
    """Feed every batch to ``acc``, saving its state every ``checkpoint_seconds``."""
    partial.mkdir(parents=True, exist_ok=True)
    start = _load_state(partial, acc)
    tokens = _TokenExport(partial, start) if cfg.export_tokens else None
    n_batches = -(-stream.n_images // batch_size)
    bar = tqdm(total=n_batches, initial=start, unit="batch", desc="stats")
    last_save = time.monotonic()
    b = start
    for b, batch in enumerate(stream.batches(batch_size, start), start=start + 1):
        if len(batch.index):
            codes = sae.encode(batch.acts.to(sae.W_enc.device))
            labels = batch.labels if has_labels else np.full(len(batch.labels), -1)
            acc.update(
                codes,
                torch.from_numpy(batch.index),
                torch.from_numpy(np.asarray(batch.example_ids)),
                torch.from_numpy(np.asarray(labels)),
            )
            if tokens is not None:
                tokens.add(codes)
        bar.update(1)
        if time.monotonic() - last_save >= cfg.checkpoint_seconds and b < n_batches:
            if tokens is not None:
                tokens.flush(b)
            _save_state(partial, acc, b)
            last_save = time.monotonic()
    bar.close()
    if tokens is not None:
        tokens.flush(b)
        tokens.finish()


class _TokenExport:
    """All token codes as a CSR matrix (rows: images in pass order x tokens), written in chunks
    under ``.partial`` (each saved with the state that covers it) and joined at the end."""

    def __init__(self, partial: Path, start_batch: int) -> None:
        self.partial, self.start = partial, start_batch
        for chunk in partial.glob("tokens_*.npz"):
            if int(chunk.stem.split("_")[2]) > start_batch:
                chunk.unlink()
        self.pending: list[Any] = []

    def add(self, codes_btm: torch.Tensor) -> None:
        import scipy.sparse

        flat = codes_btm.reshape(-1, codes_btm.shape[-1]).float().cpu().numpy()
        self.pending.append(scipy.sparse.csr_matrix(flat))

    def flush(self, next_batch: int) -> None:
        import scipy.sparse

        if not self.pending:
            return
        matrix = scipy.sparse.vstack(self.pending, format="csr")
        path = self.partial / f"tokens_{self.start:09d}_{next_batch:09d}.npz"
        with atomic_file(path) as f:
            scipy.sparse.save_npz(f, matrix)
        self.pending, self.start = [], next_batch

    def finish(self) -> None:
        import scipy.sparse

        chunks = sorted(self.partial.glob("tokens_*.npz"))
        matrix = scipy.sparse.vstack([scipy.sparse.load_npz(c) for c in chunks], format="csr")
        with atomic_file(self.partial / "tokens.npz") as f:
            scipy.sparse.save_npz(f, matrix)


@torch.no_grad()
def _references(
    cfg: StatsConfig,
    sae: SAE,
    stream: StoreStream | ImageStream,
    result: dict[str, np.ndarray],
    batch_size: int,
) -> dict[str, np.ndarray]:
    """Masks (patch grids) of every (latent, reference) pair and thumbnails of each reference
    image (once per image)."""
    layout: TokenLayout = stream.layout
    top_index = result["top_index"]
    m, k = top_index.shape
    gh, gw = layout.grid
    grids = np.zeros((m, k, gh, gw), dtype=np.float16)
    filled = top_index >= 0
    unique = np.unique(top_index[filled])
    ref_row = np.full((m, k), -1, dtype=np.int64)
    ref_row[filled] = np.searchsorted(unique, top_index[filled])
    patches = list(layout.patch_indices)
    bar = tqdm(total=len(unique), unit="img", desc="references", leave=False)
    for lo in range(0, len(unique), batch_size):
        codes = sae.encode(stream.acts_for(unique[lo : lo + batch_size]).to(sae.W_enc.device))
        codes = codes[:, patches].float().cpu().numpy()  # (b, P, m)
        sel = filled & (ref_row >= lo) & (ref_row < lo + len(codes))
        latents, slots = np.nonzero(sel)
        values = codes[ref_row[latents, slots] - lo, :, latents]  # (n_pairs, P)
        grids[latents, slots] = values.reshape(-1, gh, gw).astype(np.float16)
        bar.update(len(codes))
    bar.close()
    out: dict[str, np.ndarray] = {"top_grids": grids}
    if cfg.thumbnails:
        example_ids = np.full(len(unique), -1, dtype=np.int64)
        example_ids[ref_row[filled]] = result["top_example_ids"][filled]
        out.update(thumbnails=_thumbnails(cfg, stream, example_ids))
        out["thumb_example_ids"] = example_ids
        out["thumbs"] = out.pop("thumbnails")
        out["top_thumb"] = ref_row
    return out


def _thumbnails(
    cfg: StatsConfig, stream: StoreStream | ImageStream, example_ids: np.ndarray
) -> np.ndarray:
    """(n, th, tw, 3) uint8 thumbnails of the model's view of each example."""
    source, backbone = stream.image_source()
    size_hw = thumb_size(cfg.thumb_size, backbone.preprocessor.size_hw)
    thumbs = np.zeros((len(example_ids), *size_hw, 3), dtype=np.uint8)
    for row, eid in enumerate(tqdm(example_ids, unit="img", desc="thumbnails", leave=False)):
        try:
            image = source.load(int(eid))
        except BadImage as err:
            raise StatsError(
                f"reference image {source.describe(int(eid))} is unreadable now: {err}"
            ) from None
        box = view_box(backbone.preprocessor, image.size)
        thumbs[row] = thumbnail(image, box, size_hw)
    return thumbs
