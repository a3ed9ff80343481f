"""The remapping analysis: metrics against brute force, and a small end-to-end compare."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from assets import CLIP_TOKENIZER
from patchsae.adapt import PromptConfig, adapt, save_adapter
from patchsae.adapt.compare import (
    CompareConfig,
    class_overlap,
    compare,
    compare_atlases,
    latent_changes,
)
from patchsae.adapt.config import AdaptError
from patchsae.backbones import load_backbone
from patchsae.cli import main
from patchsae.data import DataConfig
from patchsae.sae import SAEConfig, make_sae, save
from patchsae.stats import Atlas
from tiny_atlas import image_folder
from tiny_models import tiny_clip

scipy_stats = pytest.importorskip("scipy.stats")


def test_latent_changes_against_brute_force():
    rng = np.random.default_rng(0)
    m = 200
    fb = np.where(rng.random(m) < 0.3, 0.0, rng.random(m))
    fa = np.where(rng.random(m) < 0.3, 0.0, rng.random(m))
    ab, aa = rng.random(m), rng.random(m)
    arrays, summary = latent_changes(
        {"image_freq": fb, "mean_act": ab}, {"image_freq": fa, "mean_act": aa}
    )
    alive = [j for j in range(m) if fb[j] > 0 or fa[j] > 0]
    assert summary["appear"] == sum(1 for j in range(m) if fb[j] == 0 and fa[j] > 0)
    assert summary["vanish"] == sum(1 for j in range(m) if fb[j] > 0 and fa[j] == 0)
    assert summary["alive_base"] == sum(1 for j in range(m) if fb[j] > 0)
    assert arrays["appears"].sum() == summary["appear"]
    want = scipy_stats.spearmanr(fb[alive], fa[alive]).statistic
    assert summary["spearman_image_freq"] == pytest.approx(want, abs=1e-12)
    want = scipy_stats.spearmanr(ab[alive], aa[alive]).statistic
    assert summary["spearman_mean_act"] == pytest.approx(want, abs=1e-12)
    assert summary["mean_abs_freq_shift"] == pytest.approx(
        sum(abs(fa[j] - fb[j]) for j in alive) / len(alive)
    )
    assert np.array_equal(arrays["freq_shift"], fa - fb)
    same, summary = latent_changes(
        {"image_freq": fb, "mean_act": ab}, {"image_freq": fb, "mean_act": ab}
    )
    assert summary["spearman_image_freq"] == pytest.approx(1.0) and summary["appear"] == 0


def brute_top(values, k):
    order = sorted(range(len(values)), key=lambda j: (-values[j], j))
    return [j for j in order if values[j] > 0][:k]


def test_class_overlap_against_brute_force():
    rng = np.random.default_rng(1)
    c, m, k = 5, 40, 6
    vb = rng.integers(0, 4, size=(c, m)).astype(np.float64) * (rng.random((c, m)) < 0.5)
    va = rng.integers(0, 4, size=(c, m)).astype(np.float64) * (rng.random((c, m)) < 0.5)
    vb[4] = 0
    rank = lambda v: np.lexsort((np.broadcast_to(np.arange(m), v.shape), -v), axis=-1)  # noqa: E731
    rows = class_overlap(rank(vb), rank(va), vb, va, k)
    for row in rows:
        cls = row["class"]
        tb, ta = brute_top(vb[cls], k), brute_top(va[cls], k)
        assert row["top_base"] == tb and row["top_adapted"] == ta
        union = set(tb) | set(ta)
        if union:
            assert row["jaccard"] == pytest.approx(len(set(tb) & set(ta)) / len(union))
        else:
            assert math.isnan(row["jaccard"])
        assert row["adapted_evidence_on_base_top"] == pytest.approx(
            sum(va[cls][j] for j in tb) / va[cls].sum()
        )
        assert row["adapted_evidence_on_adapted_top"] == pytest.approx(
            sum(va[cls][j] for j in ta) / va[cls].sum()
        )
    assert math.isnan(rows[4]["base_evidence_on_base_top"]) and rows[4]["top_base"] == []


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    if not CLIP_TOKENIZER.is_dir():
        pytest.skip(f"CLIP tokenizer not found at {CLIP_TOKENIZER}")
    root = tmp_path_factory.mktemp("compare")
    model, processor = tiny_clip(32, 2, 2, 32, 8, 16)
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    base = load_backbone(root / "model", tokenizer=CLIP_TOKENIZER)
    adapters = {}
    for method, cfg in (("maple", PromptConfig(depth=2)), ("coop", PromptConfig(method="coop"))):
        adapted = adapt(base, cfg)
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in adapted.learner.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
        adapters[method] = save_adapter(
            adapted, root / method, base_model=str(root / "model"), tokenizer=str(CLIP_TOKENIZER)
        )
    torch.manual_seed(0)
    sae = make_sae(SAEConfig(arch="relu", d_in=32, d_sae=64))
    with torch.no_grad():
        sae.b_enc.fill_(0.05)
    return {
        "root": root,
        "model": root / "model",
        "sae": save(sae, root / "sae"),
        "images": image_folder(root / "images"),
        "adapters": adapters,
    }


def run_compare(setup, method: str, out: str) -> tuple[CompareConfig, dict]:
    cfg = CompareConfig(
        sae=str(setup["sae"]),
        base=str(setup["model"]),
        adapted=str(setup["adapters"][method]),
        data=DataConfig(str(setup["images"])),
        layer=1,
        out=str(setup["root"] / out),
        k=5,
    )
    report = compare(cfg)
    assert report.name == "report.md"
    return cfg, json.loads((report.parent / "compare.json").read_text())


def test_coop_leaves_the_vision_side_unchanged(setup):
    """CoOp has no vision prompts: every latent fires as in the base, every top-k set is equal."""
    _, out = run_compare(setup, "coop", "coop-cmp")
    s = out["latent_summary"]
    assert s["appear"] == s["vanish"] == 0 and s["mean_abs_freq_shift"] == 0
    assert s["spearman_image_freq"] in (None, 1.0) and s["spearman_mean_act"] == pytest.approx(1.0)
    assert all(r["jaccard"] == 1.0 for r in out["classes"])
    assert all(
        r["adapted_evidence_on_base_top"] == r["base_evidence_on_base_top"] for r in out["classes"]
    )


def test_maple_compare_matches_the_atlases_and_writes_the_report(setup):
    cfg, out = run_compare(setup, "maple", "maple-cmp")
    folder = setup["root"] / "maple-cmp"
    base = Atlas.open(folder / "atlas-base").dataset()
    adapted = Atlas.open(folder / "atlas-adapted").dataset()
    assert adapted.meta["n_images"] == base.meta["n_images"] == 12
    assert Atlas.open(folder / "atlas-adapted").meta["token_layout"]["n_prompts"] == 2
    again = compare_atlases(base, adapted, 5, "class_counts")
    assert out["latent_summary"]["mean_abs_freq_shift"] > 0
    assert out["latent_summary"] == pytest.approx(again["latent_summary"], nan_ok=True)
    assert [r["top_base"] for r in out["classes"]] == [r["top_base"] for r in again["classes"]]
    with open(folder / "per_latent.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 64
    freq = np.asarray(adapted.array("image_freq"))
    assert [float(r["image_freq_adapted"]) for r in rows] == pytest.approx(freq.tolist())
    md = (folder / "report.md").read_text()
    assert "| jaccard |" in md and "## Definitions" in md
    page = (folder / "report.html").read_text()
    assert "<table>" in page and ("data:image/png;base64," in page or "No figures" in page)
    assert out["config"]["k"] == 5 and "jaccard" in out["definitions"]


def test_compare_refuses_atlases_of_other_images(setup):
    _, _ = run_compare(setup, "coop", "coop-cmp")
    folder = setup["root"] / "coop-cmp"
    base = Atlas.open(folder / "atlas-base").dataset()
    other = setup["root"] / "other"
    from patchsae.stats import StatsConfig, compute_stats

    images = image_folder(setup["root"] / "images-3", n_per_class=3)
    compute_stats(
        StatsConfig(
            sae=str(setup["sae"]),
            out=str(other),
            model=str(setup["model"]),
            data=DataConfig(str(images)),
            layer=1,
            thumbnails=False,
        )
    )
    with pytest.raises(AdaptError, match="different images or classes"):
        compare_atlases(base, Atlas.open(other).dataset(), 5, "class_counts")


def test_compare_cli_bad_input_is_one_line(tmp_path, capsys):
    assert (
        main(
            [
                "compare",
                "sae=x",
                "base=y",
                "adapted=z",
                "data.source=w",
                "layer=1",
                f"out={tmp_path}",
                "k=0",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "k must be >= 1" in err[0]


def test_masking_protocol_on_the_adapted_model(setup):
    """The classify runs inside compare: accuracies equal a direct computation, k = all equals
    the spliced model, and the gain shares follow from the accuracies."""
    pytest.importorskip("patchsae.classify")
    from patchsae.metrics.fidelity import zero_shot_classifier

    cfg = CompareConfig(
        sae=str(setup["sae"]),
        base=str(setup["model"]),
        tokenizer=str(CLIP_TOKENIZER),
        adapted=str(setup["adapters"]["maple"]),
        data=DataConfig(str(setup["images"])),
        layer=1,
        out=str(setup["root"] / "maple-mask"),
        k=5,
        classify_split="train",
        ks=(1, 5, 0),
    )
    out = json.loads((compare(cfg).parent / "compare.json").read_text())["masking"]
    assert out["protocol"] == "same_split"
    from patchsae.data.images import open_images

    source = open_images(cfg.data)
    labels = torch.as_tensor(source.labels)
    adapted = load_backbone(cfg.adapted)
    base = load_backbone(cfg.base, tokenizer=CLIP_TOKENIZER)
    with torch.no_grad():
        for backbone, key in ((adapted, "adapted"), (base, "zero_shot_base")):
            pixels = backbone.preprocess([source.load(i) for i in range(len(source))])
            image = backbone.forward_from(backbone.encode(pixels, -1), -1)
            text = zero_shot_classifier(backbone, source.class_names, adapted.templates)
            acc = float(((image @ text.T).argmax(-1) == labels).float().mean())
            assert out[key] == pytest.approx(acc), key
    assert out["adaptation_gain"] == pytest.approx(out["adapted"] - out["zero_shot_base"])
    by_k = {row["k"]: row for row in out["by_k"]}
    assert set(by_k) == {"1", "5", "all"}
    assert by_k["all"]["on_base_latents"] == pytest.approx(out["adapted_spliced"])
    assert by_k["all"]["on_adapted_latents"] == pytest.approx(out["adapted_spliced"])
    for row in out["by_k"]:
        gain = out["adaptation_gain"]
        want = (row["on_base_latents"] - out["zero_shot_base"]) / gain if gain else None
        assert row["gain_kept_base_latents"] == (pytest.approx(want) if want is not None else None)
    assert (
        "## Masking on the adapted model"
        in (setup["root"] / "maple-mask" / "report.md").read_text()
    )
