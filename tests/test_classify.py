"""Classification with an SAE spliced into CLIP and top-k class-latent masking, against brute
force (dense masks, full decodes, the HF model), plus the resumable ``classify`` run."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from assets import CLIP_TOKENIZER
from patchsae.classify import (
    ClassifyConfig,
    ClassifyError,
    Condition,
    Splice,
    classify,
    clip_head,
    condition_logits,
    masked_reconstruction,
    random_latents,
    top_latents,
)
from patchsae.classify.masking import SORT_CHUNK
from patchsae.data import DataConfig
from patchsae.metrics.fidelity import text_cache_key, zero_shot_classifier
from patchsae.sae import SAEConfig, make_sae
from run_files import dies_after
from tiny_atlas import build_atlas, image_folder
from tiny_models import tiny_clip as build_tiny_clip

NAMES = ["cat", "dog", "car"]
SRC = str(Path(__file__).resolve().parents[1] / "src")


def need_tokenizer() -> None:
    if not CLIP_TOKENIZER.is_dir():
        pytest.skip(f"CLIP tokenizer not found at {CLIP_TOKENIZER}")


@pytest.fixture(scope="module")
def clip():
    need_tokenizer()
    from transformers import CLIPTokenizerFast

    from patchsae.backbones import backbone_from_hf

    model, processor = build_tiny_clip(
        width=32, n_layers=3, heads=2, image_size=32, patch_size=8, projection_dim=16
    )
    tokenizer = CLIPTokenizerFast.from_pretrained(CLIP_TOKENIZER)
    return backbone_from_hf(model, processor, tokenizer, name="tiny-clip"), model


def relu_sae(d_in: int = 32, d_sae: int = 48, dtype: torch.dtype = torch.float32):
    torch.manual_seed(3)
    sae = make_sae(SAEConfig(arch="relu", d_in=d_in, d_sae=d_sae, dtype=str(dtype).split(".")[1]))
    with torch.no_grad():
        sae.b_enc.fill_(0.1)
        sae.b_dec.normal_(0, 0.3)
    return sae.eval()


def dense_masked(sae, codes_btm, ids_bk, mode):
    """Brute force: a (B, m) 0/1 mask on the codes, then the SAE's own decode."""
    keep = torch.zeros(codes_btm.shape[0], codes_btm.shape[-1], dtype=codes_btm.dtype)
    keep.scatter_(1, ids_bk, 1.0)
    return sae.decode(codes_btm * (keep if mode == "on" else 1 - keep)[:, None, :])


# ---------------------------------------------------------------- masking core


def test_top_latents_matches_brute_force_with_ties_and_chunks():
    g = torch.Generator().manual_seed(0)
    stats = torch.randint(0, 4, (SORT_CHUNK + 7, 30), generator=g)  # many ties, two chunks
    got = top_latents(stats, 12)
    for c in range(stats.shape[0]):
        values = stats[c].tolist()
        expect = sorted(range(30), key=lambda j: (-values[j], j))[:12]
        assert got[c].tolist() == expect
    assert top_latents(stats, 100).shape == (SORT_CHUNK + 7, 30)


def test_random_latents_seeded_and_distinct():
    a, b = random_latents(5, 40, 10, seed=1), random_latents(5, 40, 10, seed=1)
    assert torch.equal(a, b) and not torch.equal(a, random_latents(5, 40, 10, seed=2))
    assert all(len(set(row.tolist())) == 10 for row in a)
    assert not all(torch.equal(a[0], row) for row in a[1:])


