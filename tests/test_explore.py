"""The explorer's callbacks as plain functions and over HTTP: clicks to patches, grouping,
encoding against a brute-force computation, bad inputs, and concurrent sessions."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi", reason="the explorer needs the explore extra (fastapi, uvicorn)")

from patchsae.backbones import load_backbone  # noqa: E402
from patchsae.backbones.geometry import input_box  # noqa: E402
from patchsae.explore.core import (  # noqa: E402
    ExploreError,
    SparseCodes,
    group_latents,
    open_model,
    patch_at,
)
from patchsae.explore.explorer import Explorer  # noqa: E402
from patchsae.sae import SAEConfig, load, make_sae, save  # noqa: E402
from patchsae.stats import StatsError, token_set, top_latents  # noqa: E402
from tiny_atlas import D_SAE, GRID, build_atlas  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_atlas(tmp_path_factory.mktemp("explore"))


@pytest.fixture(scope="module")
def explorer(tiny):
    return Explorer([open_model(tiny["atlas"])])


def png(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=options.pop("format", "PNG"), **options)
    return buffer.getvalue()


def photo(seed: int, size=(60, 34)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))


def brute_codes(tiny, image: Image.Image) -> torch.Tensor:
    """(T, d_sae) codes by the backbone and SAE directly."""
    backbone, sae = load_backbone(tiny["model"]), load(tiny["sae"])
    with torch.no_grad():
        return sae.encode(backbone.encode(backbone.preprocess([image]), 1)[0])


def test_group_latents():
    groups = group_latents([5, 1, 9, 3], [3, 7, 5, 2])
    assert groups == {"common": [5, 3], "base_only": [1, 9], "adapted_only": [7, 2]}
    assert group_latents([], [4]) == {"common": [], "base_only": [], "adapted_only": [4]}


def test_sparse_codes_rows_and_columns():
    dense = torch.relu(torch.randn(7, 50))
    codes = SparseCodes.from_dense(dense)
    for t in range(7):
        assert np.array_equal(codes.row(t), dense[t].numpy())
    for j in range(50):
        assert np.array_equal(codes.column(j), dense[:, j].numpy())


@pytest.mark.parametrize("size_wh", [(40, 24), (24, 40), (32, 32), (300, 97)])
def test_click_lands_on_the_patch_the_model_sees(tiny, size_wh):
    """A bright dot drawn where the click is must light up the patch patch_at names."""
    backbone = load_backbone(tiny["model"])
    box = input_box(backbone.image_processor, backbone.preprocessor.size_hw, size_wh)
    rng = np.random.default_rng(1)
    checked = 0
    for fx, fy in rng.uniform(0, 1, size=(200, 2)):
        where = patch_at(fx, fy, size_wh, box, GRID)
        u, v = box.to_input(fx * size_wh[0], fy * size_wh[1])
        if where is None:
            assert not (0 <= u < 32 and 0 <= v < 32)
            continue
        if min(u % 8, v % 8) < 1.5 or max(u % 8, v % 8) > 6.5:
            continue  # too close to a patch border for a blurred dot
        yy, xx = np.mgrid[0 : size_wh[1], 0 : size_wh[0]]
        radius = max(1.0, 0.15 * 8 * (box.right - box.left) / 32)
        dot = (xx + 0.5 - fx * size_wh[0]) ** 2 + (yy + 0.5 - fy * size_wh[1]) ** 2 <= radius**2
        pixels = backbone.preprocess([Image.fromarray((dot * 255).astype(np.uint8))])[0, 0]
        patches = pixels.reshape(4, 8, 4, 8).mean((1, 3))
        brightest = divmod(int(patches.argmax()), 4)
        assert where == brightest, (fx, fy, u, v)
        checked += 1
    assert checked >= 5


def test_click_fractions_are_display_independent(tiny):
    backbone = load_backbone(tiny["model"])
    box = input_box(backbone.image_processor, backbone.preprocessor.size_hw, (40, 24))
    # the same point shown at 512 px or squeezed by CSS to 97 px is the same fraction
    for display_w in (512, 97):
        x_px = 0.55 * display_w
        assert patch_at(x_px / display_w, 0.5, (40, 24), box, GRID) == (2, 2)
    with pytest.raises(ExploreError, match="fractions"):
        patch_at(1.5, 0.5, (40, 24), box, GRID)


def test_encode_and_click_match_brute_force(tiny, explorer):
    image = photo(3)
    answer = explorer.encode(png(image))
    codes = brute_codes(tiny, image)
    layout = explorer.models[0].layout
    image_level = codes[token_set(layout, True)].mean(0)
    expected = top_latents(image_level.numpy(), 10)
    got = [(e["latent"], e["value"]) for e in answer["top"]["base"]]
    assert [j for j, _ in got] == [j for j, _ in expected]
    assert np.allclose([v for _, v in got], [v for _, v in expected], rtol=1e-5)
    left, top, right, bottom = answer["box"]
    fx, fy = left + (right - left) * 2.5 / 4, top + (bottom - top) * 1.5 / 4
    clicked = explorer.click(answer["session"], fx, fy)
    assert clicked["patch"] == [1, 2]
    patch_codes = codes[layout.patch_start + 1 * 4 + 2].numpy()
    assert [e["latent"] for e in clicked["top"]["base"]] == [
        j for j, _ in top_latents(patch_codes, 10)
    ]
    points = dict((int(j), v) for j, v in clicked["plot"]["base"])
    assert set(points) == set(np.flatnonzero(patch_codes > 0).tolist())


def test_latent_view_mask_lights_the_right_patch(tiny, explorer):
    image = photo(4, size=(64, 64))
    answer = explorer.encode(png(image))
    codes = brute_codes(tiny, image)
    layout = explorer.models[0].layout
    patches = codes[layout.patch_start :].reshape(4, 4, D_SAE)
    j = int(patches.reshape(16, D_SAE).std(0).argmax())  # a latent that differs across patches
    view = explorer.latent(j, answer["session"], "darken")
    base = view["models"][0]
    mask = np.asarray(Image.open(io.BytesIO(_decode(base["mask"]))).convert("RGB"), dtype=float)
    shown = np.asarray(explorer.sessions.get(answer["session"]).display, dtype=float)
    fires = (patches[..., j] > 0).numpy()
    cell = mask.shape[0] // 4
    for r in range(4):
        for c in range(4):
            rows, cols = (
                slice(r * cell + 2, (r + 1) * cell - 2),
                slice(c * cell + 2, (c + 1) * cell - 2),
            )
            block = (rows, cols)
            kept = np.allclose(mask[block], shown[block], atol=1)
            assert kept == bool(fires[r, c]), (r, c)
    stats = base["datasets"][0]
    assert stats["latent"] == j and 0 <= stats["image_freq"] <= 1
    assert all(ref["url"].startswith("/api/thumb/base/") for ref in stats["references"])
    thumb = explorer.thumb("base", stats["dataset"], j, 0, "heat") if stats["references"] else None
    assert thumb is None or thumb.startswith(b"\x89PNG")


def _decode(url: str) -> bytes:
    import base64

    return base64.b64decode(url.split(",", 1)[1])


@pytest.mark.parametrize(
    "mode",
    ["L", "RGBA", "CMYK", "I;16", "P"],
)
def test_any_image_mode_encodes_like_its_rgb(explorer, mode):
    rgb = photo(5)
    if mode == "I;16":
        gray = np.asarray(rgb.convert("L"), dtype=np.uint16) * 257
        image, as_rgb = Image.fromarray(gray), rgb.convert("L").convert("RGB")
    elif mode == "RGBA":
        image, as_rgb = rgb.convert("RGBA"), rgb
    else:
        image = rgb.convert(mode)
        as_rgb = image.convert("RGB")
    data = png(image, format="TIFF") if mode == "CMYK" else png(image)
    got = explorer.encode(data)["top"]["base"]
    want = explorer.encode(png(as_rgb))["top"]["base"]
    assert [e["latent"] for e in got] == [e["latent"] for e in want]


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty"),
        (b"%PDF-1.4 not an image", "not an image"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "cannot use this upload"),
    ],
)
def test_bad_uploads_say_what_is_wrong(explorer, data, message):
    with pytest.raises(ExploreError, match=message):
        explorer.encode(data)


def test_huge_image_is_refused_before_decoding(explorer):
    huge = png(Image.new("1", (10_000, 10_000)), optimize=True)  # 100 megapixels, tiny file
    with pytest.raises(ExploreError, match="100000000 pixels.*at most 40 megapixels"):
        explorer.encode(huge)


def test_bad_queries_say_what_is_wrong(explorer):
    with pytest.raises(ExploreError, match="expired or is unknown"):
        explorer.click("no-such-session", 0.5, 0.5)
    with pytest.raises(ExploreError, match="outside 0..63"):
        explorer.latent(64)
    with pytest.raises(ExploreError, match="browse kind"):
        explorer.browse("sideways")


def test_mismatched_or_missing_atlas_is_refused(tiny, tmp_path):
    with pytest.raises(StatsError, match="not an atlas"):
        open_model(tmp_path)
    other = save(make_sae(SAEConfig(arch="relu", d_in=32, d_sae=D_SAE * 2)), tmp_path / "big")
    with pytest.raises(ExploreError, match="d_sae=128 but atlas"):
        open_model(tiny["atlas"], sae=str(other))
    from tiny_models import save_tiny_vit

    vit = save_tiny_vit(tmp_path / "vit", 32, 2, 2, 48, 8)
    with pytest.raises(ExploreError, match="does not match atlas"):
        open_model(tiny["atlas"], model=str(vit))


def test_side_by_side_groups_two_models(tiny, tmp_path):
    adapted = build_atlas(tiny["atlas"].parent, seed=1, name="adapted")
    both = Explorer([open_model(tiny["atlas"]), open_model(adapted["atlas"], name="adapted")])
    answer = both.encode(png(photo(6)))
    base = [e["latent"] for e in answer["top"]["base"]]
    other = [e["latent"] for e in answer["top"]["adapted"]]
    assert answer["groups"] == group_latents(base, other)
    assert [m["name"] for m in both.latent(0, answer["session"])["models"]] == ["base", "adapted"]


def test_eight_concurrent_sessions_keep_their_own_state(explorer):
    from explore_server import request, running

    images = [photo(100 + i, size=(40 + 7 * i, 30 + 3 * i)) for i in range(8)]
    clicks = [(0.2 + 0.07 * i, 0.8 - 0.06 * i) for i in range(8)]
    expected = []
    for image, (x, y) in zip(images, clicks, strict=True):
        answer = explorer.encode(png(image))
        expected.append((answer["top"], explorer.click(answer["session"], x, y), answer["image"]))
    results: list = [None] * 8
    barrier = threading.Barrier(8)

    def session(i: int, url: str) -> None:
        barrier.wait()
        status, answer = request(f"{url}/api/encode", png(images[i]))
        assert status == 200, answer
        got = []
        for _ in range(3):
            x, y = clicks[i]
            status, click = request(f"{url}/api/click?session={answer['session']}&x={x}&y={y}")
            assert status == 200, click
            got.append(click)
        results[i] = (answer["top"], got, answer["image"])

    with running(explorer) as url:
        threads = [threading.Thread(target=session, args=(i, url)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        status, bad = request(f"{url}/api/encode", b"not an image")
        assert status == 400 and "not an image" in bad["error"]
        assert request(f"{url}/api/info")[0] == 200  # still serving
    for i in range(8):
        top, clicked, shown = results[i]
        assert top == expected[i][0] and shown == expected[i][2]
        assert all(c["patch"] == expected[i][1]["patch"] for c in clicked)
        assert all(c["top"] == expected[i][1]["top"] for c in clicked)


@pytest.mark.shared
def test_side_by_side_with_a_maple_adapted_clip(tiny, tmp_path):
    """The adapted side is a MaPLe CLIP (prompt tokens after the patches) saved as an adapter
    folder: its atlas opens through load_backbone and its patches line up with the base's."""
    from assets import CLIP_TOKENIZER

    if not CLIP_TOKENIZER.is_dir():
        pytest.skip(f"CLIP tokenizer not found at {CLIP_TOKENIZER}")
    from patchsae.adapt import PromptConfig, adapt, save_adapter

    base = load_backbone(tiny["model"], tokenizer=CLIP_TOKENIZER)
    maple = adapt(base, PromptConfig(depth=2))
    with torch.no_grad():
        for p in maple.learner.parameters():
            p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    folder = save_adapter(
        maple, tmp_path / "maple", base_model=str(tiny["model"]), tokenizer=str(CLIP_TOKENIZER)
    )
    adapted = build_atlas(tmp_path, seed=0, name="maple-atlas", model=folder)
    with pytest.raises(ExploreError, match="made with the maple adapter .* has no adapter"):
        open_model(adapted["atlas"])  # the atlas records only the base model's path
    with pytest.raises(ExploreError, match="made with no adapter but .* has adapter"):
        open_model(tiny["atlas"], model=str(folder))
    adapted_model = open_model(adapted["atlas"], model=str(folder), name="adapted")
    both = Explorer([open_model(tiny["atlas"]), adapted_model])
    assert both.models[1].layout.n_tokens == both.models[0].layout.n_tokens + 2
    image = photo(8)
    answer = both.encode(png(image))
    left, top, right, bottom = answer["box"]
    fx, fy = left + (right - left) * 0.6, top + (bottom - top) * 0.3  # patch (1, 2)
    clicked = both.click(answer["session"], fx, fy)
    layout = both.models[1].layout
    with torch.no_grad():
        acts = maple.encode(maple.preprocess([image]), 1)[0]
        codes = load(adapted["sae"]).encode(acts)
    want = top_latents(codes[layout.patch_start + 1 * 4 + 2].numpy(), 10)
    assert [e["latent"] for e in clicked["top"]["adapted"]] == [j for j, _ in want]
    base_ids = [e["latent"] for e in clicked["top"]["base"]]
    assert clicked["groups"] == group_latents(base_ids, [j for j, _ in want])


def test_cli_refuses_a_missing_atlas_in_one_line(tmp_path, capsys):
    from patchsae.cli import main

    assert main(["explore", "--atlas", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not an atlas" in err[0] and "patchsae stats" in err[0]
