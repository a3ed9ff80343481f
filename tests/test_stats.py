"""Latent statistics and the atlas: every statistic against a brute-force computation."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from patchsae.backbones import TokenLayout
from patchsae.cli import main
from patchsae.sae import SAEConfig, make_sae, save
from patchsae.stats import (
    Atlas,
    LatentAccumulator,
    StatsConfig,
    StatsError,
    compute_stats,
    label_entropy,
    token_set,
)
from run_files import dies_after
from tiny_stores import make_store

N, T, D, M, K = 37, 7, 6, 24, 4  # images, tokens (CLS + 2x3 patches), d_in, d_sae, top_k
GRID = (2, 3)
CLASSES = ["zero", "one", "two"]


def make_inputs(root: Path, seed: int = 0, labels: bool = True) -> tuple[Path, Path, np.ndarray]:
    """A store of random activations (some images all-negative so latents often stay silent)
    and a float64 ReLU SAE with a negative bias, so some latents never fire."""
    rng = np.random.default_rng(seed)
    acts = rng.normal(size=(N, T, D)).astype(np.float32)
    label_ids = rng.integers(-1, len(CLASSES), N) if labels else None
    store = make_store(
        root / "store",
        acts,
        labels=label_ids,
        class_names=CLASSES if labels else None,
        grid=GRID,
    )
    torch.manual_seed(seed)
    sae = make_sae(SAEConfig(d_in=D, d_sae=M, dtype="float64"))
    with torch.no_grad():
        sae.b_enc.copy_(torch.linspace(-3.0, 0.3, M, dtype=torch.float64))
        sae.b_enc[:3] = -50.0  # never fire
    return store, save(sae, root / "sae"), acts


def run_stats(store: Path, sae_dir: Path, out: Path, **options) -> Path:
    """compute_stats from a store without thumbnails (top_k=K unless given)."""
    options = {"top_k": K, **options}
    cfg = StatsConfig(sae=str(sae_dir), store=str(store), out=str(out), thumbnails=False, **options)
    return compute_stats(cfg)


def brute_force(acts: np.ndarray, labels: np.ndarray, sae_dir: Path, include_cls: bool = True):
    """Every statistic from all codes at once, with the definitions of docs/atlas.md."""
    from patchsae.sae import load

    sae = load(sae_dir)
    with torch.no_grad():
        codes = sae.encode(torch.from_numpy(acts).double()).numpy()  # (N, T, M)
    tokens = ([0] if include_cls else []) + list(range(1, T))
    img = codes[:, tokens].mean(1)  # (N, M)
    fires = img > 0
    out = {
        "image_freq": fires.mean(0),
        "cls_token_freq": (codes[:, 0] > 0).mean(0),
        "patch_token_freq": (codes[:, 1:] > 0).mean((0, 1)),
        "mean_act": img.mean(0),
        "mean_act_fired": np.array(
            [img[fires[:, j], j].mean() if fires[:, j].any() else 0.0 for j in range(M)]
        ),
        "dataset_counts": (codes[:, tokens] > 0.2).sum((0, 1)),
        "class_counts": np.stack(
            [(codes[labels == c][:, tokens] > 0.2).sum((0, 1)) for c in range(len(CLASSES))]
        ),
    }
    top_index = np.full((M, K), -1)
    top_values = np.zeros((M, K))
    for j in range(M):
        firing = np.flatnonzero(fires[:, j])
        order = firing[np.lexsort((firing, -img[firing, j]))][:K]
        top_index[j, : len(order)] = order
        top_values[j, : len(order)] = img[order, j]
    out["top_index"], out["top_values"] = top_index, top_values
    out["top_labels"] = np.where(top_index >= 0, labels[top_index], -1)
    out["grids"] = codes[:, 1:].reshape(N, *GRID, M)
    return out


def test_every_statistic_matches_brute_force(tmp_path: Path) -> None:
    store, sae_dir, acts = make_inputs(tmp_path)
    labels = np.load(store / "labels.npy")
    run_stats(store, sae_dir, tmp_path / "atlas", batch_images=5)
    ds = Atlas.open(tmp_path / "atlas").dataset()
    want = brute_force(acts, labels, sae_dir)
    for key in ("image_freq", "cls_token_freq", "patch_token_freq", "mean_act", "mean_act_fired"):
        np.testing.assert_allclose(ds.array(key), want[key], rtol=1e-12, atol=1e-15, err_msg=key)
    np.testing.assert_array_equal(ds.array("dataset_counts"), want["dataset_counts"])
    np.testing.assert_array_equal(ds.array("class_counts"), want["class_counts"])
    np.testing.assert_array_equal(ds.array("top_index"), want["top_index"])
    np.testing.assert_array_equal(ds.array("top_example_ids"), want["top_index"])
    np.testing.assert_array_equal(ds.array("top_labels"), want["top_labels"])
    np.testing.assert_allclose(ds.array("top_values"), want["top_values"], rtol=1e-6)
    never = np.flatnonzero(want["image_freq"] == 0)
    assert len(never) >= 3 and (ds.array("mean_act_fired")[never] == 0).all()
    assert (ds.array("top_index")[never] == -1).all()
    assert not np.isnan(ds.array("mean_act_fired")).any()
    entropy = label_entropy(want["top_values"], want["top_labels"])
    np.testing.assert_allclose(ds.array("label_entropy"), entropy, rtol=1e-6)
    for j, s in zip(*np.nonzero(want["top_index"] >= 0), strict=True):
        grid = want["grids"][want["top_index"][j, s], :, :, j]
        np.testing.assert_allclose(ds.mask(j, s), grid, rtol=1e-3, atol=1e-4)
    assert not ds.array("top_grids")[want["top_index"] < 0].any()
    class_mean = [want_mean for want_mean in _class_means(acts, labels, sae_dir)]
    np.testing.assert_allclose(ds.array("class_mean_act"), np.stack(class_mean), rtol=1e-5)
    ranked = ds.class_rankings()
    counts = want["class_counts"][1]
    assert ranked[1].tolist() == np.lexsort((np.arange(M), -counts)).tolist()
    everywhere = want["dataset_counts"]
    assert ds.dataset_ranking().tolist() == np.lexsort((np.arange(M), -everywhere)).tolist()


def _class_means(acts: np.ndarray, labels: np.ndarray, sae_dir: Path) -> list[np.ndarray]:
    from patchsae.sae import load

    with torch.no_grad():
        img = load(sae_dir).encode(torch.from_numpy(acts).double()).numpy().mean(1)
    return [img[labels == c].mean(0) for c in range(len(CLASSES))]


def test_excluding_cls_and_max_aggregate(tmp_path: Path) -> None:
    store, sae_dir, acts = make_inputs(tmp_path, seed=1)
    labels = np.load(store / "labels.npy")
    run_stats(store, sae_dir, tmp_path / "atlas", include_cls=False, name="nocls")
    ds = Atlas.open(tmp_path / "atlas").dataset("nocls")
    want = brute_force(acts, labels, sae_dir, include_cls=False)
    np.testing.assert_allclose(ds.array("image_freq"), want["image_freq"])
    np.testing.assert_array_equal(ds.array("top_index"), want["top_index"])
    np.testing.assert_array_equal(ds.array("class_counts"), want["class_counts"])
    run_stats(store, sae_dir, tmp_path / "atlas", aggregate="max", name="max")
    from patchsae.sae import load

    with torch.no_grad():
        img = load(sae_dir).encode(torch.from_numpy(acts).double()).numpy().max(1)
    ds = Atlas.open(tmp_path / "atlas").dataset("max")
    np.testing.assert_allclose(ds.array("image_freq"), (img > 0).mean(0))


def test_label_entropy_formula() -> None:
    values = np.array([[3.0, 1.0, 0.0], [2.0, 2.0, 2.0], [1.0, 1.0, 0.0], [5.0, 0.0, 0.0]])
    labels = np.array([[0, 1, -1], [4, 4, 4], [-1, -1, -1], [2, -1, -1]])
    got = label_entropy(values, labels)
    p = np.array([0.75, 0.25])
    assert got[0] == pytest.approx(-(p * np.log(p)).sum())
    assert got[1] == 0.0 and got[3] == 0.0
    assert got[2] == -1.0


@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(st.lists(st.integers(0, 3), min_size=3, max_size=3), min_size=1, max_size=25),
    k=st.integers(1, 6),
    batch=st.integers(1, 7),
)
def test_streaming_top_k_merge_equals_a_full_sort(data: list[list[int]], k: int, batch: int):
    """Integer values make ties common; zeros make empty slots and silent latents."""
    values = np.asarray(data, dtype=np.float64)  # (n, m) image-level activations
    n, m = values.shape
    layout = TokenLayout(n_tokens=2, cls_index=0, patch_start=1, grid=(1, 1))
    acc = LatentAccumulator(m, layout, n_classes=2, top_k=k)
    labels = np.arange(n) % 3 - 1
    for lo in range(0, n, batch):
        chunk = torch.from_numpy(values[lo : lo + batch])
        codes = chunk[:, None, :].expand(-1, 2, -1)  # both tokens equal: mean == value
        index = torch.arange(lo, lo + len(chunk))
        acc.update(codes, index, index + 100, torch.from_numpy(labels[lo : lo + batch]))
    got = acc.result()
    for j in range(m):
        firing = np.flatnonzero(values[:, j] > 0)
        order = firing[np.lexsort((firing, -values[firing, j]))][:k]
        want = np.full(k, -1)
        want[: len(order)] = order
        assert got["top_index"][j].tolist() == want.tolist()
        assert got["top_example_ids"][j].tolist() == np.where(want >= 0, want + 100, -1).tolist()
        assert got["top_labels"][j].tolist() == np.where(want >= 0, labels[want], -1).tolist()
        assert got["top_values"][j].tolist() == [values[i, j] if i >= 0 else 0.0 for i in want]
        assert got["mean_act_fired"][j] == (values[firing, j].mean() if len(firing) else 0.0)


@pytest.mark.parametrize(
    ("dtype", "block_elements", "include_cls", "aggregate", "grid"),
    [
        (torch.float32, 2**17, True, "mean", (3, 4)),  # several whole images per block
        (torch.float32, 1, False, "mean", (3, 4)),  # one token per block
        (torch.float64, 7, True, "max", (3, 4)),  # runs of a few tokens
        (torch.bfloat16, 40, True, "mean", (16, 17)),  # counts above 256 stay exact
    ],
)
def test_counts_match_a_per_token_loop(
    monkeypatch, dtype, block_elements, include_cls, aggregate, grid
) -> None:
    """Codes with exact zeros, negatives, values equal to the threshold and just above it,
    registers between CLS and the patches, blocks cut anywhere in an image."""
    from patchsae.stats import accumulate

    monkeypatch.setattr(accumulate, "BLOCK_ELEMENTS", block_elements)
    layout = TokenLayout(
        n_tokens=3 + grid[0] * grid[1], cls_index=0, patch_start=3, grid=grid, extra_indices=(1, 2)
    )
    n, t, m, thr = 12, layout.n_tokens, 5, 0.2
    thr_cast = torch.tensor(thr, dtype=dtype).item()  # codes are compared in their own dtype
    above_thr = torch.nextafter(torch.tensor(thr_cast, dtype=dtype), torch.tensor(1.0, dtype=dtype))
    rng = np.random.default_rng(0)
    choices = [0.0, 0.0, 0.0, -0.3, thr_cast, above_thr.item(), 1e-30, 0.7, 3.0]
    values = rng.choice(np.asarray(choices), size=(n, t, m))
    values[:, :, 0] = 1.0  # fires on every token: more than 256 per image in the large grid
    values[:, :, 1] = thr_cast  # ties with the threshold: never above it
    codes = torch.from_numpy(values).to(dtype)
    labels = rng.integers(-1, 3, n)
    acc = LatentAccumulator(
        m, layout, n_classes=3, threshold=thr, aggregate=aggregate, include_cls=include_cls
    )
    for lo, hi in ((0, 7), (7, n)):
        index = torch.arange(lo, hi)
        acc.update(codes[lo:hi], index, index, torch.from_numpy(labels[lo:hi]))
    x = codes.double().numpy()
    tokens = set(token_set(layout, include_cls))
    cls_fire, patch_fire, dataset = np.zeros(m, int), np.zeros(m, int), np.zeros(m, int)
    class_counts = np.zeros((3, m), int)
    for i in range(n):
        for tok in range(t):
            for j in range(m):
                cls_fire[j] += tok == layout.cls_index and x[i, tok, j] > 0
                patch_fire[j] += tok in layout.patch_indices and x[i, tok, j] > 0
                if tok in tokens and x[i, tok, j] > thr_cast:
                    dataset[j] += 1
                    class_counts[labels[i], j] += labels[i] >= 0
    s = {key: value.numpy() for key, value in acc.state.items()}
    np.testing.assert_array_equal(s["cls_fire_count"], cls_fire)
    np.testing.assert_array_equal(s["patch_fire_count"], patch_fire)
    np.testing.assert_array_equal(s["dataset_counts"], dataset)
    np.testing.assert_array_equal(s["class_counts"], class_counts)
    assert s["dataset_counts"][1] == 0 and s["patch_fire_count"][0] == n * layout.n_patches
    img = x[:, sorted(tokens)]
    img = img.max(1) if aggregate == "max" else img.mean(1)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-6
    np.testing.assert_allclose(s["act_sum"], img.sum(0), rtol=tol, atol=1e-9)


@pytest.mark.parametrize("d_sae", [1, 3, 6144, 2**20])
def test_count_blocks_cover_each_token_once_within_the_batch(d_sae: int) -> None:
    """Blocks tile the batch's token set exactly, never reach past the last image (a narrow
    SAE once sized its blocks, and a quadratic ones tensor, by images the batch did not have)."""
    layout = TokenLayout(n_tokens=5 + 9, cls_index=0, patch_start=5, grid=(3, 3))
    acc = LatentAccumulator(d_sae, layout, n_classes=1)
    for n_images in (1, 2, 7):
        covered = np.zeros((n_images, layout.n_tokens), dtype=int)
        for images, tokens in acc._blocks(n_images, torch.device("cpu")):
            assert 0 <= images.start < images.stop <= n_images
            covered[images, tokens] += 1
        want = np.zeros(layout.n_tokens, dtype=int)
        want[token_set(layout, True)] = 1
        assert (covered == want).all()


def test_store_without_labels_skips_class_statistics(tmp_path: Path, capsys) -> None:
    store, sae_dir, acts = make_inputs(tmp_path, labels=False)
    run_stats(store, sae_dir, tmp_path / "atlas")
    assert "class statistics skipped" in capsys.readouterr().out
    ds = Atlas.open(tmp_path / "atlas").dataset()
    assert ds.meta["has_labels"] is False and ds.array("class_counts").shape == (0, M)
    assert (ds.array("label_entropy") == -1).all()
    with pytest.raises(StatsError, match="no labels"):
        ds.class_latents(0)
    want = brute_force(acts, np.full(N, -1), sae_dir)
    np.testing.assert_array_equal(ds.array("top_index"), want["top_index"])


def test_mismatches_are_refused_with_one_line(tmp_path: Path, capsys) -> None:
    store, sae_dir, _ = make_inputs(tmp_path)
    wide = save(make_sae(SAEConfig(d_in=D + 1, d_sae=M)), tmp_path / "wide")
    base = ["stats", "--store", str(store), "--out", str(tmp_path / "atlas"), "thumbnails=false"]
    assert main([*base, "--sae", str(wide)]) == 2
    err = capsys.readouterr().err
    assert "d_in=7" in err and "width 6" in err and len(err.strip().splitlines()) == 1
    assert main([*base, "--sae", str(sae_dir)]) == 0
    other = save(make_sae(SAEConfig(d_in=D, d_sae=M, dtype="float64")), tmp_path / "other")
    assert main([*base, "--sae", str(other), "--name", "again"]) == 2
    assert "another SAE" in capsys.readouterr().err
    assert main([*base, "--sae", str(sae_dir), "--top-k", "3"]) == 2
    assert "computed differently (differs in: options.top_k)" in capsys.readouterr().err
    assert main([*base, "--sae", str(sae_dir)]) == 0
    assert "already complete" in capsys.readouterr().out


def test_atlas_queries_from_a_fresh_process_without_the_data(tmp_path: Path) -> None:
    store, sae_dir, acts = make_inputs(tmp_path)
    labels = np.load(store / "labels.npy")
    run_stats(store, sae_dir, tmp_path / "atlas")
    want = brute_force(acts, labels, sae_dir)
    import shutil

    shutil.rmtree(store)
    shutil.rmtree(sae_dir)
    script = (
        "import json, sys; from patchsae.stats import Atlas; "
        "ds = Atlas.open(sys.argv[1]).dataset(); "
        "print(json.dumps({'latent': ds.latent(10), 'class': ds.class_latents(2, 5), "
        "'dense': ds.dense(0.3), 'low': ds.low_entropy(0.0)}))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "atlas")],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    got = json.loads(run.stdout)
    refs = [r["index"] for r in got["latent"]["references"]]
    assert refs == [i for i in want["top_index"][10] if i >= 0]
    counts = want["class_counts"][2]
    best = np.lexsort((np.arange(M), -counts))[:5]
    assert got["class"] == [[int(j), float(counts[j])] for j in best if counts[j] > 0]
    freq = want["image_freq"]
    assert got["dense"] == [int(j) for j in np.lexsort((np.arange(M), -freq)) if freq[j] >= 0.3]
    entropy = label_entropy(want["top_values"], want["top_labels"])
    n_refs = (want["top_index"] >= 0).sum(1)
    assert set(got["low"]) == set(np.flatnonzero((entropy == 0) & (n_refs >= 2)).tolist())


# Dies right after the state saved after three batches is written.
AFTER_THREE_BATCHES = dies_after(
    "patchsae.stats.compute._save_state",
    "args[2] == 3",
    main="from patchsae.config import load_config\n"
    "from patchsae.stats import StatsConfig, compute_stats\n"
    "compute_stats(load_config(StatsConfig, None, sys.argv[1:]))",
)


def test_kill_9_then_rerun_gives_the_same_atlas(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    acts = rng.normal(size=(400, T, D)).astype(np.float32)
    store = make_store(
        tmp_path / "store", acts, labels=rng.integers(0, 3, 400), class_names=CLASSES, grid=GRID
    )
    torch.manual_seed(0)
    sae_dir = save(make_sae(SAEConfig(d_in=D, d_sae=M)), tmp_path / "sae")
    common = [
        f"sae={sae_dir}",
        f"store={store}",
        "thumbnails=false",
        "batch_images=1",
        "export_tokens=true",
        f"top_k={K}",
    ]
    run_stats(store, sae_dir, tmp_path / "ref", batch_images=1, export_tokens=True)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TQDM_DISABLE": "1",
        "PYTHONPATH": os.pathsep.join(sys.path),
    }
    out = tmp_path / "killed"
    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            AFTER_THREE_BATCHES,
            *common,
            f"out={out}",
            "checkpoint_seconds=0",
        ],
        env=env,
        capture_output=True,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()
    assert (out / "datasets" / "store" / ".partial" / "state.safetensors").is_file()
    assert not (out / "datasets" / "store" / "image_freq.npy").exists()
    run_stats(store, sae_dir, out, batch_images=1, export_tokens=True)
    ref = Atlas.open(tmp_path / "ref").dataset()
    got = Atlas.open(out).dataset()
    assert ref.meta["files"] == got.meta["files"]
    for name, file in ref.meta["files"].items():
        assert (ref.root / file).read_bytes() == (got.root / file).read_bytes(), name
    assert not (out / "datasets" / "store" / ".partial").exists()


def test_token_export_is_the_codes_of_every_token(tmp_path: Path) -> None:
    import scipy.sparse

    from patchsae.sae import load

    store, sae_dir, acts = make_inputs(tmp_path)
    run_stats(store, sae_dir, tmp_path / "atlas", export_tokens=True, batch_images=4)
    ds = Atlas.open(tmp_path / "atlas").dataset()
    matrix = scipy.sparse.load_npz(ds.root / ds.meta["files"]["tokens"])
    with torch.no_grad():
        codes = load(sae_dir).encode(torch.from_numpy(acts).double()).numpy()
    np.testing.assert_allclose(matrix.toarray(), codes.reshape(N * T, M), rtol=1e-6, atol=1e-7)
    assert math.isclose(matrix.nnz, int((codes.astype(np.float32) != 0).sum()), abs_tol=5)


def clip_preprocessor(size: int = 32):
    from transformers import CLIPImageProcessor

    from patchsae.backbones import ImagePreprocessor

    processor = CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )
    return ImagePreprocessor(processor, (size, size))


def test_view_box_undoes_resize_and_centre_crop() -> None:
    from patchsae.stats.views import view_box

    # 64 x 40 -> shortest edge 32: 51 x 32, centre crop 32: columns [9, 41) of the resized image
    left, top, right, bottom = view_box(clip_preprocessor(), (64, 40))
    assert left == pytest.approx(9 * 64 / 51, abs=0.5) and right == pytest.approx(
        41 * 64 / 51, abs=0.5
    )
    assert top == pytest.approx(0, abs=0.3) and bottom == pytest.approx(40, abs=0.3)


def test_bright_patch_lights_up_its_mask_on_the_original_image() -> None:
    from PIL import Image

    from patchsae.stats.views import render_mask, upsample_grid, view_box

    preprocess = clip_preprocessor()
    w, h = 80, 40  # model view: x in [20, 60) of the original, 4 x 4 patches of 10 px
    pixels = np.full((h, w, 3), 40, dtype=np.uint8)
    pixels[10:20, 40:50] = 255  # patch row 1, column 2 of the model's grid
    image = Image.fromarray(pixels)
    model_in = preprocess([image])[0].mean(0).numpy()  # (32, 32)
    grid = model_in.reshape(4, 8, 4, 8).mean((1, 3))  # per-patch brightness: the "latent"
    grid = np.where(grid > grid.mean() + 1, grid - grid.min(), 0.0)
    assert np.argwhere(grid > 0).tolist() == [[1, 2]]
    mask = upsample_grid(grid, (w, h), view_box(preprocess, (w, h)))
    lit = np.argwhere(mask > 0)
    assert lit[:, 0].min() == 10 and lit[:, 0].max() == 19
    assert lit[:, 1].min() == 40 and lit[:, 1].max() == 49
    dark = render_mask(pixels, mask, "darken")
    assert (dark[10:20, 40:50] == 255).all() and (dark[0, 0] == 10).all()
    grey = np.full_like(pixels, 40)
    heat = render_mask(grey, mask, "heat")
    assert (heat[mask == 0] == 40).all() and (heat[mask > 0] != 40).any(axis=-1).all()


def vit_store(
    root: Path, classes: dict[str, list[tuple[int, int]]], d_sae: int, seed: int
) -> tuple[Path, Path, Path, Path]:
    """A tiny ViT (32 px, 8 px patches: 4 x 4 grid, width 16), an ImageFolder of random RGB
    images (``classes``: class -> (height, width) of each image), its fp32 store at block 1 and
    an SAE (d_sae latents); returns (model, images, store, sae) folders."""
    from PIL import Image

    from patchsae.data import DataConfig
    from patchsae.extract import ExtractConfig, extract
    from tiny_models import save_tiny_vit

    model = save_tiny_vit(root / "vit", width=16, n_layers=2, heads=2, image_size=32, patch_size=8)
    rng = np.random.default_rng(seed)
    for c, sizes in classes.items():
        (root / "imgs" / c).mkdir(parents=True, exist_ok=True)
        for i, (h, w) in enumerate(sizes):
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "imgs" / c / f"{i}.png")
    store = extract(
        ExtractConfig(
            model=str(model),
            data=DataConfig(source=str(root / "imgs")),
            layers=(1,),
            out=str(root / "store"),
            batch_size=4,
            shard_images=8,
            dtype="fp32",
            num_workers=0,
        )
    )
    torch.manual_seed(0)
    return (
        model,
        root / "imgs",
        store,
        save(make_sae(SAEConfig(d_in=16, d_sae=d_sae)), root / "sae"),
    )


def test_thumbnails_of_every_reference_from_an_extracted_store(tmp_path: Path) -> None:
    from PIL import Image

    from patchsae.data import DataConfig, open_images

    sizes = [(20 + 3 * i, 30) for i in range(6)]
    _, images, store, sae_dir = vit_store(tmp_path, {"cat": sizes, "dog": sizes}, 8, 0)
    compute_stats(
        StatsConfig(
            sae=str(sae_dir), out=str(tmp_path / "atlas"), store=str(store), top_k=3, thumb_size=16
        )
    )
    ds = Atlas.open(tmp_path / "atlas").dataset("imgs-train")
    assert ds.class_names == ["cat", "dog"]
    top_thumb, eids = ds.array("top_thumb"), ds.array("top_example_ids")
    filled = eids >= 0
    assert filled.any() and ((top_thumb >= 0) == filled).all()
    thumb_ids = ds.array("thumb_example_ids")
    assert len(set(thumb_ids.tolist())) == len(thumb_ids) == ds.meta["n_thumbs"]
    np.testing.assert_array_equal(thumb_ids[top_thumb[filled]], eids[filled])
    source = open_images(DataConfig(source=str(images)))
    for row, eid in enumerate(thumb_ids):  # ViTImageProcessor stretches: the view is the image
        want = np.asarray(source.load(int(eid)).resize((16, 16), Image.Resampling.BICUBIC))
        diff = np.abs(ds.array("thumbs")[row].astype(int) - want)  # the probed box is within
        assert diff.mean() < 1.5 and diff.max() <= 12  # 0.1 px of the image: bicubic on noise
    j, s = np.argwhere(filled)[0]
    assert ds.thumbnail(j, s, mask="darken").shape == (16, 16, 3)
    assert ds.mask(j, s).shape == (4, 4)


def test_on_the_fly_activations_equal_the_store_path(tmp_path: Path) -> None:
    from patchsae.data import DataConfig

    sizes = [(24, 20 + i) for i in range(5)]
    (tmp_path / "imgs" / "b").mkdir(parents=True)
    (tmp_path / "imgs" / "b" / "5.png").write_bytes(b"broken")
    model, images, store, sae_dir = vit_store(tmp_path, {"a": sizes, "b": sizes, "c": sizes}, 12, 1)
    data = DataConfig(source=str(images))
    common = dict(sae=str(sae_dir), out=str(tmp_path / "atlas"), top_k=3, batch_images=4)
    compute_stats(StatsConfig(**common, store=str(store), name="from-store"))
    compute_stats(StatsConfig(**common, model=str(model), data=data, layer=1, name="on-the-fly"))
    atlas = Atlas.open(tmp_path / "atlas")
    a, b = atlas.dataset("from-store"), atlas.dataset("on-the-fly")
    assert a.meta["n_images"] == b.meta["n_images"] == 15 and b.meta["n_bad"] == 1
    assert a.meta["data"]["fingerprint"] == b.meta["data"]["fingerprint"]
    for key in ("image_freq", "patch_token_freq", "class_counts", "top_example_ids"):
        np.testing.assert_array_equal(a.array(key), b.array(key), err_msg=key)
    for key in ("mean_act", "top_values", "top_grids", "thumbs"):
        np.testing.assert_allclose(a.array(key), b.array(key), rtol=1e-5, atol=1e-3, err_msg=key)
    store_rows = a.array("top_index")
    np.testing.assert_array_equal(b.array("top_index"), b.array("top_example_ids"))
    assert (store_rows != a.array("top_example_ids")).any()  # rows after the bad image shift


@pytest.fixture(scope="module")
def labelled_atlas(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("plots")
    store, sae_dir, acts = make_inputs(root)
    compute_stats(
        StatsConfig(
            sae=str(sae_dir), out=str(root / "atlas"), store=str(store), thumbnails=False, top_k=K
        )
    )
    return Atlas.open(root / "atlas").dataset(), brute_force(
        acts, np.load(store / "labels.npy"), sae_dir
    )


def test_scatter_points_and_heatmap_matrix_match_brute_force(labelled_atlas) -> None:
    from patchsae.stats.plot import heatmap_matrix, scatter_points

    ds, want = labelled_atlas
    pts = scatter_points(ds)
    fired = np.flatnonzero(want["image_freq"] > 0)
    assert pts["latent"].tolist() == fired.tolist()
    np.testing.assert_allclose(pts["log_freq"], np.log10(want["image_freq"][fired]))
    np.testing.assert_allclose(pts["log_act"], np.log10(want["mean_act_fired"][fired]))
    counts = want["class_counts"][:, fired]
    assert pts["top_class"].tolist() == np.where(counts.max(0) > 0, counts.argmax(0), -1).tolist()
    share, columns = heatmap_matrix(ds, per_class=2)
    expected_cols: list[int] = []
    for c in range(len(CLASSES)):
        best = np.lexsort((np.arange(M), -want["class_counts"][c]))[:2]
        expected_cols += [
            int(j) for j in best if want["class_counts"][c, j] > 0 and j not in expected_cols
        ]
    assert columns == expected_cols
    cc = want["class_counts"][:, columns]
    np.testing.assert_allclose(share, cc / cc.sum(0))


def test_scatter_png_and_offline_html(labelled_atlas, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    pytest.importorskip("plotly")
    from PIL import Image

    from patchsae.stats.plot import heatmap, scatter

    ds, want = labelled_atlas
    png = np.asarray(Image.open(scatter(ds, tmp_path / "fig3.png")).convert("RGB"))
    assert png.shape[0] > 200 and len(np.unique(png.reshape(-1, 3), axis=0)) > 20
    html = scatter(ds, tmp_path / "fig3.html").read_text()
    j = int(np.flatnonzero(want["image_freq"] > 0)[-1])
    top = CLASSES[int(want["class_counts"][:, j].argmax())]
    assert f"latent {j}\\u003cbr\\u003etop class: {top}" in html
    assert '<script src="http' not in html and "plotly.js" in html.lower()
    heat = heatmap(ds, tmp_path / "heat.html").read_text()
    assert all(name in heat for name in CLASSES)
    assert (
        main(
            [
                "plot",
                "heatmap",
                "--atlas",
                str(ds.root.parent.parent),
                "--out",
                str(tmp_path / "h.png"),
            ]
        )
        == 0
    )
    assert Image.open(tmp_path / "h.png").size[0] > 100


def test_reference_grid_and_mask_of_any_image(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from PIL import Image

    from patchsae.backbones import load_backbone
    from patchsae.sae import load
    from patchsae.stats.views import upsample_grid, view_box

    model, images, store, sae_dir = vit_store(tmp_path, {"x": [(30, 40)] * 6}, 8, 2)
    compute_stats(
        StatsConfig(
            sae=str(sae_dir), out=str(tmp_path / "atlas"), store=str(store), top_k=3, thumb_size=32
        )
    )
    atlas = str(tmp_path / "atlas")
    plain, masked = tmp_path / "refs.png", tmp_path / "refs_mask.png"
    assert main(["plot", "refs", "--atlas", atlas, "--latents", "0", "1", "--out", str(plain)]) == 0
    assert (
        main(
            [
                "plot",
                "refs",
                "--atlas",
                atlas,
                "--latents",
                "0",
                "1",
                "--mask",
                "darken",
                "--out",
                str(masked),
            ]
        )
        == 0
    )
    a, b = (np.asarray(Image.open(p).convert("L"), dtype=float) for p in (plain, masked))
    assert a.shape == b.shape and b.mean() < a.mean()  # darkened where latents are silent
    image_path = images / "x" / "3.png"
    out = tmp_path / "mask.png"
    args = [
        "plot",
        "mask",
        "--sae",
        str(sae_dir),
        "--model",
        str(model),
        "--layer",
        "1",
        "--image",
        str(image_path),
        "--latent",
        "2",
        "--mask",
        "darken",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    got = np.asarray(Image.open(out))
    backbone, sae = load_backbone(str(model)), load(sae_dir)
    with torch.no_grad():
        pixels = backbone.preprocess([Image.open(image_path).convert("RGB")])
        codes = sae.encode(backbone.encode(pixels, 1)[0])
    grid = codes[1:, 2].reshape(4, 4).numpy()
    box = view_box(backbone.preprocessor, (40, 30))  # tested on its own above
    assert np.allclose(box, (0, 0, 40, 30), atol=0.2)  # ViTImageProcessor stretches the image
    mask = upsample_grid(grid, (40, 30), box)
    original = np.asarray(Image.open(image_path).convert("RGB"))
    assert got.shape == original.shape
    on = mask > 0
    assert on.any() and (~on).any()
    assert (got[on] == original[on]).all()
    np.testing.assert_allclose(got[~on], np.round(original[~on] * 0.25), atol=1)
    assert main(["plot", "mask", "--sae", str(sae_dir)]) == 2


def test_damaged_or_crafted_atlas_files_give_one_line_errors(labelled_atlas, tmp_path, capsys):
    import shutil

    ds, _ = labelled_atlas
    atlas = tmp_path / "atlas"
    shutil.copytree(ds.root.parent.parent, atlas)
    folder = atlas / "datasets" / ds.name
    meta = json.loads((folder / "dataset.json").read_text())

    def query(latent: str = "3") -> str:
        assert main(["atlas", str(atlas), "latent", latent]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1
        return err

    (folder / "dataset.json").write_text(
        json.dumps({**meta, "files": {**meta["files"], "top_index": "../../../etc/passwd"}})
    )
    assert "not top_index.npy" in query()
    (folder / "dataset.json").write_text(json.dumps(meta))
    (folder / "top_index.npy").write_bytes(b"\x93NUMPY garbage")
    assert "not a readable .npy" in query()
    np.save(folder / "top_index.npy", np.zeros((M + 1, K), dtype=np.int64))
    assert "expected int64 (m, k) with m=24" in query()
    np.save(folder / "top_index.npy", np.zeros((M, K), dtype=np.int64))
    assert "outside 0..23" in query("24")
    (folder / "dataset.json").write_text(json.dumps({**meta, "options": "x"}))
    assert "lacks keys" in query()
    (atlas / "atlas.json").write_text("{not json")
    assert "not readable JSON" in query()
    (atlas / "atlas.json").write_text(json.dumps({"format": "other", "format_version": 1}))
    assert "this patchsae reads 'patchsae-atlas'" in query()


def test_a_second_writer_on_the_same_atlas_is_refused(tmp_path: Path) -> None:
    from patchsae.lock import FolderLock

    store, sae_dir, _ = make_inputs(tmp_path)
    (tmp_path / "atlas").mkdir()
    busy = pytest.raises(StatsError, match="another patchsae stats is writing")
    with FolderLock(tmp_path / "atlas", RuntimeError("held")), busy:
        run_stats(store, sae_dir, tmp_path / "atlas")
    run_stats(store, sae_dir, tmp_path / "atlas")  # released: the folder (only .lock) is usable
    assert Atlas.open(tmp_path / "atlas").dataset().meta["n_images"] == N


def test_thin_and_tiny_images_get_a_box_inside_them() -> None:
    from patchsae.stats.views import view_box

    for size in ((1, 300), (300, 1), (1, 1), (3, 2)):
        left, top, right, bottom = view_box(clip_preprocessor(), size)
        assert 0 <= left < right <= size[0] and 0 <= top < bottom <= size[1]


def test_an_image_too_thin_for_a_letterbox_is_one_clear_error() -> None:
    from patchsae.backbones import BackboneError
    from patchsae.stats.views import view_box

    with pytest.raises(BackboneError, match="too thin"):
        view_box(letterbox_preprocessor(), (1, 300))


def letterbox_preprocessor(size: int = 32):
    """DINOv2-style processing: fit inside size x size, then centre-crop (= pad) to a square."""
    from transformers import BitImageProcessor

    from patchsae.backbones import ImagePreprocessor

    processor = BitImageProcessor(
        size={"max_height": size, "max_width": size},
        crop_size={"height": size, "width": size},
        do_center_crop=True,
    )
    return ImagePreprocessor(processor, (size, size))


@pytest.mark.parametrize("wide", [True, False])
def test_masks_and_thumbnails_of_letterboxed_images_lie_on_the_right_pixels(wide: bool) -> None:
    from PIL import Image

    from patchsae.stats.views import thumbnail, upsample_grid, view_box

    preprocess = letterbox_preprocessor()
    # 80 x 40 fits as 32 x 16, padded by 8 rows above and below: patch row 1 (model rows 8-15)
    # holds original rows 0-19, each of the 4 x 4 patches covers 20 x 20 original pixels
    pixels = np.full((40, 80, 3), 40, dtype=np.uint8)
    pixels[0:20, 40:60] = 255
    if not wide:
        pixels = pixels.transpose(1, 0, 2).copy()
    image = Image.fromarray(pixels)
    model_in = preprocess([image])[0].mean(0).numpy()  # (32, 32)
    grid = model_in.reshape(4, 8, 4, 8).mean((1, 3))
    grid = np.where(grid > grid.mean() + 1, grid - grid.min(), 0.0)
    assert np.argwhere(grid > 0).tolist() == ([[1, 2]] if wide else [[2, 1]])
    mask = upsample_grid(grid, image.size, view_box(preprocess, image.size))
    np.testing.assert_array_equal(mask > 0, pixels[..., 0] == 255)
    thumb = thumbnail(image, view_box(preprocess, image.size), (32, 32)).mean(-1)
    pad = thumb[:6] if wide else thumb[:, :6]
    assert (pad == 0).all()  # the letterbox's padding is black, as in the model's input
    bright = thumb[9:15, 17:23] if wide else thumb[17:23, 9:15]
    assert (bright > 200).all()


def test_atlas_query_command_prints_the_api_answers(labelled_atlas, capsys) -> None:
    ds, _ = labelled_atlas
    atlas = str(ds.root.parent.parent)
    assert main(["atlas", atlas, "latent", "7"]) == 0
    assert json.loads(capsys.readouterr().out)["datasets"][0] == json.loads(
        json.dumps(ds.latent(7))
    )
    assert main(["atlas", atlas, "class", "1", "-k", "4"]) == 0
    assert json.loads(capsys.readouterr().out) == [list(p) for p in ds.class_latents(1, 4)]
    assert main(["atlas", atlas, "dense", "0.2"]) == 0
    assert json.loads(capsys.readouterr().out) == ds.dense(0.2)[:20]
    assert main(["atlas", atlas, "info"]) == 0
    assert json.loads(capsys.readouterr().out)["datasets"] == {ds.name: N}


def test_trained_sae_records_its_layer_and_stats_refuses_another(tmp_path: Path) -> None:
    from patchsae.config import from_dict
    from patchsae.sae import load
    from patchsae.train import TrainConfig, train

    store, hand_saved, acts = make_inputs(tmp_path)
    run = {
        "store": str(store),
        "out": str(tmp_path / "run"),
        "sae": {"d_in": D, "d_sae": M, "dtype": "float64"},
        "batch_images": 4,
        "total_images": 16,
        "warmup_steps": 1,
        "checkpoint_every": 2,
        "seed": 0,
    }
    out = train(from_dict(TrainConfig, run))
    expected = {"backbone": {"name": "tiny", "n_layers": 2}, "layer": 0}
    assert load(out).trained_on == expected
    assert load(out / "checkpoint").trained_on == expected
    assert load(hand_saved).trained_on is None

    folder = run_stats(store, out, tmp_path / "atlas")
    assert json.loads((folder / "dataset.json").read_text())["notes"] == []
    folder = run_stats(store, hand_saved, tmp_path / "atlas2")
    notes = json.loads((folder / "dataset.json").read_text())["notes"]
    assert notes == ["the SAE records no backbone or layer: only its width d_in was checked"]

    sae = load(out)
    other_layer = save(sae, tmp_path / "l1", extra={"trained_on": {**expected, "layer": 1}})
    with pytest.raises(StatsError, match="trained on layer 1 of 'tiny', these .* layer 0"):
        run_stats(store, other_layer, tmp_path / "atlas3")
    other_model = {"backbone": {"name": "big"}, "layer": 0}
    other_backbone = save(sae, tmp_path / "big", extra={"trained_on": other_model})
    with pytest.raises(StatsError, match="trained on backbone 'big', .* from 'tiny'"):
        run_stats(store, other_backbone, tmp_path / "atlas4")


def test_verify_finds_an_atlas_array_changed_in_place(tmp_path: Path, capsys) -> None:
    from patchsae.verify import verify

    store, sae_dir, _ = make_inputs(tmp_path)
    folder = run_stats(store, sae_dir, tmp_path / "atlas")
    assert verify(tmp_path / "atlas") == []
    counts = folder / "class_counts.npy"
    data = bytearray(counts.read_bytes())
    data[-1] ^= 0xFF  # same size, same header: shape checks cannot see it
    counts.write_bytes(bytes(data))
    ds = Atlas.open(tmp_path / "atlas").dataset()
    assert ds.array("class_counts").shape == (len(CLASSES), M)
    (problem,) = verify(tmp_path / "atlas")
    assert "class_counts.npy has changed since it was written" in problem
    assert main(["verify", str(tmp_path / "atlas")]) == 2
    err = capsys.readouterr()
    assert "class_counts.npy has changed" in err.out + err.err
    (folder / "dataset.json").write_text(
        json.dumps({**json.loads((folder / "dataset.json").read_text()), "complete": False})
    )
    assert verify(tmp_path / "atlas") == [
        f"{folder} is incomplete (stats was interrupted); rerun it"
    ]
