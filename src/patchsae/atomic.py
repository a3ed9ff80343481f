"""Atomic file writes: a temporary file beside the target, fsynced, then renamed onto it.

Readers, and runs resumed after a kill, see either the old file or the new one, never a mix.
Temporary files are named ``.{name}.XXXX.tmp`` in the target's folder and removed on failure.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

TMP_SUFFIX = ".tmp"


def _temp_beside(path: Path) -> tuple[int, Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    return fd, Path(name)


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file for writing; on a clean exit it is fsynced and renamed to ``path``."""
    path = Path(path)
    fd, tmp = _temp_beside(path)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_with(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp_path)`` (for libraries that write by path), then rename onto ``path``."""
    path = Path(path)
    fd, tmp = _temp_beside(path)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_file(path, "w") as f:
        f.write(text)


def write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    """Write ``obj`` as JSON (with a final newline) to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=indent) + "\n")
