"""The ``patchsae stats`` (build an atlas) and ``patchsae atlas`` (query one) commands."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
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


def _run_plot(args: argparse.Namespace) -> int:
    from patchsae.stats import plot
    from patchsae.stats.accumulate import StatsError

    if args.figure == "mask":
        return _run_mask(args)
    from patchsae.stats.atlas import Atlas

    if args.atlas is None:
        raise StatsError(f"plot {args.figure} needs --atlas DIR")
    ds = Atlas.open(args.atlas).dataset(args.dataset)
    out = Path(args.out or f"{args.figure}.png")
    if out.suffix not in (".png", ".html") or (args.figure == "refs" and out.suffix != ".png"):
        raise StatsError(f"--out {out}: use a .png file (scatter and heatmap: .png or .html)")
    if args.figure == "scatter":
        plot.scatter(ds, out)
    elif args.figure == "heatmap":
        plot.heatmap(ds, out, args.per_class)
    else:
        latents = args.latents or ds.low_entropy(0.0)[:8] or ds.dense(0.0)[:8]
        plot.references(ds, latents, out, args.mask)
    print(out)
    return 0


def _run_mask(args: argparse.Namespace) -> int:
    from patchsae.backbones import load_backbone
    from patchsae.data import load_rgb
    from patchsae.sae import load
    from patchsae.stats.accumulate import StatsError
    from patchsae.stats.views import encode_image, latent_mask_picture, save_png

    missing = [f for f in ("sae", "model", "layer", "image", "latent") if getattr(args, f) is None]
    if missing:
        raise StatsError(f"plot mask needs --{' --'.join(missing)}")
    backbone = load_backbone(args.model, device=args.device or "cpu")
    sae = load(args.sae, device=args.device or "cpu")
    if sae.cfg.d_in != backbone.d_model:
        raise StatsError(
            f"the SAE reads d_in={sae.cfg.d_in}, the backbone has width {backbone.d_model}"
        )
    if not 0 <= args.latent < sae.cfg.d_sae:
        raise StatsError(f"--latent {args.latent} is outside 0..{sae.cfg.d_sae - 1}")
    image = load_rgb(args.image)
    codes = encode_image(backbone, sae, backbone.resolve_layer(args.layer), image)
    picture = latent_mask_picture(
        image, codes, backbone.token_layout, args.latent, backbone.preprocessor, args.mask or "heat"
    )
    print(save_png(picture, args.out or "mask.png"))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``stats``, ``atlas`` and ``plot``."""
    f = subparsers.add_parser(
        "plot",
        help="figures from an atlas (scatter, refs, heatmap) or a latent's mask on an image",
        description="scatter: the paper's Fig. 3 (log10 frequency vs log10 mean activation, "
        "coloured by label entropy); refs: reference images of latents; heatmap: class x latent; "
        "mask: a latent's activation on any image (needs --sae --model --layer --image "
        "--latent). --out ending in .html writes an interactive plotly page that opens offline.",
    )
    f.add_argument("figure", choices=["scatter", "refs", "heatmap", "mask"])
    f.add_argument("--atlas", help="atlas folder (scatter, refs, heatmap)")
    f.add_argument("--dataset", help="dataset of the atlas (needed when it holds several)")
    f.add_argument("--out", help="output file, .png or .html (default FIGURE.png)")
    f.add_argument("--latents", type=int, nargs="+", help="refs: latent ids (default: low entropy)")
    f.add_argument("--mask", choices=["heat", "darken"], help="refs, mask: mask style")
    f.add_argument("--per-class", type=int, default=3, help="heatmap: latents per class")
    f.add_argument("--sae", help="mask: SAE checkpoint")
    f.add_argument("--model", help="mask: backbone")
    f.add_argument("--layer", type=int, help="mask: block index")
    f.add_argument("--image", help="mask: image file")
    f.add_argument("--latent", type=int, help="mask: latent id")
    f.add_argument("--device", help="mask: torch device (default cpu)")
    f.set_defaults(func=_run_plot)

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
