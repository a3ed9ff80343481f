"""Images -> backbone (stopped after the deepest requested block) -> activation store.

``extract(cfg)`` plans the example order from the config alone (seeded shuffle, then ``limit``),
cuts it into shards of ``shard_images`` and writes each missing shard atomically, so a killed run
resumes where it stopped and ends bit-identical to an uninterrupted one. The ``patchsae extract``
command builds an :class:`ExtractConfig` from flags, a YAML file and ``key=value`` overrides.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm import tqdm

from patchsae import ddp
from patchsae.backbones import Backbone, load_backbone
from patchsae.config import ConfigError, load_config, to_dict
from patchsae.data.images import (
    BadRecord,
    DataConfig,
    ImageBatch,
    ImageSource,
    image_batches,
    open_images,
    shuffled_order,
)
from patchsae.data.store import (
    BAD_IMAGES,
    FORMAT_VERSION,
    StoreError,
    StoreMetadata,
    StoreWriter,
    to_storage,
)
from patchsae.paths import resolve_local


@dataclass(frozen=True)
class ExtractConfig:
    """What to extract. ``layers`` are block indices (negative counts from the end).

    ``dtype`` is the storage type (the forward runs in float32; its output is rounded to
    ``dtype`` on the model's device). ``seed`` shuffles the example
    order (None keeps source order) before the first ``limit`` examples are taken.
    ``shard_images`` must be a multiple of ``batch_size`` so batches never cross shards.
    """

    model: str
    data: DataConfig
    layers: tuple[int, ...]
    out: str
    batch_size: int = 32
    dtype: Literal["fp16", "bf16", "fp32"] = "fp16"
    seed: int | None = None
    limit: int | None = None
    shard_images: int = 1024
    num_workers: int = 2
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not self.layers:
            raise ConfigError("layers is empty; pass at least one block index (--layer 10)")
        if self.batch_size < 1 or self.shard_images < 1:
            raise ConfigError("batch_size and shard_images must be >= 1")
        if self.shard_images % self.batch_size:
            raise ConfigError(
                f"shard_images ({self.shard_images}) must be a multiple of batch_size "
                f"({self.batch_size}), e.g. shard_images={self.batch_size * 32}"
            )
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be >= 1 or omitted, got {self.limit}")
        if self.seed is not None and self.seed < 0:
            raise ConfigError(f"seed must be >= 0 or omitted, got {self.seed}")
        if self.num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0, got {self.num_workers}")


def _plan(
    cfg: ExtractConfig, backbone: Backbone, source: ImageSource, n_planned: int
) -> StoreMetadata:
    """The store metadata fixed before any image is processed (compared on resume).

    Every setting appears once. Local model and data paths are recorded resolved (a backbone
    loaded from a folder is named by its resolved path), so the same folder named differently
    (``DIR/``, a relative path from another directory) resumes the store.
    ``out``, ``device`` and ``num_workers`` do not change the planned bytes and are not recorded.
    """
    layers = [backbone.resolve_layer(layer) for layer in cfg.layers]
    if len(set(layers)) != len(layers):
        raise ConfigError(f"layers {list(cfg.layers)} name the same block twice ({layers})")
    data = dataclasses.replace(
        cfg.data,
        source=resolve_local(cfg.data.source),
        class_names_file=resolve_local(cfg.data.class_names_file),
    )
    return StoreMetadata(
        format_version=FORMAT_VERSION,
        backbone={**backbone.identity(), "n_layers": backbone.n_layers},
        layers=layers,
        layers_requested=list(cfg.layers),
        token_layout=backbone.token_layout.to_dict(),
        d_model=backbone.d_model,
        n_tokens=backbone.token_layout.n_tokens,
        dtype=cfg.dtype,
        data={**to_dict(data), "fingerprint": source.fingerprint, "n_source": len(source)},
        class_names=list(source.class_names),
        seed=cfg.seed,
        limit=cfg.limit,
        shard_images=cfg.shard_images,
        batch_size=cfg.batch_size,
        n_planned=n_planned,
        n_shards=-(-n_planned // cfg.shard_images),
    )


def _print_bad(bad: list[BadRecord], out: Path) -> None:
    if not bad:
        return
    tqdm.write(f"skipped {len(bad)} bad image(s) (listed in {out / BAD_IMAGES}):")
    for record in bad[:20]:
        tqdm.write(f"  {record.where}: {record.reason}")
    if len(bad) > 20:
        tqdm.write(f"  ... and {len(bad) - 20} more")


def extract(cfg: ExtractConfig, *, timings: dict[str, float] | None = None) -> Path:
    """Write (or finish) the store ``cfg.out``; returns its path.

    Under ``torchrun`` (several processes) rank r computes the unfinished shards ``k`` with
    ``k % world_size == r``; rank 0 opens, checks and locks the folder first and writes the index
    and metadata once every rank is done. Shard bytes do not depend on the rank that computed
    them, so the store equals a single-process run's on the same device type and thread count.

    ``timings``, when given, receives seconds spent: ``total``; ``setup`` (opening the images,
    loading the backbone, checking the folder); ``loop`` (the shards), split into ``forward``
    (model forward, conversion of the activations to the storage dtype on the model's device,
    copy to CPU), ``write`` (shard files) and ``load``
    (waiting for decoded, preprocessed batches); ``finalize`` (index files and metadata).
    """
    dist = ddp.setup(cfg.device)
    clean = False
    try:
        out = _extract(cfg, dist, timings)
        clean = True
        return out
    finally:
        ddp.teardown(dist, clean)


def _open_writer(out: Path, plan: StoreMetadata, dist: ddp.Dist) -> StoreWriter:
    """Rank 0 opens (checks, locks) the store; the other ranks attach once it has. A refusal on
    rank 0 stops every rank with one line instead of leaving them waiting."""
    writer, refused = None, None
    if dist.is_main:
        try:
            writer = StoreWriter(out, plan)
        except (StoreError, OSError) as err:
            refused = err
    flags = [refused is None, writer is not None and writer.complete]
    opened = ddp.broadcast_(torch.tensor(flags, dtype=torch.int64, device=dist.device), dist)
    if refused is not None:
        raise refused
    if not bool(opened[0]):
        raise StoreError(f"rank 0 could not open the store {out}: see its error")
    if writer is None:
        writer = StoreWriter(out, plan, attach=True)
        writer.complete = bool(opened[1])
    return writer


def _extract(cfg: ExtractConfig, dist: ddp.Dist, timings: dict[str, float] | None) -> Path:
    """``extract`` on this rank of ``dist``."""
    t_start = time.perf_counter()
    clock = {"forward": 0.0, "write": 0.0, "load": 0.0}
    source = open_images(cfg.data)
    order = shuffled_order(len(source), cfg.seed)
    if cfg.limit is not None:
        if cfg.limit > len(source):
            raise ConfigError(
                f"limit {cfg.limit} exceeds the {len(source)} images of {cfg.data.source} "
                f"(split {cfg.data.split}); lower --limit or omit it"
            )
        order = order[: cfg.limit]
    backbone = load_backbone(cfg.model, device=str(dist.device), dtype=torch.float32)
    plan = _plan(cfg, backbone, source, len(order))
    out = Path(cfg.out)
    with _open_writer(out, plan, dist) as writer:
        if writer.complete:
            if dist.is_main:
                tqdm.write(
                    f"{out} is already complete ({plan.n_planned} images planned); nothing to do"
                )
            return out
        if writer.damage is not None:
            tqdm.write(f"{out} is damaged ({writer.damage}): recomputing the damaged files")
        source.exif_transpose = writer.data_option("exif_transpose")
        if source.exif_transpose != cfg.data.exif_transpose:
            tqdm.write(
                f"{out} was started before EXIF orientation was applied: resuming it on raw pixels"
            )
        mine = [k for k in range(plan.n_shards) if k % dist.world_size == dist.rank]
        entries = {k: writer.shard_entry(k) for k in mine}
        todo = [k for k in mine if entries[k] is None]
        done_images = sum(len(e["example_ids"]) + len(e["bad"]) for e in entries.values() if e)
        planned = sum(len(order[k * cfg.shard_images : (k + 1) * cfg.shard_images]) for k in mine)
        bar = tqdm(
            total=planned,
            initial=done_images,
            unit="img",
            desc="extract",
            disable=not dist.is_main,
        )
        t_loop = time.perf_counter()
        for run in _contiguous_runs(todo):
            lo, hi = run[0] * cfg.shard_images, (run[-1] + 1) * cfg.shard_images
            batches = image_batches(
                source, order[lo:hi], backbone.preprocessor, cfg.batch_size, cfg.num_workers
            )
            for k in run:
                ids = order[k * cfg.shard_images : (k + 1) * cfg.shard_images]
                entries[k] = _extract_shard(cfg, backbone, batches, writer, k, ids, bar, clock)
        bar.close()
        t_finalize = time.perf_counter()
        ddp.barrier(dist)
        if not dist.is_main:
            return out
        every = [entries.get(k) or writer.shard_entry(k) for k in range(plan.n_shards)]
        missing = [k for k, entry in enumerate(every) if entry is None]
        if missing:
            raise StoreError(
                f"shards {missing[:5]} of {out} are not complete after every rank finished; "
                "rerun the same command to recompute them"
            )
        bad = [BadRecord(**record) for entry in every for record in entry["bad"]]
        writer.finalize(every, bad)
    _print_bad(bad, out)
    t_end = time.perf_counter()
    clock.update(
        setup=t_loop - t_start,
        loop=t_finalize - t_loop,
        finalize=t_end - t_finalize,
        total=t_end - t_start,
    )
    if timings is not None:
        timings.update(clock)
    tqdm.write(f"wrote {sum(len(e['example_ids']) for e in every)} images to {out}")
    return out


def _contiguous_runs(indices: list[int]) -> list[list[int]]:
    """``[0, 1, 2, 5, 6] -> [[0, 1, 2], [5, 6]]``."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def _extract_shard(
    cfg: ExtractConfig,
    backbone: Backbone,
    batches: Iterator[ImageBatch],
    writer: StoreWriter,
    k: int,
    ids: np.ndarray,
    bar: tqdm,
    clock: dict[str, float],
) -> dict[str, Any]:
    """Encode shard ``k`` (planned examples ``ids``) from the next batches and commit it.

    ``batches`` yields batches of ``cfg.batch_size`` planned examples starting at this shard's
    first one; the shard takes exactly the batches that cover ``ids``.
    """
    layers = writer.plan["layers"]
    shard = writer.shard(k, len(ids))
    kept_ids: list[np.ndarray] = []
    kept_labels: list[np.ndarray] = []
    bad: list[BadRecord] = []
    t = time.perf_counter()
    for batch in itertools.islice(batches, -(-len(ids) // cfg.batch_size)):
        t_loaded = time.perf_counter()
        clock["load"] += t_loaded - t
        if len(batch.example_ids):
            with torch.inference_mode():
                acts = backbone.encode_layers(batch.pixel_values, layers)
                stored = {layer: to_storage(a, cfg.dtype) for layer, a in acts.items()}
            t_forward = time.perf_counter()
            clock["forward"] += t_forward - t_loaded
            shard.append(stored)
            clock["write"] += time.perf_counter() - t_forward
        kept_ids.append(batch.example_ids)
        kept_labels.append(batch.labels)
        bad += batch.bad
        bar.update(len(batch.example_ids) + len(batch.bad))
        t = time.perf_counter()
    t = time.perf_counter()
    entry = shard.commit(
        {
            "planned": [k * cfg.shard_images, k * cfg.shard_images + len(ids)],
            "example_ids": np.concatenate(kept_ids).tolist(),
            "labels": np.concatenate(kept_labels).tolist(),
            "bad": [dataclasses.asdict(record) for record in bad],
            "device": backbone.device.type,
        }
    )
    clock["write"] += time.perf_counter() - t
    return entry


def _split_layers(values: list[str]) -> tuple[list[int], list[str]]:
    """``--layer`` takes ints; trailing ``key=value`` overrides may follow it directly."""
    layers, overrides = [], []
    for value in values:
        if "=" in value:
            overrides.append(value)
            continue
        try:
            layers.append(int(value))
        except ValueError:
            raise ConfigError(f"--layer expects block indices, got {value!r}") from None
    return layers, overrides


def config_from_args(args: argparse.Namespace) -> ExtractConfig:
    """YAML (``--config``), then flags, then ``key=value`` overrides, later ones winning."""
    layers, extra = _split_layers(args.layer or [])
    flags: dict[str, Any] = {
        "model": args.model,
        "data.source": args.data,
        "data.split": args.split,
        "layers": layers or None,
        "out": args.out,
        "batch_size": args.batch_size,
        "dtype": args.dtype,
        "seed": args.seed,
        "limit": args.limit,
        "shard_images": args.shard_images,
        "num_workers": args.num_workers,
        "device": args.device,
    }
    overrides = [f"{k}={json.dumps(v)}" for k, v in flags.items() if v is not None]
    return load_config(ExtractConfig, args.config, overrides + extra + list(args.overrides))


def _run(args: argparse.Namespace) -> int:
    extract(config_from_args(args))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``extract`` command."""
    p = subparsers.add_parser(
        "extract",
        help="run a backbone over images and store its activations",
        description="Run a backbone over images, stopping after the deepest requested block, "
        "and store the residual stream of every token. Rerun the same command to resume.",
    )
    p.add_argument("--model", help="hub id or local folder of the backbone")
    p.add_argument("--data", help="image folder, saved dataset folder, or dataset name")
    p.add_argument("--layer", nargs="+", metavar="L", help="block index(es); -1 is the last")
    p.add_argument("--out", help="store folder (created; rerun to resume)")
    p.add_argument("--split", help="dataset split (default train)")
    p.add_argument("--limit", type=int, help="only the first N planned images")
    defaults = {f.name: f.default for f in dataclasses.fields(ExtractConfig)}
    p.add_argument(
        "--batch-size", type=int, help=f"images per forward pass (default {defaults['batch_size']})"
    )
    p.add_argument(
        "--dtype",
        choices=["fp16", "bf16", "fp32"],
        help=f"storage dtype (default {defaults['dtype']})",
    )
    p.add_argument("--seed", type=int, help="shuffle the image order (default: source order)")
    p.add_argument(
        "--num-workers",
        type=int,
        help=f"image decoding workers (default {defaults['num_workers']})",
    )
    p.add_argument(
        "--shard-images",
        type=int,
        help=f"images per shard file (default {defaults['shard_images']})",
    )
    p.add_argument(
        "--device", help=f"torch device, e.g. cpu or cuda (default {defaults['device']})"
    )
    p.add_argument("--config", help="YAML file with ExtractConfig keys")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.set_defaults(func=_run)
