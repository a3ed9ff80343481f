"""``patchsae evaluate``: argument parsing over ``patchsae.metrics.evaluate``."""

from __future__ import annotations

import argparse

from patchsae.atomic import json_ready, write_json
from patchsae.data.images import DataConfig
from patchsae.metrics.evaluate import EvaluateError, evaluate, format_table
from patchsae.metrics.fidelity import DEFAULT_TEMPLATES, FidelityConfig
from patchsae.paths import check_writable_file


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``evaluate`` subcommand."""
    p = subparsers.add_parser(
        "evaluate",
        help="reconstruction metrics of an SAE on a store slice, and CLIP downstream fidelity",
        description="FVU, explained variance, cosine, L0 and dead/dense latents of an SAE on the "
        "last --images images of an activation store; with --data also zero-shot "
        "cross-entropy with the SAE spliced in (CLIP backbones).",
    )
    p.add_argument(
        "--sae",
        required=True,
        help="SAE checkpoint (folder or file), or a training run folder (its final SAE, else its "
        "latest checkpoint)",
    )
    p.add_argument("--store", required=True, help="activation store folder")
    p.add_argument("--layer", type=int, default=None, help="store layer (default: its only one)")
    p.add_argument("--images", type=int, default=None, help="last N images (default: all)")
    p.add_argument("--batch-size", type=int, default=8, help="images per batch (default: 8)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="also write the metrics to this JSON file")
    f = p.add_argument_group("downstream fidelity (CLIP)")
    f.add_argument("--data", default=None, help="labelled images: ImageFolder or dataset")
    f.add_argument("--model", default=None, help="backbone (default: the store's)")
    f.add_argument("--split", default="test")
    f.add_argument("--class-names-file", default=None)
    f.add_argument("--limit", type=int, default=None, help="score N images (default: all)")
    f.add_argument("--seed", type=int, default=0, help="which --limit images are drawn")
    f.add_argument(
        "--template",
        action="append",
        dest="templates",
        default=None,
        help=f"prompt template with {{name}}, repeatable (default: {DEFAULT_TEMPLATES[0]!r})",
    )
    f.add_argument("--tokenizer", default=None, help="CLIP tokenizer folder (default: model's)")
    f.add_argument("--fidelity-batch-size", type=int, default=32)
    f.add_argument("--num-workers", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.out is not None:
        check_writable_file(args.out, EvaluateError, "--out")
    fidelity = None
    if args.data is not None:
        fidelity = FidelityConfig(
            data=DataConfig(args.data, split=args.split, class_names_file=args.class_names_file),
            limit=args.limit,
            seed=args.seed,
            templates=tuple(args.templates) if args.templates else DEFAULT_TEMPLATES,
            tokenizer=args.tokenizer,
            batch_size=args.fidelity_batch_size,
            num_workers=args.num_workers,
        )
    elif args.model is not None or args.limit is not None:
        raise EvaluateError("--model and --limit are for fidelity: add --data LABELLED_IMAGES")
    result = evaluate(
        args.sae,
        args.store,
        layer=args.layer,
        images=args.images,
        batch_size=args.batch_size,
        device=args.device,
        fidelity=fidelity,
        model=args.model,
    )
    print(format_table(result))
    if args.out is not None:
        write_json(args.out, json_ready(result))
        print(f"\nwrote {args.out}")
    return 0
