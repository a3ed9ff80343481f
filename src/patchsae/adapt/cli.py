"""The ``patchsae adapt`` command: few-shot MaPLe / CoOp training, official-checkpoint import."""

from __future__ import annotations

import argparse

from patchsae.config import load_config


def _run(args: argparse.Namespace) -> int:
    from .train import AdaptConfig, adapt_run

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config:
        config, overrides = None, [config, *overrides]
    cfg = load_config(AdaptConfig, config, [*overrides, f"prompt.method={args.method}"])
    print(adapt_run(cfg, resume=args.resume))
    return 0


def _import(args: argparse.Namespace) -> int:
    from patchsae.backbones import load_backbone

    from .checkpoint import load_official, save_adapter
    from .config import PromptConfig

    cfg = load_config(PromptConfig, None, args.overrides)
    base = load_backbone(args.model, device="cpu", tokenizer=args.tokenizer)
    adapted = load_official(args.checkpoint, base, cfg)
    print(
        save_adapter(
            adapted,
            args.out,
            base_model=args.model,
            tokenizer=args.tokenizer,
            extra={"imported_from": str(args.checkpoint)},
        )
    )
    return 0


def _compare(args: argparse.Namespace) -> int:
    from .compare import CompareConfig, compare

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config:
        config, overrides = None, [config, *overrides]
    print(compare(load_config(CompareConfig, config, overrides)))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``adapt {maple,coop} [CONFIG] [key=value ...] [--resume]``, ``adapt import`` and
    ``compare [CONFIG] [key=value ...]``."""
    p = subparsers.add_parser(
        "adapt",
        help="few-shot prompt learning (MaPLe, CoOp) on a CLIP, or import an official checkpoint",
        description=(
            "Train MaPLe or CoOp prompts on N shots per class (MaPLe's base-to-novel recipe by "
            "default), or convert an official MaPLe/CoOp checkpoint into an adapter folder."
        ),
    )
    sub = p.add_subparsers(dest="adapt_command", metavar="METHOD", required=True)
    for method in ("maple", "coop"):
        q = sub.add_parser(method, help=f"train {method} prompts (see docs/adapt.md)")
        q.add_argument("config", nargs="?", help="YAML file of AdaptConfig options (optional)")
        q.add_argument(
            "overrides", nargs="*", help="dotted key=value overrides, e.g. data.source=DIR out=DIR"
        )
        q.add_argument("--resume", action="store_true", help="continue the run in out=")
        q.set_defaults(func=_run, method=method)
    q = sub.add_parser("import", help="official model.pth.tar-N -> adapter folder")
    q.add_argument("checkpoint", help="a MaPLe/CoOp (Dassl) model.pth.tar-N file")
    q.add_argument("--model", required=True, help="the CLIP it was trained on (hub id or folder)")
    q.add_argument("--tokenizer", default=None, help="tokenizer folder when the model has none")
    q.add_argument("--out", required=True, help="adapter folder to write")
    q.add_argument(
        "overrides", nargs="*", help="prompt settings, e.g. depth=3 n_ctx=2 method=maple"
    )
    q.set_defaults(func=_import)
    c = subparsers.add_parser(
        "compare",
        help="remapping analysis: one SAE on a base CLIP and its adapted version",
        description=(
            "Atlases of one SAE on the base and the adapted model over one labelled dataset, "
            "per-latent and per-class changes, and a Markdown/HTML report (docs/adapt.md)."
        ),
    )
    c.add_argument("config", nargs="?", help="YAML file of CompareConfig options (optional)")
    c.add_argument(
        "overrides",
        nargs="*",
        help=(
            "dotted key=value overrides: sae= base= adapted= data.source= layer= out= k= "
            "classify_split= (runs the masking protocol on that split)"
        ),
    )
    c.set_defaults(func=_compare)
