"""One home for re-batching: a stream of chunks cut into fixed-size batches, resumable.

The store loaders (``token_batches``, ``image_batches_from_store``) and the trainer's streaming
source each produce their stream as chunks (a window of tokens, an epoch's image order, a window
of computed activations) and let ``rebatch`` cut it: batch i holds items
[i * size, (i + 1) * size) of the concatenated chunks, whatever the chunk sizes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def rebatch(
    chunks: Iterable[tuple[Any, Sequence[Any]]],
    size: int,
    concat: Callable[[list[Any]], T],
    *,
    skip: int = 0,
    keep_last: bool = False,
) -> Iterator[tuple[T, Any, int]]:
    """Batches of ``size`` items cut from ``chunks``, each with where the stream continues.

    chunks: (key, items) pairs; items is sliceable with a length (an array, a tensor; it may be
    empty), key names the chunk for resuming. The first ``skip`` items of the stream are left out
    (a resume inside the first chunk). Yields ``(batch, key, offset)``: ``concat`` of the batch's
    pieces in stream order, and the position after it, item ``offset`` of chunk ``key``. A chunk
    used up by a batch is left before the batch is yielded, so the position is then the start
    of the next chunk (or the end of the last one when the stream ends there). ``keep_last``
    also yields the incomplete last batch of a finite stream.
    """
    stream = iter(chunks)
    current = next(stream, None)
    pieces: list[Any] = []
    have = 0
    while current is not None:
        key, items = current
        n = len(items)
        offset = min(skip, n)
        skip -= offset
        while True:
            take = min(size - have, n - offset)
            if take > 0:
                pieces.append(items[offset : offset + take])
                have, offset = have + take, offset + take
            if offset >= n:
                current = next(stream, None)
                if have == size:
                    after = (current[0], 0) if current is not None else (key, offset)
                    yield concat(pieces), *after
                    pieces, have = [], 0
                break
            if have == size:
                yield concat(pieces), key, offset
                pieces, have = [], 0
    if keep_last and have:
        yield concat(pieces), key, offset
