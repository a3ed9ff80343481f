"""``patchsae verify PATH``: read every byte of an activation store, a training run, an SAE
folder or an atlas and compare it with the checksums recorded when it was written.

Each problem is printed as one line; any problem makes the command exit with status 2 and say
how to repair it (extract again: only damaged shards are recomputed; train --resume; save again).
Outputs written before checksums existed are checked for completeness and readability only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from patchsae.data.store import METADATA, verify_store


class VerifyError(ValueError):
    """The path is not something ``verify`` knows, or what it holds is damaged."""


def verify_run(out: Path) -> list[str]:
    """Problems of the training run folder ``out``: its latest checkpoint (every file against the
    recorded checksums, every member loadable) and its final SAE(s)."""
    from patchsae.sae.io import CFG, CheckpointError, load
    from patchsae.train.checkpoint import find_checkpoint, load_member, read_checkpoint
    from patchsae.train.errors import TrainingError

    problems = []
    ckpt = find_checkpoint(out)
    if ckpt is not None:
        try:
            state, _ = read_checkpoint(ckpt)
            for name in state["members"]:
                load_member(ckpt, name)
        except TrainingError as err:
            problems.append(str(err))
    for folder in [out, *sorted(out.glob("sae-*"))]:
        if (folder / CFG).is_file():
            try:
                load(folder)
            except CheckpointError as err:
                problems.append(str(err))
    return problems


def verify_sae(path: Path) -> list[str]:
    """Problems of the SAE checkpoint at ``path`` (loading it checks its weights' checksum)."""
    from patchsae.sae.io import CheckpointError, load

    try:
        load(path)
    except CheckpointError as err:
        return [str(err)]
    return []


def verify_atlas(path: Path) -> list[str]:
    """Problems of the atlas folder ``path`` (every dataset's arrays against their checksums)."""
    from patchsae.stats import Atlas, StatsError

    try:
        return Atlas.open(path).problems()
    except StatsError as err:
        return [str(err)]


def verify(path: str | Path) -> list[str]:
    """Every problem found in ``path`` (an activation store, a run folder, an SAE checkpoint or
    an atlas); an empty list when it is intact."""
    path = Path(path)
    if (path / METADATA).is_file():
        return verify_store(path)
    if (path / "atlas.json").is_file():
        return verify_atlas(path)
    if (path / "train_config.json").is_file():
        return verify_run(path)
    if (path / "cfg.json").is_file() or path.is_file():
        return verify_sae(path)
    raise VerifyError(
        f"{path} is neither an activation store (metadata.json), a training run "
        "(train_config.json), an SAE checkpoint (cfg.json) nor an atlas (atlas.json): pass one "
        "of those folders"
    )


def _run(args: argparse.Namespace) -> int:
    problems = verify(args.path)
    for problem in problems:
        print(problem)
    if problems:
        raise VerifyError(
            f"{len(problems)} problem(s) in {args.path}; a store is repaired by rerunning its "
            "extract command (only damaged shards are recomputed), a run by train --resume, an "
            "atlas dataset by rerunning its stats command"
        )
    print(json.dumps({"path": str(args.path), "ok": True}))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``verify PATH``."""
    p = subparsers.add_parser(
        "verify",
        help="check a store, a training run, an SAE or an atlas against its recorded checksums",
        description="Read every file of an activation store, a training run folder, an SAE "
        "checkpoint or an atlas and compare it with the checksums recorded when it was written.",
    )
    p.add_argument("path", help="store folder, run folder (out=), SAE checkpoint or atlas folder")
    p.set_defaults(func=_run)
