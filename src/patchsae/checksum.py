"""Content checksums of the files we write (store shards and index files, SAE weights, trainer
checkpoints), so that bytes changed in place are detected instead of silently read.

A checksum is the string ``"blake2b:<32 hex digits>"`` (BLAKE2b, 16-byte digest, from
``hashlib``: no extra dependency; 250 MiB/s measured on one busy shared core). Formats record it
beside the file's name when the file is written; readers call :func:`file_problem` and treat a
mismatch as damage. Files written before checksums existed have none recorded and are only
checked for size.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

ALGORITHM = "blake2b"
CHUNK_BYTES = 2**22


def file_checksum(path: str | os.PathLike) -> str:
    """``"blake2b:<hex>"`` of the bytes of ``path``, read in 4 MiB chunks."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return f"{ALGORITHM}:{digest.hexdigest()}"


def file_problem(path: str | os.PathLike, expected: str | None) -> str | None:
    """Why ``path`` does not hold the bytes whose checksum is ``expected``, or None when it does
    (or when ``expected`` is None: nothing was recorded)."""
    path = Path(path)
    if expected is None:
        return None if path.is_file() else "is missing"
    if not path.is_file():
        return "is missing"
    if not isinstance(expected, str) or not expected.startswith(f"{ALGORITHM}:"):
        return f"has an unknown recorded checksum {expected!r}"
    found = file_checksum(path)
    if found != expected:
        return f"has changed since it was written (checksum {found}, {expected} recorded)"
    return None
