"""Streaming training: batch order against extracted activations, determinism, resume, errors."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from patchsae.config import ConfigError, from_dict
from patchsae.data.images import DataConfig
from patchsae.data.shuffle import epoch_order, shuffle_window_tokens, window_positions
from patchsae.data.store import ActivationStore
from patchsae.extract import ExtractConfig, extract
from patchsae.train import TrainConfig, train
from patchsae.train import sources as sources_module
from patchsae.train.sources import SourceError, StoreSource, StreamSource
from run_files import kill_after_first_checkpoint, train_until, untimed_metrics, weights
from tiny_models import save_tiny_vit

N_IMAGES, EVAL, T, D = 14, 2, 5, 16
N_TRAIN = N_IMAGES - EVAL


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-block ViT (width 16, 16 px, patch 8: CLS + 4 patches) saved with save_pretrained."""
    folder = tmp_path_factory.mktemp("tinyvit")
    return save_tiny_vit(folder, width=D, n_layers=2, heads=2, image_size=16, patch_size=8)


def make_folder(root: Path, broken: tuple[str, ...] = ()) -> Path:
    """ImageFolder of N_IMAGES random RGB PNGs (classes a/ and b/), ``broken`` files unreadable."""
    rng = np.random.default_rng(0)
    for k in range(N_IMAGES):
        path = root / "ab"[k % 2] / f"{k:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16 + k % 5, 20, 3), dtype=np.uint8)).save(path)
    for name in broken:
        (root / name).write_bytes(b"not a png")
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folder(tmp_path_factory.mktemp("imgs"))


