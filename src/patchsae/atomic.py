"""Atomic file writes: a temporary file beside the target, fsynced, then renamed onto it.

Readers, and runs resumed after a kill, see either the old file or the new one, never a mix.
Temporary files are named ``.{name}.XXXX.tmp`` in the target's folder and removed on failure.
Written files get the permissions a plain ``open()`` gives (``0o666 & ~umask``); text is UTF-8.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

TMP_SUFFIX = ".tmp"


def _current_umask() -> int:
    """The process umask (read by setting it and restoring it at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _temp_beside(path: Path) -> tuple[int, Path]:
    """A new temporary file beside ``path``, with the mode ``open()`` would give (0o666 & ~umask).

    ``mkstemp`` creates files 0o600 and ``os.replace`` keeps that mode, which would make the
    final file unreadable to other users of shared storage.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        os.fchmod(fd, 0o666 & ~_current_umask())
    except BaseException:
        os.close(fd)
        Path(name).unlink(missing_ok=True)
        raise
    return fd, Path(name)


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file for writing; on a clean exit it is fsynced and renamed to ``path``.

    Text modes write UTF-8 whatever the locale. The file gets the mode ``open()`` would give
    (``0o666 & ~umask``).
    """
    path = Path(path)
    fd, tmp = _temp_beside(path)
    encoding = None if "b" in mode else "utf-8"
    try:
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_with(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp_path)`` (for libraries that write by path), then rename onto ``path``.

    The mode is set again after ``write``: a library may replace the file (safetensors creates
    its files 0o600).
    """
    path = Path(path)
    fd, tmp = _temp_beside(path)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_current_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the entries of folder ``path`` (files created, renamed or removed) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_file(path, "w") as f:
        f.write(text)


def json_ready(value: Any) -> Any:
    """``value`` with every NaN or infinite float (in nested dicts, lists, tuples) made None, so
    that ``json.dumps`` writes strict JSON (null) instead of the invalid ``NaN``/``Infinity``."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    """Write ``obj`` as JSON (with a final newline) to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=indent) + "\n")
