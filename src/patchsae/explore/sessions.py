"""Per-browser-session state: each encoded image under its own unguessable token.

The only state shared between sessions is this bounded, locked table; a session reads and
writes nothing but its own entry, so concurrent sessions never see each other's images.
"""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict

from patchsae.explore.core import Encoded, ExploreError

MAX_SESSIONS = 64


class Sessions:
    """Least-recently-used table ``token -> Encoded`` of at most ``capacity`` entries."""

    def __init__(self, capacity: int = MAX_SESSIONS) -> None:
        if capacity < 1:
            raise ExploreError(f"session capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._entries: OrderedDict[str, Encoded] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, encoded: Encoded) -> str:
        """Store ``encoded`` under a new token and return the token."""
        token = secrets.token_urlsafe(18)
        with self._lock:
            self._entries[token] = encoded
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        return token

    def get(self, token: str) -> Encoded:
        """The image of session ``token``; an unknown or expired token raises ExploreError."""
        with self._lock:
            encoded = self._entries.get(token)
            if encoded is not None:
                self._entries.move_to_end(token)
        if encoded is None:
            raise ExploreError("this image's session has expired or is unknown: upload it again")
        return encoded

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
