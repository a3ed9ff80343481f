"""Start the explorer on a free localhost port in a background thread, for tests."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from typing import Any

import uvicorn

from patchsae.explore.explorer import Explorer
from patchsae.explore.server import create_app


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running(explorer: Explorer):
    """Yields the base URL of a server for ``explorer``; stops it on exit."""
    port = free_port()
    config = uvicorn.Config(create_app(explorer), host="127.0.0.1", port=port, log_level="error")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the explorer server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def request(url: str, data: bytes | None = None) -> tuple[int, Any]:
    """(status, parsed JSON or raw bytes) of a GET, or a POST of ``data``."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=60) as answer:
            status, body, kind = answer.status, answer.read(), answer.headers["content-type"]
    except urllib.error.HTTPError as err:
        status, body, kind = err.code, err.read(), err.headers["content-type"]
    return status, json.loads(body) if kind.startswith("application/json") else body
