"""The ``patchsae stats`` (build an atlas) and ``patchsae atlas`` (query one) commands."""

from __future__ import annotations

import argparse
import json
from typing import Any

from patchsae.config import load_config


def config_from_args(args: argparse.Namespace) -> Any:
    """YAML (``--config``), then flags, then ``key=value`` overrides, later ones winning."""
    from patchsae.stats.compute import StatsConfig

    flags: dict[str, Any] = {
        "sae": args.sae,
        "store": args.store,
        "model": args.model,
        "data.source": args.data,
        "data.split": args.split,
        "layer": args.layer,
        "out": args.out,
        "name": args.name,
        "top_k": args.top_k,
        "threshold": args.threshold,
        "aggregate": args.aggregate,
        "device": args.device,
    }
    overrides = [f"{k}={json.dumps(v)}" for k, v in flags.items() if v is not None]
    return load_config(StatsConfig, args.config, overrides + list(args.overrides))


def _run_stats(args: argparse.Namespace) -> int:
    from patchsae.stats.compute import compute_stats

    compute_stats(config_from_args(args))
    return 0


def _run_query(args: argparse.Namespace) -> int:
    from patchsae.stats.atlas import Atlas

    atlas = Atlas.open(args.atlas)
    if args.what == "info":
        result: Any = {
            "sae": atlas.meta["sae"],
            "layer": atlas.meta["layer"],
            "datasets": {n: ds.meta["n_images"] for n, ds in atlas.datasets.items()},
        }
    elif args.what == "latent":
        result = atlas.latent(int(args.value))
    else:
        ds = atlas.dataset(args.dataset)
        if args.what == "class":
            result = ds.class_latents(int(args.value), args.k, by=args.by)
        elif args.what == "dense":
            result = ds.dense(float(args.value or 0.5))[: args.k]
        else:
            result = ds.low_entropy(float(args.value or 0.0))[: args.k]
    print(json.dumps(result, indent=1))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``stats`` and ``atlas``."""
    p = subparsers.add_parser(
        "stats",
        help="per-latent statistics of an SAE over a dataset, written into an atlas",
        description="One streaming pass of an SAE over a dataset's activations (an activation "
        "store, or a backbone run on images) -> a dataset of the atlas --out: frequencies, mean "
        "activations, reference images with masks and thumbnails, class statistics. Rerun the "
        "same command to resume. See docs/atlas.md.",
    )
    p.add_argument("--sae", help="SAE checkpoint (any layout patchsae.sae.load reads)")
    p.add_argument("--store", help="activation store folder")
    p.add_argument("--model", help="backbone (instead of --store): hub id or local folder")
    p.add_argument("--data", help="images for --model: image folder, dataset folder or name")
    p.add_argument("--split", help="dataset split for --data (default train)")
    p.add_argument("--layer", type=int, help="block index (with --store: a stored layer)")
    p.add_argument("--out", help="atlas folder (created, or extended with another dataset)")
    p.add_argument("--name", help="dataset name inside the atlas (default: data folder + split)")
    p.add_argument("--top-k", type=int, help="reference images per latent (default 10)")
    p.add_argument("--threshold", type=float, help="class-count threshold (default 0.2)")
    p.add_argument("--aggregate", choices=["mean", "max"], help="image-level activation")
    p.add_argument("--device", help="torch device (default cpu)")
    p.add_argument("--config", help="YAML file with StatsConfig keys")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.set_defaults(func=_run_stats)

    q = subparsers.add_parser(
        "atlas",
        help="query an atlas (prints JSON)",
        description="info: what the atlas holds; latent J: statistics and references of latent "
        "J; class C: top latents of class C; dense [MIN_FREQ]; low-entropy [MAX_ENTROPY].",
    )
    q.add_argument("atlas", help="atlas folder written by patchsae stats")
    q.add_argument("what", choices=["info", "latent", "class", "dense", "low-entropy"])
    q.add_argument("value", nargs="?", help="latent id, class id, or threshold")
    q.add_argument("--dataset", help="dataset of the atlas (needed when it holds several)")
    q.add_argument("-k", type=int, default=20, help="how many latents to list (default 20)")
    q.add_argument(
        "--by",
        choices=["class_counts", "class_mean_act"],
        default="class_counts",
        help="class ranking (default class_counts)",
    )
    q.set_defaults(func=_run_query)
