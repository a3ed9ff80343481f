"""``patchsae explore``: open an atlas with its SAE and backbone, then serve the web app."""

from __future__ import annotations

import argparse

EXTRA_HINT = "the explorer needs FastAPI and uvicorn: pip install 'patchsae[explore]'"


def build_explorer(args: argparse.Namespace):  # -> Explorer
    from patchsae.explore.core import open_model
    from patchsae.explore.explorer import Explorer

    models = [open_model(args.atlas, sae=args.sae, model=args.model, device=args.device)]
    if args.adapted is not None:
        models.append(
            open_model(
                args.adapted,
                sae=args.adapted_sae,
                model=args.adapted_model,
                name="adapted",
                device=args.device,
            )
        )
    return Explorer(models, max_sessions=args.max_sessions)


def serve_explorer(explorer, host: str, port: int) -> None:
    """Serve ``explorer`` until interrupted; a missing ``explore`` extra is a one-line error."""
    from patchsae.explore.core import ExploreError

    try:
        from patchsae.explore.server import serve
    except ImportError as err:
        raise ExploreError(f"{EXTRA_HINT} ({err})") from None
    serve(explorer, host=host, port=port)


def _run(args: argparse.Namespace) -> int:
    serve_explorer(build_explorer(args), args.host, args.port)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``explore --atlas DIR [--adapted DIR] [--sae PATH] [--model NAME] ...``."""
    p = subparsers.add_parser(
        "explore",
        help="web app: upload an image, click a patch, browse the latents of an atlas",
        description="Serve the explorer for an atlas written by patchsae stats. The SAE and the "
        "backbone default to the ones the atlas records.",
    )
    p.add_argument("--atlas", required=True, help="atlas folder (patchsae stats out=)")
    p.add_argument(
        "--adapted",
        default=None,
        help="atlas of an adapted model (same backbone layout and d_sae), shown side by side",
    )
    p.add_argument(
        "--adapted-model",
        default=None,
        help="the adapted model (e.g. a MaPLe adapter folder; default: the --adapted atlas's "
        "backbone, which for prompt adapters is only the base)",
    )
    p.add_argument("--adapted-sae", default=None, help="SAE of --adapted (default: its atlas's)")
    p.add_argument("--sae", default=None, help="SAE checkpoint (default: the atlas's)")
    p.add_argument("--model", default=None, help="backbone (default: the atlas's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    p.add_argument("--max-sessions", type=int, default=64, help="images kept at once")
    p.set_defaults(func=_run)
