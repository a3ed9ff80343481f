"""Local paths given on the command line or in configs: resolved names, folder and output checks."""

from __future__ import annotations

import os
from pathlib import Path


def resolve_local(path_or_name: str | None) -> str | None:
    """A local file or folder as its resolved absolute path; other names (hub ids) unchanged.

    Outputs record paths this way, so the same folder named differently (``DIR/``, a relative
    path from another directory) is recognised as the same input.
    """
    if path_or_name is None:
        return None
    path = Path(path_or_name).expanduser()
    return str(path.resolve()) if path.exists() else path_or_name


def check_local_folder(
    source: str, error_cls: type[ValueError], *, kind: str = "folder", fix: str
) -> Path | None:
    """``source`` as a ``~``-expanded path when it is an existing folder, None for other names.

    A ``source`` that is an existing file raises ``error_cls`` ("X is a file, not a ``kind``:
    ``fix``"); one that starts with ``/``, ``.`` or ``~`` names a local path, so when nothing is
    there it raises ``error_cls`` too ("folder X does not exist") instead of passing as a name.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise error_cls(f"{source} is a file, not a {kind}: {fix}")
    if source.startswith(("/", ".", "~")):
        raise error_cls(f"folder {source} does not exist: check the path")
    return None


def check_writable_file(
    path: str | os.PathLike, error_cls: type[ValueError], name: str = "output"
) -> None:
    """Refuse, before any work, an output file ``path`` that cannot be written: a folder, or a
    path under a file or a missing folder that cannot be created."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise error_cls(f"{name} {path} is a folder: pass a file path, e.g. {target / 'out.json'}")
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise error_cls(f"{name} {path} lies under {parent}, which is a file: choose another path")
    if not os.access(parent, os.W_OK):
        raise error_cls(f"{name} {path}: {parent} is not writable: choose another path")