@pytest.mark.parametrize("mode", ["on", "off"])
def test_masked_reconstruction_matches_dense_mask(mode):
    sae = relu_sae(dtype=torch.float64)
    x = torch.randn(6, 5, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    codes = sae.encode(x)
    recon = sae.decode(codes)
    g = torch.Generator().manual_seed(2)
    sets = torch.stack([torch.randperm(48, generator=g)[:7] for _ in range(3)])
    ids = sets[torch.tensor([0, 1, 2, 0, 0, 2])]  # images share sets
    got = masked_reconstruction(codes, recon, sae.W_dec, sae.b_dec, ids, mode)
    torch.testing.assert_close(got, dense_masked(sae, codes, ids, mode))
    every = masked_reconstruction(codes, recon, sae.W_dec, sae.b_dec, None, mode)
    torch.testing.assert_close(every, sae.decode(codes if mode == "on" else codes * 0))


# ---------------------------------------------------------------- conditions on a tiny CLIP


def batch(n: int = 6, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.arange(n) % len(NAMES)


def test_splice_with_error_equals_unspliced_and_masks_match_brute_force(clip):
    backbone, _ = clip
    sae = relu_sae()
    layer = 1
    head = clip_head(backbone, layer, zero_shot_classifier(backbone, NAMES))
    pixels, labels = batch()
    acts = backbone.encode(pixels, layer)
    stats = torch.rand(len(NAMES), 48, generator=torch.Generator().manual_seed(4))
    sets = {"class": top_latents(stats, 10), "dataset": top_latents(stats.sum(0)[None], 10)}
    conds = [
        Condition("unspliced"),
        Condition("spliced"),
        *[Condition(m, s, k) for m in ("on", "off") for s in sets for k in (1, 5, 10, 0)],
    ]
    positions = backbone.token_layout.positions("all")
    exact = condition_logits(head, sae, acts, conds, positions, Splice(error=True), sets, labels)
    base = exact[Condition("unspliced")]
    for cond in conds:  # with the error term every condition is the unspliced model
        torch.testing.assert_close(exact[cond], base, atol=1e-4, rtol=1e-4)
        assert torch.equal(exact[cond].argmax(-1), base.argmax(-1))
    out = condition_logits(head, sae, acts, conds, positions, Splice(), sets, labels)
    codes = sae.encode(acts)
    torch.testing.assert_close(out[Condition("on", "class", 0)], out[Condition("spliced")])
    zeroed = backbone.forward_from(sae.decode(torch.zeros_like(codes)), layer)
    torch.testing.assert_close(
        out[Condition("off", "class", 0)], head.logit_scale * zeroed @ head.text_cp.T
    )
    for cond in conds[2:]:
        if not cond.k:
            continue
        rows = sets[cond.selection]
        ids = (rows[labels] if rows.shape[0] > 1 else rows.expand(len(labels), -1))[:, : cond.k]
        image = backbone.forward_from(dense_masked(sae, codes, ids, cond.kind), layer)
        torch.testing.assert_close(
            out[cond], head.logit_scale * image @ head.text_cp.T, atol=1e-4, rtol=1e-4
        )
    assert not torch.allclose(out[Condition("on", "class", 1)], out[Condition("spliced")])


def test_token_subsets_offset_and_predicted_targets(clip):
    backbone, _ = clip
    sae = relu_sae()
    layer = 0
    head = clip_head(backbone, layer, zero_shot_classifier(backbone, NAMES))
    pixels, labels = batch(4, seed=9)
    acts = backbone.encode(pixels, layer)
    recon = sae.decode(sae.encode(acts))
    for tokens, index in (("cls", [0]), ("patches", list(range(1, 17)))):
        splice = Splice(tokens=tokens, offset=0.25)
        positions = backbone.token_layout.positions(tokens)
        got = condition_logits(head, sae, acts, [Condition("spliced")], positions, splice, {})
        expect = acts.clone()
        expect[:, index] = recon[:, index] + 0.25
        torch.testing.assert_close(got[Condition("spliced")], head(expect))
    sets = {"class": top_latents(torch.rand(3, 48), 5)}
    cond = [Condition("on", "class", 5)]
    positions = backbone.token_layout.positions("all")
    predicted = condition_logits(head, sae, acts, cond, positions, Splice(), sets, None)
    targets = head(acts).argmax(-1)
    explicit = condition_logits(head, sae, acts, cond, positions, Splice(), sets, targets)
    torch.testing.assert_close(predicted[cond[0]], explicit[cond[0]])


def test_head_is_pluggable():
    """Any tail callable and any text embeddings: logits = scale * tail(acts) @ text.T."""
    from patchsae.classify import ClassifierHead

    text = F.normalize(torch.randn(4, 8), dim=-1)
    weight = torch.randn(32, 8)
    head = ClassifierHead(lambda a: F.normalize(a.mean(1) @ weight, dim=-1), text, 10.0)
    sae = relu_sae()
    acts = torch.randn(3, 5, 32)
    out = condition_logits(head, sae, acts, [Condition("spliced")], slice(0, 5), Splice(), {})
    expect = 10.0 * F.normalize(sae.decode(sae.encode(acts)).mean(1) @ weight, dim=-1) @ text.T
    torch.testing.assert_close(out[Condition("spliced")], expect)


# ---------------------------------------------------------------- text-embedding cache


def test_text_cache_hit_and_invalidation(clip, tmp_path, monkeypatch):
    backbone, _ = clip
    calls = []
    encode = backbone.encode_text
    monkeypatch.setattr(backbone, "encode_text", lambda p: calls.append(len(p)) or encode(p))
    first = zero_shot_classifier(backbone, NAMES, ("a {name}.", "the {name}."), tmp_path)
    again = zero_shot_classifier(backbone, NAMES, ("a {name}.", "the {name}."), tmp_path)
    assert calls == [6] and torch.equal(first, again)
    torch.testing.assert_close(
        first, zero_shot_classifier(backbone, NAMES, ("a {name}.", "the {name}."))
    )
    zero_shot_classifier(backbone, ["cat", "dog", "bus"], ("a {name}.", "the {name}."), tmp_path)
    zero_shot_classifier(backbone, NAMES, ("a {name}.",), tmp_path)
    assert calls == [6, 6, 6, 3] and len(list(tmp_path.iterdir())) == 3
    key = text_cache_key(backbone, NAMES, ("a {name}.",))
    (tmp_path / f"{key}.safetensors").write_bytes(b"not safetensors")  # damaged: recomputed
    zero_shot_classifier(backbone, NAMES, ("a {name}.",), tmp_path)
    assert calls[-1] == 3 and len(calls) == 5


# ---------------------------------------------------------------- the classify run


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    need_tokenizer()
    root = tmp_path_factory.mktemp("classify")
    paths = build_atlas(root)
    paths["eval"] = image_folder(root / "eval", n_per_class=5)  # another split, same classes
    return paths


def config(world, out, **kw):
    base = dict(
        model=str(world["model"]),
        data=DataConfig(str(world["eval"])),
        out=str(out),
        sae=str(world["sae"]),
        layer=1,
        atlas=str(world["atlas"]),
        selections=("class", "random"),
        ks=(1, 5, 0),
        tokenizer=str(CLIP_TOKENIZER),
        templates=("a photo of a {name}.", "a {name}."),
        batch_size=3,
        checkpoint_seconds=0.0,
        plot=False,
    )
    return ClassifyConfig(**{**base, **kw})


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_classify_per_class_counts_match_brute_force(world, tmp_path):
    from patchsae.backbones import load_backbone
    from patchsae.data import load_rgb
    from patchsae.sae import load
    from patchsae.stats import Atlas

    cfg = config(world, tmp_path / "run", plot=True)
    out = classify(cfg, progress=False)
    rows = read_csv(out / "results.csv")
    assert {r["condition"] for r in rows} == {"unspliced", "spliced", "on", "off"}
    assert (out / "accuracy_vs_k.png").stat().st_size > 0 and (out / "accuracy_vs_k.html").is_file()

    backbone = load_backbone(cfg.model, tokenizer=cfg.tokenizer)
    sae = load(cfg.sae)
    names = ["left", "right"]
    text = zero_shot_classifier(backbone, names, cfg.templates)
    files = sorted(Path(world["eval"]).glob("*/*.png"))
    labels = torch.tensor([names.index(f.parent.name) for f in files])
    pixels = backbone.preprocess([load_rgb(f) for f in files])
    # unspliced through the HF model itself (no forward_from)
    emb = F.normalize(backbone.model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
    preds = {("unspliced", "", ""): (emb @ text.T).argmax(-1)}
    acts = backbone.encode(pixels, 1)
    codes = sae.encode(acts)
    image = lambda x: F.normalize(backbone.forward_from(x, 1), dim=-1)  # noqa: E731
    preds[("spliced", "", "")] = (image(sae.decode(codes)) @ text.T).argmax(-1)
    counts = torch.from_numpy(np.array(Atlas.open(cfg.atlas).dataset().array("class_counts")))
    order = {"class": counts.double(), "random": None}
    for sel in ("class", "random"):
        ranking = top_latents(order[sel], 64) if sel == "class" else random_latents(2, 64, 5, 0)
        for k in (1, 5, 0):
            for mode in ("on", "off"):
                if k == 0:
                    masked = sae.decode(codes if mode == "on" else codes * 0)
                else:
                    masked = dense_masked(sae, codes, ranking[labels][:, :k], mode)
                preds[(mode, sel, str(k or "all"))] = (image(masked) @ text.T).argmax(-1)
    for r in rows:
        pred = preds[(r["condition"], r["selection"], r["k"])]
        c = int(r["class_id"])
        assert int(r["n"]) == int((labels == c).sum())
        assert int(r["correct"]) == int(((pred == labels) & (labels == c)).sum()), r
        assert float(r["accuracy"]) == pytest.approx(int(r["correct"]) / int(r["n"]))
        assert r["protocol"] == ("held_out" if r["selection"] == "class" else "")
    summary = read_csv(out / "summary.csv")
    assert len(summary) == 2 + 2 * 3 * 2


def test_classify_resumes_to_the_same_csv(world, tmp_path):
    whole = classify(config(world, tmp_path / "whole"), progress=False)
    part = config(world, tmp_path / "part")
    classify(part, progress=False, max_batches=1)
    assert not (tmp_path / "part" / "results.csv").exists()
    classify(part, progress=False, max_batches=1)
    classify(part, progress=False)
    for name in ("results.csv", "summary.csv"):
        assert (whole / name).read_text() == (tmp_path / "part" / name).read_text()


# Dies right after the state recording two batches is written.
AFTER_TWO_BATCHES = dies_after(
    "patchsae.classify.run.write_json",
    'args[0].name == "state.json" and args[1]["batches_done"] == 2',
)


def test_classify_resumes_after_kill_9(world, tmp_path):
    whole = classify(config(world, tmp_path / "whole", batch_size=1), progress=False)
    out = tmp_path / "killed"
    args = [
        "classify", "--model", str(world["model"]),
        "--data", str(world["eval"]), "--out", str(out), "--sae", str(world["sae"]),
        "--layer", "1", "--atlas", str(world["atlas"]), "--selections", "class", "random",
        "--ks", "1", "5", "0", "--tokenizer", str(CLIP_TOKENIZER), "--batch-size", "1",
        'templates=["a photo of a {name}.", "a {name}."]', "checkpoint_seconds=0", "plot=false",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": SRC}
    killed = subprocess.run(
        [sys.executable, "-c", AFTER_TWO_BATCHES, *args], env=env, capture_output=True
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()
    assert json.loads((out / "state.json").read_text())["batches_done"] == 2
    assert not (out / "results.csv").exists()
    rerun = subprocess.run(
        [sys.executable, "-m", "patchsae", *args], env=env, capture_output=True, text=True
    )
    assert rerun.returncode == 0, rerun.stderr
    for name in ("results.csv", "summary.csv"):
        assert (whole / name).read_text() == (out / name).read_text()


def test_classify_refusals(world, tmp_path):
    from patchsae.sae import save

    other = save(relu_sae(d_in=32, d_sae=40), tmp_path / "sae40")
    with pytest.raises(ClassifyError, match="d_sae=64.*d_sae=40"):
        classify(config(world, tmp_path / "a", sae=str(other)), progress=False)
    retrained = save(relu_sae(d_in=32, d_sae=64), tmp_path / "sae64")
    with pytest.raises(ClassifyError, match="another SAE"):
        classify(config(world, tmp_path / "a2", sae=str(retrained)), progress=False)
    with pytest.raises(ClassifyError, match="same_split=true"):
        classify(config(world, tmp_path / "b", data=DataConfig(str(world["images"]))))
    same = classify(
        config(world, tmp_path / "c", data=DataConfig(str(world["images"])), same_split=True),
        progress=False,
    )
    assert {r["protocol"] for r in read_csv(same / "results.csv") if r["selection"] == "class"} == {
        "same_split"
    }
    classify(config(world, tmp_path / "d", ks=(1,)), progress=False, max_batches=1)
    with pytest.raises(ClassifyError, match="other settings \\(ks\\)"):
        classify(config(world, tmp_path / "d", ks=(2,)), progress=False)
    unlabelled = tmp_path / "flat"
    unlabelled.mkdir()
    shutil.copy(next(Path(world["eval"]).glob("*/*.png")), unlabelled / "x.png")
    with pytest.raises(ClassifyError, match="class names"):
        classify(config(world, tmp_path / "e", data=DataConfig(str(unlabelled))), progress=False)


def test_cli_errors_are_one_line(world, tmp_path, capsys):
    from patchsae.cli import main
    from patchsae.sae import save

    other = save(relu_sae(d_in=32, d_sae=40), tmp_path / "sae40")
    argv = ["classify", "--model", str(world["model"]), "--data", str(world["eval"]), "--out",
            str(tmp_path / "o"), "--sae", str(other), "--layer", "1", "--atlas",
            str(world["atlas"]), "--tokenizer", str(CLIP_TOKENIZER)]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("patchsae classify: error:")]
    assert len(lines) == 1 and "d_sae=40" in lines[0] and "Traceback" not in err
    assert main(argv[:-4] + ["ks=[-1]"]) == 2
    assert "ks must be" in capsys.readouterr().err


def test_zero_shot_only_and_non_clip_refused(world, tmp_path):
    from tiny_models import save_tiny_vit

    out = classify(config(world, tmp_path / "zs", sae=None, atlas=None), progress=False)
    rows = read_csv(out / "results.csv")
    assert {r["condition"] for r in rows} == {"unspliced"} and len(rows) == 2
    assert sum(int(r["n"]) for r in rows) == 10
    vit = save_tiny_vit(tmp_path / "vit", 32, 2, 2, 32, 8)
    with pytest.raises(ClassifyError, match="needs a CLIP"):
        classify(config(world, tmp_path / "v", model=str(vit), sae=None), progress=False)


def test_clip_imagenet_templates():
    from patchsae.metrics.fidelity import CLIP_IMAGENET_TEMPLATES, build_prompts

    assert len(set(CLIP_IMAGENET_TEMPLATES)) == 80
    prompts = build_prompts(["tench"], CLIP_IMAGENET_TEMPLATES)
    assert prompts[0] == "a bad photo of a tench." and "itap of my tench." in prompts
