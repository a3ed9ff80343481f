"""The background batch reader: same items in the same order, errors reach the consumer, and
closing stops the thread."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from patchsae.data.prefetch import Prefetcher


def numbered(n: int):
    for i in range(n):
        yield torch.full((2, 3), float(i)), {"position": i + 1}


@pytest.mark.parametrize("depth", [1, 3])
def test_same_items_in_the_same_order(depth):
    got = list(Prefetcher(numbered(7), depth=depth))
    want = list(numbered(7))
    assert len(got) == 7
    for (x, pos), (y, ref) in zip(got, want, strict=True):
        assert torch.equal(x, y) and pos == ref


def test_errors_of_the_source_reach_the_consumer():
    def failing():
        yield from numbered(2)
        raise OSError("shard 3 is truncated")

    it = Prefetcher(failing())
    assert [int(x[0, 0]) for x, _ in (next(it), next(it))] == [0, 1]
    with pytest.raises(OSError, match="shard 3 is truncated"):
        next(it)
    with pytest.raises(StopIteration):
        next(it)


def test_close_stops_an_endless_source_and_reads_at_most_depth_ahead():
    read = []

    def endless():
        i = 0
        while True:
            read.append(i)
            yield torch.zeros(1), i
            i += 1

    before = threading.active_count()
    with Prefetcher(endless(), depth=2) as it:
        assert next(it)[1] == 0
        time.sleep(0.2)
        assert len(read) <= 1 + 2 + 1  # consumed, queued, and one being handed over
    assert threading.active_count() == before
    with pytest.raises(StopIteration):
        next(it)


def test_bad_depth_is_refused():
    with pytest.raises(ValueError, match="prefetch depth must be >= 1"):
        Prefetcher(numbered(1), depth=0)
