"""The ``patchsae`` command: argument parsing only, every subcommand calls a library function.

Each command module exposes ``register(subparsers)``, which adds its parser and sets
``func(args) -> int`` as the parser default.

Errors that describe bad input (the ``ValueError`` subclasses defined in ``patchsae``, such as
``ConfigError`` or ``DataError``) and file-system errors print one line and exit with status 2;
any other exception is a bug and keeps its traceback. ``PATCHSAE_TRACEBACK=1`` re-raises every
error. Ctrl-C prints how to resume and exits with status 130.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

COMMAND_MODULES = (
    "patchsae.extract",
    "patchsae.train.cli",
    "patchsae.metrics.cli",
    "patchsae.stats.cli",
    "patchsae.verify",
    "patchsae.explore.cli",
    "patchsae.quickstart",
    "patchsae.adapt.cli",
    "patchsae.classify.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="patchsae",
        description="Sparse autoencoders on every patch token of vision transformers.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


TRACEBACK_ENV = "PATCHSAE_TRACEBACK"
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def is_user_error(err: BaseException) -> bool:
    """True for errors about the input or the file system, reported in one line.

    These are ``ValueError`` subclasses defined in ``patchsae`` (every one states the problem
    and the fix) and ``OSError`` (missing files, permissions, full disks). A plain
    ``ValueError`` or any other exception comes from a bug and keeps its traceback.
    """
    if isinstance(err, OSError):
        return True
    return isinstance(err, ValueError) and any(
        cls.__module__.startswith("patchsae.") for cls in type(err).__mro__
    )


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """``parser.parse_args``, but ``key=value`` overrides may come anywhere, also after flags
    (``train cfg.yaml --resume lr=1e-4``): argparse stops a positional list at the first flag."""
    args, extra = parser.parse_known_args(argv)
    overrides = [a for a in extra if "=" in a and not a.startswith("-")]
    unknown = [a for a in extra if a not in overrides]
    if unknown or (overrides and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if os.environ.get(TRACEBACK_ENV) == "1":
            raise
        print(
            f"patchsae {args.command}: interrupted; "
            "rerun the same command to resume (train: add --resume)",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    except Exception as err:
        if not is_user_error(err) or os.environ.get(TRACEBACK_ENV) == "1":
            raise
        print(f"patchsae {args.command}: error: {err}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
