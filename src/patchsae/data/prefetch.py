"""Read batches ahead on a background thread, so input never stalls the training step.

``Prefetcher`` wraps any iterator of ``(tensor, position)`` pairs (a training source's
``batches``): a thread keeps up to ``depth`` of them ready, in page-locked (pinned) memory when
asked, so the step can copy them to the GPU with ``non_blocking=True``. Order, values and
positions are those of the wrapped iterator; an exception raised by it is raised again by
``next`` in the consumer.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator
from typing import Any

import torch

_END = object()


class Prefetcher:
    """Iterate over ``batches`` from a background thread, up to ``depth`` items ahead.

    Each item is ``(x, position)`` with ``x`` a tensor; with ``pin`` the thread moves ``x`` to
    pinned memory. ``close()`` (or leaving a ``with`` block) stops the thread.
    """

    def __init__(self, batches: Iterator[tuple[torch.Tensor, Any]], depth: int = 2, pin=False):
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self._batches, self._pin = batches, pin
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._produce, name="prefetch", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            for x, position in self._batches:
                if self._pin:
                    x = x.pin_memory()
                if not self._put((x, position)):
                    return
            self._put(_END)
        except BaseException as err:  # handed to the consumer, raised there
            self._put(err)

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> tuple[torch.Tensor, Any]:
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if item is _END:
            self._done = True
            raise StopIteration
        if isinstance(item, BaseException):
            self._done = True
            raise item
        return item

    def close(self) -> None:
        """Stop the thread (it finishes the batch it is reading) and drop what it read."""
        self._stop.set()
        self._done = True
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self._queue.get(timeout=0.05)
        self._thread.join()

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
