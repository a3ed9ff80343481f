"""Activation store writer/reader and the token / image loaders, on synthetic stores."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from patchsae.backbones import BackboneError, TokenLayout
from patchsae.data.images import BadRecord
from patchsae.data.loaders import image_batches_from_store, token_batches
from patchsae.data.shuffle import (
    epoch_order,
    keyed_rng,
    seeded_order,
    shuffle_window_tokens,
    window_positions,
)
from patchsae.data.store import (
    FORMAT_VERSION,
    ActivationStore,
    StoreError,
    StoreMetadata,
    StoreWriter,
    to_storage,
)

LAYOUT = TokenLayout(n_tokens=5, cls_index=0, patch_start=1, grid=(2, 2))
N_LAYERS = 4


def make_plan(dtype: str = "fp32", layers=(1, 3), d_model: int = 3, **extra) -> StoreMetadata:
    return StoreMetadata(
        format_version=FORMAT_VERSION,
        backbone={"name": "fake", "family": "vit", "n_layers": N_LAYERS},
        layers=list(layers),
        token_layout=LAYOUT.to_dict(),
        d_model=d_model,
        n_tokens=LAYOUT.n_tokens,
        dtype=dtype,
        **extra,
    )


def coded_acts(ids: np.ndarray, layer: int) -> torch.Tensor:
    """(n, T, 3): each token holds (example id, token position, layer), exact in every dtype."""
    n, t = len(ids), LAYOUT.n_tokens
    acts = torch.zeros(n, t, 3)
    acts[:, :, 0] = torch.as_tensor(ids, dtype=torch.float32)[:, None]
    acts[:, :, 1] = torch.arange(t, dtype=torch.float32)[None, :]
    acts[:, :, 2] = layer
    return acts


def write_store(
    root: Path,
    shards: list[np.ndarray],
    planned: int,
    dtype: str = "fp32",
    make_acts=coded_acts,
    d_model: int = 3,
) -> Path:
    """A store whose shard k holds the example ids ``shards[k]`` (planned ``planned`` each)."""
    with StoreWriter(root, make_plan(dtype, d_model=d_model)) as writer:
        entries = []
        for k, ids in enumerate(shards):
            shard = writer.shard(k, planned)
            for lo in range(0, len(ids), 2):
                chunk = ids[lo : lo + 2]
                shard.append(
                    {layer: to_storage(make_acts(chunk, layer), dtype) for layer in (1, 3)}
                )
            bad = [{"example_id": -1, "where": f"bad{k}", "reason": "x"}] * (planned - len(ids))
            entries.append(
                shard.commit(
                    {"example_ids": ids.tolist(), "labels": (ids % 3).tolist(), "bad": bad}
                )
            )
        writer.finalize(entries, [BadRecord(**b) for e in entries for b in e["bad"]])
    return root


@pytest.fixture
def coded_store(tmp_path: Path) -> ActivationStore:
    """23 images in 5 shards of 6 planned (2 and 5 images dropped as bad); id i at slot i."""
    ids = np.arange(23)
    shards = [ids[0:6], ids[6:10], ids[10:16], ids[16:22], ids[22:23]]
    return ActivationStore.open(write_store(tmp_path / "s", shards, planned=6))


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_round_trip_every_dtype(tmp_path: Path, dtype: str) -> None:
    gen = torch.Generator().manual_seed(0)
    data = {layer: torch.randn(7, LAYOUT.n_tokens, 8, generator=gen) * 10 for layer in (1, 3)}
    shards = [np.arange(0, 4), np.arange(4, 7)]

    def acts(ids: np.ndarray, layer: int) -> torch.Tensor:
        return data[layer][torch.as_tensor(ids)]

    store = ActivationStore.open(write_store(tmp_path / dtype, shards, 4, dtype, acts, 8))
    cast = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    for layer in (1, 3):
        expected = data[layer].to(cast).float().numpy()
        assert not np.array_equal(expected, data[layer].numpy()) or dtype == "fp32"
        got = np.stack([store.get(i, layer) for i in range(len(store))]).astype(np.float32)
        np.testing.assert_array_equal(got, expected)
        np.testing.assert_array_equal(store.images(2, 6, layer).astype(np.float32), expected[2:6])
    np.testing.assert_array_equal(store[5].astype(np.float32), data[1][5].to(cast).float().numpy())
    assert store.get(5, -1).shape == (LAYOUT.n_tokens, 8)
    assert store.images(0, 4, 3).dtype == (np.float32 if dtype != "fp16" else np.float16)


def test_metadata_index_and_memmap(coded_store: ActivationStore) -> None:
    store = coded_store
    assert len(store) == 23
    assert store.layers == [1, 3]
    assert store.token_layout == LAYOUT
    assert (store.n_tokens, store.d_model) == (5, 3)
    assert store.metadata["complete"] is True
    assert store.metadata["shard_counts"] == [6, 4, 6, 6, 1]
    assert store.metadata["n_bad"] == 2 + 5
    np.testing.assert_array_equal(store.example_ids, np.arange(23))
    np.testing.assert_array_equal(store.labels, np.arange(23) % 3)
    bad = json.loads((store.root / "bad_images.json").read_text())
    assert [b["where"] for b in bad] == ["bad1"] * 2 + ["bad4"] * 5
    view = store.images(6, 10, layer=3)
    assert isinstance(view, np.memmap)
    np.testing.assert_array_equal(view[:, 0, 0], [6, 7, 8, 9])
    assert np.all(view[..., 2] == 3)
    across = store.images(4, 12)
    np.testing.assert_array_equal(across[:, 0, 0], np.arange(4, 12))
    np.testing.assert_array_equal(store[9][:, 1], np.arange(5))
    assert store[-1][0, 0] == 22
    with pytest.raises(IndexError):
        store[23]
    with pytest.raises(StoreError, match="stored layers"):
        store.get(0, layer=2)
    shard_file = np.load(store.root / "layer_1" / "00001.npy", mmap_mode="r")
    assert shard_file.shape == (4, 5, 3)


def test_take_reads_rows_and_tokens(coded_store: ActivationStore) -> None:
    got = coded_store.take(np.array([0, 3, 7, 8, 9, 15, 22]), layer=1, tokens=slice(1, 5))
    assert got.dtype == np.float32 and got.shape == (7, 4, 3)
    np.testing.assert_array_equal(got[:, 0, 0], [0, 3, 7, 8, 9, 15, 22])
    np.testing.assert_array_equal(got[3, :, 1], [1, 2, 3, 4])


def test_open_refuses_incomplete_and_unknown_version(tmp_path: Path) -> None:
    root = tmp_path / "s"
    with StoreWriter(root, make_plan()) as writer:
        shard = writer.shard(0, 2)
        shard.append({layer: coded_acts(np.arange(2), layer) for layer in (1, 3)})
        shard.commit({"example_ids": [0, 1], "labels": [0, 0], "bad": []})
    with pytest.raises(StoreError, match="incomplete.*rerun"):
        ActivationStore.open(root)
    meta = json.loads((root / "metadata.json").read_text())
    (root / "metadata.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(StoreError, match="format_version 99"):
        ActivationStore.open(root)
    with pytest.raises(StoreError, match="no metadata.json"):
        ActivationStore.open(tmp_path / "missing")


def test_writer_refuses_other_plan_and_foreign_folder(tmp_path: Path) -> None:
    root = tmp_path / "s"
    StoreWriter(root, make_plan()).close()
    with pytest.raises(StoreError, match=r"differs in: dtype, layers.*new --out"):
        StoreWriter(root, make_plan(dtype="fp16", layers=(2,)))
    with StoreWriter(root, make_plan()) as writer:
        assert not writer.complete
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("x")
    with pytest.raises(StoreError, match="not empty"):
        StoreWriter(foreign, make_plan())


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_append_takes_storage_arrays_only(tmp_path: Path, dtype: str) -> None:
    acts = coded_acts(np.arange(2), 1) + 0.1
    with StoreWriter(tmp_path / "s", make_plan(dtype, layers=(1,))) as writer:
        shard = writer.shard(0, 2)
        with pytest.raises(StoreError, match=f"float32 values.*to_storage\\(acts, '{dtype}'\\)"):
            shard.append({1: acts})
        assert shard.n_rows == 0
        shard.append({1: to_storage(acts, dtype)})
        entry = shard.commit({"example_ids": [0, 1], "labels": [0, 0], "bad": []})
        writer.finalize([entry], [])
    stored = np.load(tmp_path / "s" / "layer_1" / "00000.npy")
    np.testing.assert_array_equal(stored, to_storage(acts, dtype))


def test_writer_lock_and_shard_verification(tmp_path: Path) -> None:
    root = tmp_path / "s"
    with StoreWriter(root, make_plan()) as writer:
        with pytest.raises(StoreError, match="another process"):
            StoreWriter(root, make_plan())
        shard = writer.shard(0, 2)
        shard.append({layer: coded_acts(np.arange(2), layer) for layer in (1, 3)})
        shard.commit({"example_ids": [0, 1], "labels": [0, 0], "bad": []})
        assert writer.shard_entry(0)["n_images"] == 2
        assert writer.shard_entry(1) is None
        path = root / "layer_3" / "00000.npy"
        path.write_bytes(path.read_bytes()[:-4])
        assert writer.shard_entry(0) is None
    (root / "layer_1" / "00001.npy.tmp").write_bytes(b"partial")
    StoreWriter(root, make_plan()).close()
    assert not (root / "layer_1" / "00001.npy.tmp").exists()


def all_tokens(batches) -> np.ndarray:
    return np.concatenate([b.numpy() for b in batches])


def test_token_batches_every_token_once_per_epoch(coded_store: ActivationStore) -> None:
    n_tokens = 23 * 5
    stream = all_tokens(token_batches(coded_store, 5, seed=3, window_images=4, epochs=2))
    assert stream.shape == (2 * n_tokens, 3)
    for epoch in range(2):
        part = stream[epoch * n_tokens : (epoch + 1) * n_tokens]
        pairs = sorted(map(tuple, part[:, :2].astype(int).tolist()))
        assert pairs == [(i, t) for i in range(23) for t in range(5)]
    assert np.all(stream[:, 2] == 1)
    assert not np.array_equal(stream[:n_tokens], stream[n_tokens:])
    first_window = stream[: 4 * 5]
    assert len(np.unique(first_window[:, 0])) == 4
    positions = first_window[:, 1]
    assert not np.all(np.diff(positions) == 1)


def test_token_batches_seed_and_resume(coded_store: ActivationStore) -> None:
    def stream(**kw):
        return [b.numpy() for b in token_batches(coded_store, 7, window_images=3, **kw)]

    full = stream(seed=11, epochs=3)
    assert len(full) == (3 * 23 * 5) // 7
    assert all(b.shape == (7, 3) and b.dtype == np.float32 for b in full)
    same = stream(seed=11, epochs=3)
    assert all(np.array_equal(a, b) for a, b in zip(full, same, strict=True))
    other = stream(seed=12, epochs=3)
    assert not all(np.array_equal(a, b) for a, b in zip(full, other, strict=True))
    for start_batch in (1, 16, 17, 33, len(full) - 1):
        tail = stream(seed=11, epochs=3, start_batch=start_batch)
        assert len(tail) == len(full) - start_batch
        assert all(np.array_equal(a, b) for a, b in zip(full[start_batch:], tail, strict=True))
    infinite = token_batches(coded_store, 7, seed=11, window_images=3)
    for b in full:
        assert np.array_equal(next(infinite).numpy(), b)
    unshuffled = all_tokens(token_batches(coded_store, 5, seed=None, epochs=1))
    np.testing.assert_array_equal(unshuffled[:, 0], np.repeat(np.arange(23), 5))


def derived_order(n: int, seed: int, *keys: int) -> np.ndarray:
    """The documented keyed permutation, re-derived with numpy alone."""
    seq = np.random.SeedSequence(seed, spawn_key=keys)
    return np.random.Generator(np.random.PCG64(seq)).permutation(n)


def test_keyed_orders_are_independent_streams() -> None:
    plain = np.random.Generator(np.random.PCG64(7)).permutation(50)
    assert np.array_equal(keyed_rng(7).permutation(50), plain)
    keys = [(), (0,), (0, 0), (1,), (1, 0), (0, 1), (0, 0, 0)]
    draws = {k: tuple(keyed_rng(7, *k).integers(0, 2**62, 4).tolist()) for k in keys}
    assert len(set(draws.values())) == len(keys), "two key tuples share a stream"
    assert not np.array_equal(epoch_order(50, 7, 0), seeded_order(50, 7))
    assert sorted(epoch_order(9, 7, 3).tolist()) == list(range(9))
    assert epoch_order(4, None, 3).tolist() == [0, 1, 2, 3]
    assert epoch_order(0, 7, 0).dtype == np.int64
    with pytest.raises(ValueError, match="n must be >= 0"):
        seeded_order(-1, 0)
    order = np.array([4, 0, 3, 1, 2])
    assert window_positions(order, 1, 2).tolist() == [1, 3]
    assert window_positions(order, 2, 2).tolist() == [2]
    block = np.arange(12).reshape(6, 2)
    np.testing.assert_array_equal(
        shuffle_window_tokens(block, 7, 1, 2), block[derived_order(6, 7, 1, 2)]
    )
    np.testing.assert_array_equal(shuffle_window_tokens(block, None, 1, 2), block)


def test_loaders_follow_the_keyed_orders(coded_store: ActivationStore) -> None:
    start, stop, n, window = 2, 21, 19, 4
    expected = []
    for epoch in range(2):
        order = derived_order(n, 3, epoch)
        for w in range(-(-n // window)):
            ids = np.sort(order[w * window : (w + 1) * window]) + start
            pairs = [[int(i), t] for i in ids for t in range(LAYOUT.n_tokens)]
            expected += [pairs[k] for k in derived_order(len(pairs), 3, epoch, w)]
    batches = token_batches(
        coded_store, 5, seed=3, window_images=window, epochs=2, start=start, stop=stop
    )
    assert all_tokens(batches)[:, :2].astype(int).tolist() == expected
    images = image_batches_from_store(
        coded_store, 4, shuffle_seed=3, epochs=2, start=start, stop=stop
    )
    ids = torch.cat(list(images))[:, 0, 0].int().tolist()
    assert ids == [int(i) + start for e in range(2) for i in derived_order(n, 3, e)]


def test_token_modes_and_image_range(coded_store: ActivationStore) -> None:
    cls = all_tokens(token_batches(coded_store, 1, seed=0, tokens="cls", epochs=1, layer=3))
    assert sorted(cls[:, 0].tolist()) == list(range(23))
    assert np.all(cls[:, 1] == 0) and np.all(cls[:, 2] == 3)
    patches = all_tokens(token_batches(coded_store, 4, seed=0, tokens="patches", epochs=1))
    assert len(patches) == 23 * 4
    assert sorted(set(patches[:, 1].astype(int).tolist())) == [1, 2, 3, 4]
    held = all_tokens(token_batches(coded_store, 5, seed=0, epochs=1, start=5, stop=12))
    assert sorted(set(held[:, 0].astype(int).tolist())) == list(range(5, 12))
    dropped = list(token_batches(coded_store, 50, seed=0, epochs=1))
    assert len(dropped) == (23 * 5) // 50
    with pytest.raises(BackboneError, match="tokens must be"):
        next(token_batches(coded_store, 5, seed=0, tokens="registers"))
    with pytest.raises(StoreError, match="image range"):
        next(token_batches(coded_store, 5, seed=0, start=20, stop=30))


def test_image_batches_from_store(coded_store: ActivationStore) -> None:
    plain = list(image_batches_from_store(coded_store, 4))
    assert [len(b) for b in plain] == [4] * 5 + [3]
    stacked = torch.cat(plain).numpy()
    np.testing.assert_array_equal(stacked, coded_store.images(0, 23).astype(np.float32))

    def ids(batches):
        return [b[:, 0, 0].int().tolist() for b in batches]

    full = ids(image_batches_from_store(coded_store, 3, shuffle_seed=5, epochs=2, start=2))
    flat = sum(full, [])
    assert len(flat) == 2 * 21
    assert sorted(flat[:21]) == list(range(2, 23)) == sorted(flat[21:])
    assert flat[:21] != list(range(2, 23)) and flat[:21] != flat[21:]
    for start_batch in (1, 6, 7, 13):
        tail = image_batches_from_store(
            coded_store, 3, shuffle_seed=5, epochs=2, start=2, start_batch=start_batch
        )
        assert ids(tail) == full[start_batch:]
    stream = image_batches_from_store(coded_store, 5, shuffle_seed=1, epochs=None, stop=4)
    first = [next(stream)[:, 0, 0].int().tolist() for _ in range(4)]
    seen = sum(first, [])
    assert sorted(seen) == sorted(list(range(4)) * 5)
    held = torch.cat(list(image_batches_from_store(coded_store, 8, start=20, layer=1)))
    np.testing.assert_array_equal(held[:, 0, 0].numpy(), [20, 21, 22])


def test_lock_is_per_process_not_inherited_by_forks(tmp_path: Path) -> None:
    root = tmp_path / "s"
    writer = StoreWriter(root, make_plan())
    release_r, release_w = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.close(release_w)
            os.read(release_r, 1)
        finally:
            os._exit(0)
    os.close(release_r)
    try:
        writer.close()
        StoreWriter(root, make_plan()).close()
    finally:
        os.close(release_w)
        os.waitpid(child, 0)
    assert (root / ".lock").is_file()
    only_lock = tmp_path / "only_lock"
    only_lock.mkdir()
    (only_lock / ".lock").touch()
    with StoreWriter(only_lock, make_plan()) as writer:
        assert not writer.complete


def test_writer_refuses_corrupt_metadata_and_file_out(tmp_path: Path) -> None:
    root = tmp_path / "s"
    StoreWriter(root, make_plan()).close()
    good = (root / "metadata.json").read_text()
    (root / "metadata.json").write_text(good[:-10])
    with pytest.raises(StoreError, match="metadata.json is corrupt"):
        StoreWriter(root, make_plan())
    with pytest.raises(StoreError, match="metadata.json is corrupt"):
        ActivationStore.open(root)
    (root / "metadata.json").write_text(good)
    StoreWriter(root, make_plan()).close()
    with pytest.raises(StoreError, match="differs in"):
        StoreWriter(root, make_plan(dtype="fp16"))
    StoreWriter(root, make_plan()).close()
    as_file = tmp_path / "metadata.json"
    as_file.write_text("{}")
    with pytest.raises(StoreError, match="is a file, not a folder"):
        StoreWriter(as_file, make_plan())


def test_names_only_difference_asks_for_original_options(tmp_path: Path) -> None:
    root = tmp_path / "s"
    StoreWriter(root, make_plan(data={"source": "/a/imgs", "fingerprint": "f"})).close()
    with pytest.raises(StoreError, match="rerun with the original options") as err:
        StoreWriter(root, make_plan(data={"source": "/b/imgs", "fingerprint": "f"}))
    assert "'/a/imgs'" in str(err.value) and "delete" not in str(err.value)
    with pytest.raises(StoreError, match="differs in: data.fingerprint, data.source.*delete"):
        StoreWriter(root, make_plan(data={"source": "/b/imgs", "fingerprint": "g"}))


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_open_and_writer_check_shard_files(coded_store: ActivationStore, damage: str) -> None:
    root = coded_store.root
    path = root / "layer_3" / "00002.npy"
    if damage == "delete":
        path.unlink()
        message = "layer_3/00002.npy is missing"
    else:
        path.write_bytes(path.read_bytes()[:-4])
        message = "layer_3/00002.npy has .* bytes"
    with pytest.raises(StoreError, match=f"damaged: shard file {message}.*rerun the same extract"):
        ActivationStore.open(root)
    with StoreWriter(root, make_plan()) as writer:
        assert not writer.complete
        assert writer.shard_entry(2) is None and writer.shard_entry(1) is not None
    assert json.loads((root / "metadata.json").read_text())["complete"] is False


def test_token_batches_refuse_a_stream_shorter_than_one_batch(
    coded_store: ActivationStore,
) -> None:
    with pytest.raises(StoreError, match="115 all tokens per epoch.*cannot fill one batch of 200"):
        next(token_batches(coded_store, 200, seed=0, epochs=1))
    with pytest.raises(StoreError, match="2 cls tokens per epoch"):
        next(token_batches(coded_store, 3, seed=0, tokens="cls", epochs=1, stop=2))
    assert [len(b) for b in token_batches(coded_store, 200, seed=0, epochs=2)] == [200]
    assert len(next(token_batches(coded_store, 3, seed=0, tokens="cls", stop=2))) == 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size must be >= 1.*batch_size=0"),
        ({"start_batch": -1}, "start_batch >= 0.*start_batch=-1"),
        ({"epochs": 0}, "epochs must be >= 1 or None, got 0"),
    ],
)
def test_both_loaders_refuse_bad_stream_arguments(
    coded_store: ActivationStore, kwargs: dict, message: str
) -> None:
    args = {"batch_size": 4, "start_batch": 0, "epochs": 1, **kwargs}
    with pytest.raises(StoreError, match=message):
        next(token_batches(coded_store, seed=0, **args))
    with pytest.raises(StoreError, match=message):
        next(image_batches_from_store(coded_store, **args))
    with pytest.raises(StoreError, match="window_images must be >= 1, got 0"):
        next(token_batches(coded_store, 4, seed=0, window_images=0))


def test_store_metadata_refuses_unknown_and_missing_keys(tmp_path: Path) -> None:
    plan = make_plan().to_dict()
    assert list(plan)[:3] == ["format_version", "backbone", "layers"]
    assert StoreMetadata.from_dict(plan) == make_plan()
    with pytest.raises(StoreError, match=r"unknown keys \['colour'\]"):
        StoreMetadata.from_dict({**plan, "colour": 1})
    del plan["d_model"]
    with pytest.raises(StoreError, match=r"missing keys \['d_model'\]"):
        StoreMetadata.from_dict(plan)
    root = tmp_path / "s"
    StoreWriter(root, make_plan()).close()  # an in-progress store: plan, then complete: false
    written = (root / "metadata.json").read_bytes()
    StoreMetadata.load(root / "metadata.json").dump(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_bytes() == written
    assert json.loads(written)["complete"] is False
