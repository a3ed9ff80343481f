"""Exclusive locks on output folders (activation stores, training runs).

``FolderLock(folder, busy)`` takes a POSIX record lock (``lockf``) on ``folder/.lock`` or raises
``busy``. The lock belongs to this process only: forked DataLoader workers do not keep it, and the
kernel drops it when the process dies (even by SIGKILL), so a stale ``.lock`` file never blocks a
rerun. A second lock on the same folder, from this process or another, is refused.
"""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

LOCK = ".lock"

_LOCKED: set[Path] = set()
_LOCKED_GUARD = threading.Lock()


class FolderLock:
    """Holds ``folder/.lock`` from construction until :meth:`release` (or the ``with`` exit)."""

    def __init__(self, folder: str | os.PathLike, busy: Exception) -> None:
        self.path = (Path(folder) / LOCK).resolve()
        self._fd = -1
        with _LOCKED_GUARD:
            if self.path in _LOCKED:
                raise busy
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise busy from None
            _LOCKED.add(self.path)
        self._fd = fd

    def release(self) -> None:
        """Release the lock (idempotent)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            with _LOCKED_GUARD:
                _LOCKED.discard(self.path)

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
