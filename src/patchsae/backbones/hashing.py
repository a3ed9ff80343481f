"""Content hash of a local model folder: its config and weight files."""

from __future__ import annotations

import hashlib
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_CHUNK = 1 << 22


def folder_hash(folder: str | Path) -> str:
    """sha256 over ``config.json`` and the weight files of ``folder``, in name order.

    Each file contributes its name, a NUL byte, its size and its bytes (read in 4 MiB chunks),
    so renaming, truncating or editing any of them changes the hash; other files do not count.
    """
    folder = Path(folder)
    files = [folder / "config.json"] + sorted(
        p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)
    )
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}\0{path.stat().st_size}\0".encode())
        with path.open("rb") as fh:
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()
