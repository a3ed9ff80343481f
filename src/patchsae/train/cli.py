"""The ``patchsae train`` command."""

from __future__ import annotations

import argparse


def _run(args: argparse.Namespace) -> int:
    from patchsae.train.config import load_train_config
    from patchsae.train.log import run_summary
    from patchsae.train.trainer import train

    cfg = load_train_config(args.config, args.overrides)
    out = train(cfg, resume=args.resume)
    print(run_summary(cfg, out))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train CONFIG [key=value ...] [--resume]``."""
    p = subparsers.add_parser(
        "train",
        help="train sparse autoencoders on stored or streamed activations",
        description="Train one SAE (or a sweep of SAEs side by side) from a YAML config.",
    )
    p.add_argument("config", help="YAML file of TrainConfig options (see configs/patchsae.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. lr=1e-4")
    p.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in out="
    )
    p.set_defaults(func=_run)