@pytest.fixture(scope="module")
def store_dir(model: Path, images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An fp32 store of the last block's activations by ``patchsae extract``, source order."""
    out = tmp_path_factory.mktemp("store") / "s"
    cfg = ExtractConfig(
        model=str(model),
        data=DataConfig(source=str(images)),
        layers=(-1,),
        out=str(out),
        batch_size=2,
        shard_images=4,
        num_workers=0,
        dtype="fp32",
    )
    store = ActivationStore.open(extract(cfg))
    np.testing.assert_array_equal(store.example_ids, np.arange(N_IMAGES))
    return store.root


@pytest.fixture(scope="module")
def reference(store_dir: Path) -> np.ndarray:
    """(N_IMAGES, T, D) activations after the last block, source order."""
    store = ActivationStore.open(store_dir)
    return np.stack([store.get(i, 1) for i in range(N_IMAGES)])


def config(model: Path, images: Path, out: Path, **overrides) -> TrainConfig:
    data = {
        "model": str(model),
        "data": {"source": str(images)},
        "layer": -1,
        "out": str(out),
        "sae": {"d_in": D, "d_sae": 32},
        "batch_images": 3,
        "shuffle_buffer_images": 5,
        "extract_batch_size": 2,
        "eval_images": EVAL,
        "eval_every": 100,
        "total_images": 36,
        "warmup_steps": 3,
        "dead_feature_window": 2,
        "checkpoint_every": 3,
        "log_every": 1,
        "b_dec_init_maxiter": 10,
        "seed": 0,
        "lr": 1e-2,
    }
    data.update(overrides)
    return from_dict(TrainConfig, data)


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def identify(acts_btd: torch.Tensor, reference: np.ndarray) -> list[int]:
    """Source index of each streamed image, matched to the extracted activations."""
    ids = []
    for x in acts_btd.numpy():
        dist = np.abs(reference - x).max(axis=(1, 2))
        best = int(dist.argmin())
        assert dist[best] <= 1e-5, f"streamed image matches no extracted one ({dist[best]})"
        assert np.partition(dist, 1)[1] > 1e-2, "two extracted images are indistinguishable"
        ids.append(best)
    return ids


def test_images_stream_follows_the_seeded_epoch_order(
    model: Path, images: Path, reference: np.ndarray, tmp_path: Path
) -> None:
    source = StreamSource(config(model, images, tmp_path / "run"), torch.device("cpu"))
    assert (source.n_train, source.tokens_per_image, source.d_model) == (N_TRAIN, T, D)
    stream = source.batches(source.start_position())
    seen, positions = [], []
    for _ in range(3 * N_TRAIN // 3):
        x, position = next(stream)
        assert x.shape == (3, T, D) and x.dtype == torch.float32
        seen += identify(x, reference)
        positions.append(position)
    epochs = [seen[e * N_TRAIN : (e + 1) * N_TRAIN] for e in range(3)]
    for e, order in enumerate(epochs):
        assert sorted(order) == list(range(N_TRAIN)), "an epoch must visit each training image once"
        np.testing.assert_array_equal(order, epoch_order(N_TRAIN, 0, e))
    assert epochs[0] != epochs[1] != epochs[2]
    # 5-image windows: after 3 batches 9 images are done = window 1, offset 4.
    assert positions[2] == {"epoch": 0, "window": 1, "offset": 4}
    resumed, _ = next(source.batches(positions[6]))
    assert identify(resumed, reference) == seen[21:24]

    held_out = torch.cat(list(source.eval_batches()))
    np.testing.assert_allclose(held_out.numpy(), reference[N_TRAIN:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("tokens", ["all", "patches"])
def test_tokens_stream_shuffles_within_each_window(
    model: Path, images: Path, reference: np.ndarray, tmp_path: Path, tokens: str
) -> None:
    cfg = config(
        model,
        images,
        tmp_path / "run",
        batch_mode="tokens",
        batch_tokens=7,
        tokens=tokens,
        b_dec_init="geometric_median_tokens",
    )
    source = StreamSource(cfg, torch.device("cpu"))
    keep = slice(0, T) if tokens == "all" else slice(1, T)
    per_image = keep.stop - keep.start
    expected = []
    for epoch in range(2):
        order = epoch_order(N_TRAIN, 0, epoch)
        for w in range(-(-N_TRAIN // 5)):
            window = reference[window_positions(order, w, 5), keep].reshape(-1, D)
            expected.append(shuffle_window_tokens(window, 0, epoch, w))
    expected_nd = np.concatenate(expected)
    stream = source.batches(source.start_position())
    n_batches = len(expected_nd) // 7
    got = torch.cat([next(stream)[0] for _ in range(n_batches)]).numpy()
    assert got.shape == (n_batches * 7, D)
    np.testing.assert_allclose(got, expected_nd[: n_batches * 7], atol=1e-5, rtol=0)
    assert n_batches * 7 > 2 * N_TRAIN * per_image - 7, "the stream must cross into epoch 1"


@pytest.mark.parametrize("mode", ["images", "tokens"])
def test_stream_equals_the_store_loaders_on_an_unshuffled_store(
    model: Path, images: Path, store_dir: Path, tmp_path: Path, mode: str
) -> None:
    extra = {"window_images": 5}
    if mode == "tokens":
        extra |= {"batch_mode": "tokens", "batch_tokens": 7, "tokens": "patches"}
        extra |= {"b_dec_init": "geometric_median_tokens"}
    streamed = StreamSource(config(model, images, tmp_path / "a", **extra), torch.device("cpu"))
    stored = StoreSource(config(model, images, tmp_path / "b", store=str(store_dir), **extra))
    n_batches = {"images": 3 * N_TRAIN // 3, "tokens": 3 * N_TRAIN * (T - 1) // 7}[mode]
    a = [x for x, _ in itertools.islice(streamed.batches(streamed.start_position()), n_batches)]
    b = [x for x, _ in itertools.islice(stored.batches(stored.start_position()), n_batches)]
    assert len(a) == len(b) == n_batches
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x.numpy(), y.numpy(), atol=1e-5, rtol=0)


def test_stream_builds_each_epoch_order_once(
    model: Path, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def counted(n: int, seed: int | None, epoch: int) -> np.ndarray:
        calls.append(epoch)
        return epoch_order(n, seed, epoch)

    monkeypatch.setattr(sources_module, "epoch_order", counted)
    cfg = config(model, images, tmp_path / "run", shuffle_buffer_images=2)
    source = StreamSource(cfg, torch.device("cpu"))
    n_batches = 2 * N_TRAIN // 3 + 1
    list(itertools.islice(source.batches(source.start_position()), n_batches))
    assert calls == [0, 1, 2], "the epoch order must be built once per epoch, not per window"


def test_streaming_training_is_deterministic_by_seed(
    model: Path, images: Path, tmp_path: Path
) -> None:
    a = train(config(model, images, tmp_path / "a", total_images=18))
    b = train(config(model, images, tmp_path / "b", total_images=18))
    c = train(config(model, images, tmp_path / "c", total_images=18, seed=1))
    assert max_diff(weights(a), weights(b)) == 0.0
    assert untimed_metrics(a) == untimed_metrics(b)
    assert not torch.equal(weights(a)["W_enc"], weights(c)["W_enc"])
    assert [r["step"] for r in untimed_metrics(a) if "eval/fvu" in r] == [0, 6]
    train_rows = [r for r in untimed_metrics(a) if "lr" in r]
    assert [r["images"] for r in train_rows] == [3 * s for s in range(1, 7)]
    assert all(r["tokens"] == T * r["images"] for r in train_rows)


@pytest.mark.parametrize("mode", ["images", "tokens"])
def test_resume_from_a_mid_window_checkpoint_equals_a_straight_run(
    model: Path, images: Path, tmp_path: Path, mode: str
) -> None:
    extra = {}
    if mode == "tokens":
        extra = {"batch_mode": "tokens", "batch_tokens": 7, "b_dec_init": "geometric_median_tokens"}
        extra |= {"total_images": None, "total_tokens": 84}
    cfg = config(model, images, tmp_path / "cut", **extra)
    train_until(cfg, step=8)
    state = json.loads((tmp_path / "cut" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 6
    position = state["data_position"]
    assert position["offset"] > 0, f"the checkpoint is not mid-window: {position}"
    assert max(r["step"] for r in untimed_metrics(tmp_path / "cut")) == 8

    resumed = train(cfg, resume=True)
    straight = train(config(model, images, tmp_path / "straight", **extra))
    assert max_diff(weights(resumed), weights(straight)) <= 1e-6
    assert untimed_metrics(resumed) == untimed_metrics(straight)
    assert untimed_metrics(straight)[-1]["step"] == 12


def test_resume_after_sigkill_equals_an_uninterrupted_run(
    model: Path, images: Path, tmp_path: Path
) -> None:
    settings = {"total_images": 3 * 400, "checkpoint_every": 7, "log_every": 50}
    cfg = config(model, images, tmp_path / "killed", **settings)
    state = kill_after_first_checkpoint(cfg, tmp_path)
    assert 0 < state["step"] < 400, "the run was not interrupted mid-way"
    resumed = train(cfg, resume=True)
    straight = train(config(model, images, tmp_path / "straight", **settings))
    assert max_diff(weights(resumed), weights(straight)) <= 1e-6
    assert untimed_metrics(resumed) == untimed_metrics(straight)


def test_broken_images_are_skipped_and_reported_once(model: Path, tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "imgs", broken=("a/002.png",))
    out = train(config(model, folder, tmp_path / "run", total_images=33))
    report = json.loads((out / "bad_images.json").read_text())
    assert [r["example_id"] for r in report] == [1]
    assert report[0]["where"].endswith("002.png")
    rows = [r for r in untimed_metrics(out) if "lr" in r]
    assert rows[-1]["images"] == 33 and len(rows) == 11


def test_bad_images_survive_a_resume(model: Path, tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "imgs", broken=("a/002.png",))
    cfg = config(model, folder, tmp_path / "run")
    before = StreamSource(cfg, torch.device("cpu"))
    one_epoch = N_TRAIN // cfg.batch_images
    list(itertools.islice(before.batches(before.start_position()), one_epoch))
    assert [r.example_id for r in before.bad] == [1], "the broken image was not met"
    recorded = json.loads(json.dumps(before.describe()))
    after = StreamSource(cfg, torch.device("cpu"))
    after.restore(recorded)
    assert after.bad == before.bad
    list(itertools.islice(after.batches(after.start_position()), one_epoch))
    assert after.bad == before.bad, "a recomputed window listed the broken image twice"


def test_bad_streaming_configs_are_refused(model: Path, images: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="store=DIR .* model=NAME"):
        from_dict(TrainConfig, {"data": {"source": str(images)}, "layer": -1})
    with pytest.raises(ConfigError, match="data.source"):
        from_dict(TrainConfig, {"model": str(model), "layer": -1})
    with pytest.raises(SourceError, match="layer="):
        train(config(model, images, tmp_path / "a", layer=None))
    with pytest.raises(SourceError, match="eval_images"):
        train(config(model, images, tmp_path / "b", eval_images=N_IMAGES))
    with pytest.raises(SourceError, match="batch_images"):
        train(config(model, images, tmp_path / "c", batch_images=N_TRAIN + 1))
    with pytest.raises(ConfigError, match="sae.d_in=16"):
        train(config(model, images, tmp_path / "d", sae={"d_in": 8, "d_sae": 32}))
    with pytest.raises(ValueError, match="range"):
        train(config(model, images, tmp_path / "e", layer=5))
    assert not (tmp_path / "a").exists()


def test_store_source_accepts_its_model_under_another_path(
    model: Path, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = ExtractConfig(
        model=str(model),
        data=DataConfig(source=str(images)),
        layers=(-1,),
        out=str(tmp_path / "store"),
        batch_size=2,
        shard_images=4,
        num_workers=0,
        limit=4,
    )
    store = extract(cfg)
    monkeypatch.chdir(model.parent)
    relative = {"store": str(store), "model": f"./{model.name}/", "layer": -1}
    settings = {"out": str(tmp_path / "run"), "sae": {"d_in": D, "d_sae": 8}, "batch_images": 2}
    assert StoreSource(from_dict(TrainConfig, {**relative, **settings})).n_images == 4
    other = {**relative, "model": str(images)}
    with pytest.raises(SourceError, match="was extracted from"):
        StoreSource(from_dict(TrainConfig, {**other, **settings}))
