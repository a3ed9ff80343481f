"""The one re-batching generator: batch i is items [i * size, (i + 1) * size) of the stream,
and a stream resumed at batch i (or at a yielded position) is the tail of the stream from 0."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from patchsae.data import ActivationStore
from patchsae.data.loaders import image_batches_from_store, token_batches
from patchsae.data.rebatch import rebatch
from tiny_stores import make_store

chunk_sizes = st.lists(st.integers(0, 9), min_size=1, max_size=8)


def numbered_chunks(sizes: list[int]) -> list[tuple[int, np.ndarray]]:
    """Chunk k holds the next ``sizes[k]`` integers of 0, 1, 2, ..."""
    bounds = np.cumsum([0, *sizes])
    return [(k, np.arange(bounds[k], bounds[k + 1])) for k in range(len(sizes))]


@given(sizes=chunk_sizes, size=st.integers(1, 7), keep_last=st.booleans())
def test_batches_are_consecutive_slices_of_the_stream(sizes, size, keep_last) -> None:
    total = sum(sizes)
    got = [
        b.tolist()
        for b, _, _ in rebatch(numbered_chunks(sizes), size, np.concatenate, keep_last=keep_last)
    ]
    n_batches = -(-total // size) if keep_last else total // size
    assert got == [list(range(i * size, min((i + 1) * size, total))) for i in range(n_batches)]


@given(sizes=chunk_sizes, size=st.integers(1, 7), data=st.data())
def test_resume_at_a_yielded_position_gives_the_tail(sizes, size, data) -> None:
    chunks = numbered_chunks(sizes)
    full = list(rebatch(chunks, size, np.concatenate))
    if not full:
        return
    i = data.draw(st.integers(0, len(full) - 1))
    _, key, offset = full[i]
    resumed = list(rebatch(chunks[key:], size, np.concatenate, skip=offset))
    assert [b.tolist() for b, _, _ in resumed] == [b.tolist() for b, _, _ in full[i + 1 :]]
    assert [(k, o) for _, k, o in resumed] == [(k, o) for _, k, o in full[i + 1 :]]
    # a used-up chunk is left before the batch is yielded: the position is at a chunk's end
    # only when that chunk is empty or the last one
    assert offset < sizes[key] or sizes[key] == 0 or key == len(sizes) - 1


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ActivationStore:
    """11 images of 4 tokens, each token's values coding (image, token)."""
    n, t, d = 11, 4, 2
    acts = np.zeros((n, t, d), dtype=np.float32)
    acts[:, :, 0] = np.arange(n)[:, None]
    acts[:, :, 1] = np.arange(t)[None, :]
    return ActivationStore.open(make_store(tmp_path_factory.mktemp("s") / "store", acts))


@settings(max_examples=40, deadline=None)
@given(
    seed=st.one_of(st.none(), st.integers(0, 2**32)),
    batch_size=st.integers(1, 30),
    window=st.integers(1, 12),
    start_batch=st.integers(0, 12),
    tokens=st.sampled_from(["all", "patches", "cls"]),
)
def test_token_batches_from_i_equal_the_tail_from_0(
    store, seed, batch_size, window, start_batch, tokens
) -> None:
    kw = {"seed": seed, "window_images": window, "tokens": tokens}
    full = list(itertools.islice(token_batches(store, batch_size, **kw), start_batch + 5))
    tail = token_batches(store, batch_size, start_batch=start_batch, **kw)
    for expected, got in zip(full[start_batch:], tail, strict=False):
        assert np.array_equal(expected.numpy(), got.numpy())


@settings(max_examples=40, deadline=None)
@given(
    seed=st.one_of(st.none(), st.integers(0, 2**32)),
    batch_size=st.integers(1, 11),
    start_batch=st.integers(0, 12),
    epochs=st.one_of(st.none(), st.integers(1, 3)),
)
def test_image_batches_from_i_equal_the_tail_from_0(
    store, seed, batch_size, start_batch, epochs
) -> None:
    kw = {"shuffle_seed": seed, "epochs": epochs}
    full = list(
        itertools.islice(image_batches_from_store(store, batch_size, **kw), start_batch + 30)
    )
    tail = list(
        itertools.islice(
            image_batches_from_store(store, batch_size, start_batch=start_batch, **kw), 30
        )
    )
    expected = full[start_batch:]
    if epochs is not None:
        assert len(tail) == len(expected)
    for e, g in zip(expected, tail, strict=False):
        assert np.array_equal(e.numpy(), g.numpy())
