"""The ``patchsae classify`` command: zero-shot, spliced and top-k masking runs."""

from __future__ import annotations

import argparse
import json
from typing import Any

from patchsae.config import load_config


def config_from_args(args: argparse.Namespace) -> Any:
    """YAML (``--config``), then flags, then ``key=value`` overrides, later ones winning."""
    from patchsae.classify.config import ClassifyConfig

    flags: dict[str, Any] = {
        "model": args.model,
        "data.source": args.data,
        "data.split": args.split,
        "out": args.out,
        "sae": args.sae,
        "layer": args.layer,
        "atlas": args.atlas,
        "atlas_dataset": args.atlas_dataset,
        "selections": args.selections,
        "ks": args.ks,
        "mask_by": args.mask_by,
        "tokens": args.tokens,
        "tokenizer": args.tokenizer,
        "limit": args.limit,
        "batch_size": args.batch_size,
        "device": args.device,
    }
    overrides = [f"{k}={json.dumps(v)}" for k, v in flags.items() if v is not None]
    for flag, key in (("same_split", "same_split"), ("error", "error")):
        if getattr(args, flag):
            overrides.append(f"{key}=true")
    if args.single_template:
        overrides.append('templates=["a photo of a {name}."]')
    return load_config(ClassifyConfig, args.config, overrides + list(args.overrides))


def _run(args: argparse.Namespace) -> int:
    from patchsae.classify.run import classify

    out = classify(config_from_args(args))
    summary = out / "summary.csv"
    print(summary.read_text() if summary.is_file() else f"partial results in {out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``classify``."""
    p = subparsers.add_parser(
        "classify",
        help="zero-shot CLIP classification, SAE splicing and top-k class-latent masking",
        description="Zero-shot classification of labelled images (80 CLIP ImageNet templates by "
        "default); with --sae also with the SAE reconstruction spliced in at --layer; with "
        "--atlas (or --selections random) the top-k latents of each class kept (on) or removed "
        "(off) as in PatchSAE Fig. 5b. Writes results.csv, summary.csv and accuracy_vs_k.png "
        "/ .html into --out; rerun the same command to resume. See docs/classify.md.",
    )
    p.add_argument("--model", help="CLIP backbone: hub id or local folder")
    p.add_argument("--data", help="labelled images: image folder, dataset folder or name")
    p.add_argument("--split", help="dataset split (default train)")
    p.add_argument("--out", help="output folder")
    p.add_argument("--sae", help="SAE checkpoint (splicing and masking)")
    p.add_argument("--layer", type=int, help="block index of the SAE (default -2)")
    p.add_argument("--atlas", help="atlas folder whose counts rank the latents")
    p.add_argument("--atlas-dataset", help="dataset of the atlas (needed when it holds several)")
    p.add_argument(
        "--selections",
        nargs="*",
        choices=["class", "dataset", "random"],
        help="latent rankings (default class; none: no masking)",
    )
    p.add_argument("--ks", type=int, nargs="+", help="latents per class (0: all)")
    p.add_argument("--mask-by", choices=["label", "predicted"], help="class whose latents mask")
    p.add_argument("--tokens", choices=["all", "cls", "patches"], help="tokens spliced")
    p.add_argument("--error", action="store_true", help="add back the reconstruction error")
    p.add_argument(
        "--same-split",
        action="store_true",
        help="allow the atlas to come from the evaluated images (the paper's protocol)",
    )
    p.add_argument("--single-template", action="store_true", help="'a photo of a {name}.' only")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the model's)")
    p.add_argument("--limit", type=int, help="classify that many images, drawn with seed")
    p.add_argument("--batch-size", type=int, help="images per batch (default 32)")
    p.add_argument("--device", help="torch device (default cpu)")
    p.add_argument("--config", help="YAML file with ClassifyConfig keys")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.set_defaults(func=_run)
