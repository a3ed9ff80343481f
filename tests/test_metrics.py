"""Metrics: reconstruction sums against brute force, firing windows, CLIP downstream fidelity."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from jaxtyping import TypeCheckError

from assets import CLIP_TOKENIZER, FASHION_MNIST
from patchsae.backbones import TokenLayout
from patchsae.metrics import (
    FiringWindow,
    MetricsError,
    build_prompts,
    downstream_fidelity,
    firing_fractions,
    reconstruction_metrics,
)
from patchsae.metrics.fidelity import FidelityError
from patchsae.sae.config import SAEConfig
from patchsae.sae.registry import make_sae
from tiny_models import tiny_clip as build_tiny_clip
from tiny_stores import make_store

# ---------------------------------------------------------------- helpers


def relu_sae(w_enc: torch.Tensor, b_enc: torch.Tensor, w_dec: torch.Tensor, b_dec: torch.Tensor):
    """A ReLU SAE (float64) with the given parameters."""
    d_in, d_sae = w_enc.shape
    sae = make_sae(SAEConfig(arch="relu", d_in=d_in, d_sae=d_sae, dtype="float64"))
    with torch.no_grad():
        sae.W_enc.copy_(w_enc)
        sae.b_enc.copy_(b_enc)
        sae.W_dec.copy_(w_dec)
        sae.b_dec.copy_(b_dec)
    return sae


def random_sae(d_in: int, d_sae: int, seed: int, offset: float = 0.0):
    """A noisy, partly working ReLU SAE; latents 0 and 1 never fire, latent 2 always fires."""
    g = torch.Generator().manual_seed(seed)
    w_enc = torch.randn(d_in, d_sae, generator=g, dtype=torch.float64)
    b_enc = torch.zeros(d_sae, dtype=torch.float64)
    b_enc[:2] = -1e3
    b_enc[2] = 1e3
    w_dec = 2 / d_sae * w_enc.T + 0.02 * torch.randn(d_sae, d_in, generator=g, dtype=torch.float64)
    w_dec[2] = 0.0
    b_dec = offset + 0.1 * torch.randn(d_in, generator=g, dtype=torch.float64)
    return relu_sae(w_enc, b_enc, w_dec, b_dec)


def identity_sae(d: int, dtype: torch.dtype = torch.float64):
    """ReLU SAE with W_enc = [I, -I], W_dec = [I; -I]: relu(x) - relu(-x) = x exactly."""
    eye = torch.eye(d, dtype=torch.float64)
    sae = relu_sae(
        torch.cat([eye, -eye], 1),
        torch.zeros(2 * d, dtype=torch.float64),
        torch.cat([eye, -eye], 0),
        torch.zeros(d, dtype=torch.float64),
    )
    return sae.to(dtype)


def layout_with_register():
    """8 tokens: CLS at 0, one register at 1, a 2x3 patch grid from 2."""
    return TokenLayout(n_tokens=8, cls_index=0, patch_start=2, grid=(2, 3), extra_indices=(1,))


def split_uneven(x: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    assert sum(sizes) == x.shape[0]
    return list(torch.split(x, sizes))


# ---------------------------------------------------------------- reconstruction


def brute_force(x_ntd: np.ndarray, x_hat_ntd: np.ndarray, codes_ntm: np.ndarray) -> dict:
    x = x_ntd.reshape(-1, x_ntd.shape[-1])
    xh = x_hat_ntd.reshape(-1, x.shape[-1])
    sse = ((x - xh) ** 2).sum()
    fvu = sse / ((x - x.mean(0)) ** 2).sum()
    cos = (x * xh).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(xh, axis=-1))
    freqs = (codes_ntm > 0).reshape(-1, codes_ntm.shape[-1]).mean(0)
    return {
        "fvu": fvu,
        "explained_variance": 1 - fvu,
        "explained_variance_uncentred": 1 - sse / (x**2).sum(),
        "cosine": cos.mean(),
        "mse": ((x - xh) ** 2).mean(),
        "frac_dead": (freqs == 0).mean(),
        "frac_almost_dead": (freqs < 1e-7).mean(),
        "frac_dense": (freqs > 1e-2).mean(),
    }


def test_reconstruction_matches_brute_force_over_uneven_batches():
    g = torch.Generator().manual_seed(0)
    n, t, d, m = 11, 8, 6, 64
    scale = torch.linspace(0.5, 3.0, d, dtype=torch.float64)
    x = 5.0 + scale * torch.randn(n, t, d, generator=g, dtype=torch.float64)
    sae = random_sae(d, m, seed=1, offset=5.0)
    with torch.no_grad():
        codes = sae.encode(x)
        x_hat = sae.decode(codes)
    expected = brute_force(x.numpy(), x_hat.numpy(), codes.numpy())
    layout = layout_with_register()

    got = reconstruction_metrics(sae, split_uneven(x, [3, 1, 5, 2]), layout, progress=False)
    one_shot = reconstruction_metrics(sae, [x], layout, progress=False)

    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key
        assert one_shot[key] == pytest.approx(got[key], rel=1e-12, abs=1e-15), key
    assert got["n_tokens"] == n * t
    assert 2 / m <= expected["frac_dead"] < 1  # latents 0 and 1 never fire, others do
    assert 0 < got["explained_variance"] < 1
    # the uncentred variant ignores the large mean, so it differs from the centred one
    assert got["explained_variance_uncentred"] > got["explained_variance"] + 0.05

    nnz = (codes != 0).sum(-1).double().numpy()  # (n, t)
    assert got["l0_cls"] == pytest.approx(nnz[:, 0].mean(), rel=1e-12)
    assert got["l0_register"] == pytest.approx(nnz[:, 1].mean(), rel=1e-12)
    assert got["l0_patch"] == pytest.approx(nnz[:, 2:].mean(), rel=1e-12)
    assert got["l0"] == pytest.approx(nnz[:, [0, 2, 3, 4, 5, 6, 7]].mean(), rel=1e-12)
    assert got["l0"] != pytest.approx(nnz.mean(), rel=1e-9)  # registers are left out


def test_reconstruction_tokens_without_layout():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(37, 5, generator=g, dtype=torch.float64)
    sae = random_sae(5, 9, seed=3)
    with torch.no_grad():
        codes = sae.encode(x)
        x_hat = sae.decode(codes)
    got = reconstruction_metrics(sae, split_uneven(x, [10, 20, 7]), None, progress=False)
    assert got["fvu"] == pytest.approx(brute_force(x.numpy(), x_hat.numpy(), codes.numpy())["fvu"])
    assert got["l0"] == pytest.approx((codes != 0).sum(-1).double().mean().item(), rel=1e-12)
    assert "l0_cls" not in got


def test_perfect_reconstruction():
    g = torch.Generator().manual_seed(4)
    x = 2.0 + torch.randn(6, 8, 5, generator=g, dtype=torch.float64)
    layout = layout_with_register()
    got = reconstruction_metrics(identity_sae(5), [x[:4], x[4:]], layout, progress=False)
    assert got["fvu"] == 0.0
    assert got["explained_variance"] == 1.0
    assert got["explained_variance_uncentred"] == 1.0
    assert got["mse"] == 0.0
    assert got["cosine"] == pytest.approx(1.0, abs=1e-12)
    assert got["l0"] == 5.0  # each dimension fires exactly one of its two latents


def test_firing_fractions_from_hand_made_codes():
    # identity SAE: codes = [relu(x), relu(-x)]; x sets how often each latent fires
    n_tok, d = 200, 3
    x = torch.full((n_tok, d), -1.0, dtype=torch.float64)  # latents 3..5 fire on every token
    x[:3, 0] = 1.0  # latent 0 fires on 3/200 = 0.015 > 1e-2: dense
    x[:2, 1] = 1.0  # latent 1 fires on 2/200 = 0.01: not dense (strict)
    x[:, 2] = 0.0  # latent 2 and latent 5 never fire (code 0 is not > 0)
    got = reconstruction_metrics(identity_sae(d), [x[:50], x[50:]], None, progress=False)
    # latents: 0 dense, 1 not dense, 2 dead, 3 fires 197/200, 4 fires 198/200, 5 dead
    assert got["frac_dead"] == pytest.approx(2 / 6)
    assert got["frac_almost_dead"] == pytest.approx(2 / 6)
    assert got["frac_dense"] == pytest.approx(3 / 6)


def test_firing_fractions_thresholds():
    freqs = torch.tensor([0.0, 5e-8, 1e-7, 1e-3, 1e-2, 0.5], dtype=torch.float64)
    got = firing_fractions(freqs)
    assert got == {"frac_dead": 1 / 6, "frac_almost_dead": 2 / 6, "frac_dense": 1 / 6}
    with pytest.raises(TypeCheckError, match="freqs_m"):  # the (d_sae,) annotation
        firing_fractions(torch.zeros(2, 3))
    with pytest.raises(MetricsError, match="non-empty"):
        firing_fractions(torch.zeros(0))


def test_reconstruction_rejects_bad_input():
    sae = identity_sae(4)
    layout = layout_with_register()
    with pytest.raises(MetricsError, match="T=8"):
        reconstruction_metrics(sae, [torch.zeros(2, 5, 4)], layout, progress=False)
    with pytest.raises(MetricsError, match="d_in=4"):
        reconstruction_metrics(sae, [torch.zeros(2, 8, 3)], layout, progress=False)
    with pytest.raises(MetricsError, match="empty"):
        reconstruction_metrics(sae, [], layout, progress=False)


def test_reconstruction_restores_training_mode():
    sae = identity_sae(4)
    sae.train()
    reconstruction_metrics(sae, [torch.randn(3, 4, dtype=torch.float64)], None, progress=False)
    assert sae.training


# ---------------------------------------------------------------- firing window


def test_firing_window_slides():
    w = FiringWindow(d_sae=3, window_tokens=10)
    chunks = [
        torch.tensor([4, 0, 1]),
        torch.tensor([0, 2, 1]),
        torch.tensor([0, 1, 4]),
        torch.tensor([0, 0, 4]),
        torch.tensor([0, 3, 0]),
    ]
    w.update(chunks[0], 4)
    assert w.n_tokens == 4 and not w.full
    assert torch.equal(w.frequencies(), torch.tensor([1.0, 0.0, 0.25], dtype=torch.float64))
    w.update(chunks[1], 4)
    w.update(chunks[2], 4)  # 12 tokens; dropping the first would leave 8 < 10: keep it
    assert w.n_tokens == 12 and w.full
    assert torch.equal(w.counts(), chunks[0] + chunks[1] + chunks[2])
    w.update(chunks[3], 4)  # 16 tokens; without the first chunk 12 >= 10: drop it
    assert w.n_tokens == 12
    assert torch.equal(w.counts(), chunks[1] + chunks[2] + chunks[3])
    assert w.fractions()["frac_dead"] == pytest.approx(1 / 3)  # latent 0 fired only in chunk 0
    w.update(chunks[4], 4)
    assert torch.equal(w.counts(), chunks[2] + chunks[3] + chunks[4])
    assert torch.allclose(w.frequencies(), torch.tensor([0.0, 4 / 12, 8 / 12], dtype=torch.float64))
    assert w.fractions(dense=0.5) == {
        "frac_dead": 1 / 3,
        "frac_almost_dead": 1 / 3,
        "frac_dense": 1 / 3,
    }


def test_firing_window_state_round_trip_and_errors():
    w = FiringWindow(d_sae=2, window_tokens=5)
    with pytest.raises(MetricsError, match="empty"):
        w.frequencies()
    for i in range(4):
        w.update(torch.tensor([i, 1]), 3)
    restored = FiringWindow(d_sae=2, window_tokens=5)
    restored.load_state_dict(w.state_dict())
    assert restored.n_tokens == w.n_tokens
    assert torch.equal(restored.counts(), w.counts())
    w.update(torch.tensor([7, 0]), 3)
    restored.update(torch.tensor([7, 0]), 3)
    assert torch.equal(restored.counts(), w.counts())
    with pytest.raises(MetricsError, match=r"shape \(2,\)"):
        w.update(torch.zeros(3, dtype=torch.int64), 3)
    with pytest.raises(MetricsError, match="another width"):
        FiringWindow(d_sae=4, window_tokens=5).load_state_dict(w.state_dict())
    with pytest.raises(MetricsError, match="window_tokens"):
        FiringWindow(d_sae=4, window_tokens=0)


# ---------------------------------------------------------------- fidelity


def test_build_prompts_uses_names():
    prompts = build_prompts(["T-shirt/top", "Ankle boot"], ["a photo of a {name}.", "itap of {}."])
    assert prompts == [
        "a photo of a T-shirt/top.",
        "itap of T-shirt/top.",
        "a photo of a Ankle boot.",
        "itap of Ankle boot.",
    ]
    with pytest.raises(FidelityError, match="placeholder"):
        build_prompts(["a"], ["a photo"])
    with pytest.raises(FidelityError, match="class name"):
        build_prompts([0, 1], ["a photo of a {name}."])
    with pytest.raises(FidelityError, match="class_names is empty"):
        build_prompts([], ["a photo of a {name}."])


class RecordingTokenizer:
    """Delegates to a tokenizer and records every text it is given."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.seen: list[str] = []

    def __call__(self, texts, **kwargs):
        self.seen.extend(texts)
        return self.tokenizer(texts, **kwargs)


NAMES = ["T-shirt/top", "Trouser", "Ankle boot"]


@pytest.fixture(scope="module")
def tiny_clip():
    """A 2-block CLIP of width 64 on 32x32 images (16 patches + CLS), built in code."""
    if not CLIP_TOKENIZER.is_dir():
        pytest.skip(f"CLIP tokenizer not found at {CLIP_TOKENIZER}")
    from transformers import CLIPTokenizerFast

    from patchsae.backbones import backbone_from_hf

    model, processor = build_tiny_clip(
        width=64, n_layers=2, heads=4, image_size=32, patch_size=8, projection_dim=32
    )
    raw_tokenizer = CLIPTokenizerFast.from_pretrained(CLIP_TOKENIZER)
    tokenizer = RecordingTokenizer(raw_tokenizer)
    return backbone_from_hf(model, processor, tokenizer, name="tiny-clip"), model, raw_tokenizer


def image_batches(n_batches: int = 3, batch: int = 4):
    g = torch.Generator().manual_seed(5)
    out = []
    for i in range(n_batches):
        pixels = torch.randn(batch, 3, 32, 32, generator=g)
        labels = np.array([(i + j) % len(NAMES) for j in range(batch)], dtype=np.int64)
        out.append((pixels, labels))
    return out


@torch.no_grad()
def reference(model, tokenizer, batches, templates, layer, replace=None) -> tuple[float, float]:
    """CE and accuracy straight from the HF model; ``replace`` rewrites block ``layer``'s output."""
    text = []
    for name in NAMES:
        prompts = [t.replace("{name}", name) for t in templates]
        tok = tokenizer(prompts, padding=True, return_tensors="pt")
        emb = model.text_projection(model.text_model(**tok).pooler_output)
        text.append(F.normalize(emb, dim=-1).mean(0))
    text_cp = F.normalize(torch.stack(text), dim=-1)
    block = model.vision_model.encoder.layers[layer]
    handle = None if replace is None else block.register_forward_hook(lambda m, i, o: replace(o))
    ce, correct, n = 0.0, 0, 0
    try:
        for pixels, labels in batches:
            emb = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
            logits = model.logit_scale.exp() * F.normalize(emb, dim=-1) @ text_cp.T
            target = torch.as_tensor(labels)
            ce += F.cross_entropy(logits.double(), target, reduction="sum").item()
            correct += int((logits.argmax(-1) == target).sum())
            n += len(labels)
    finally:
        if handle is not None:
            handle.remove()
    return ce / n, correct / n


def test_fidelity_identity_sae_recovers_everything(tiny_clip):
    backbone, model, raw_tokenizer = tiny_clip
    backbone.tokenizer.seen.clear()
    batches = image_batches()
    got = downstream_fidelity(
        backbone, identity_sae(64, torch.float32), 0, batches, NAMES, progress=False
    )
    assert backbone.tokenizer.seen == [f"a photo of a {n}." for n in NAMES]
    assert got["ce_spliced"] == got["ce_original"]
    assert got["acc_spliced"] == got["acc_original"]
    assert got["fraction_recovered"] == 1.0
    assert got["n_images"] == 12

    ce, acc = reference(model, raw_tokenizer, batches, ["a photo of a {name}."], 0)
    assert got["ce_original"] == pytest.approx(ce, rel=1e-5)
    assert got["acc_original"] == acc
    ce_zero, acc_zero = reference(
        model, raw_tokenizer, batches, ["a photo of a {name}."], 0, torch.zeros_like
    )
    assert got["ce_zero"] == pytest.approx(ce_zero, rel=1e-5)
    assert got["acc_zero"] == acc_zero
    assert abs(got["ce_zero"] - got["ce_original"]) > 1e-3  # the ratio is well defined


def test_fidelity_spliced_matches_hooked_model(tiny_clip):
    backbone, model, raw_tokenizer = tiny_clip
    templates = ["a photo of a {name}.", "itap of the {}."]
    sae = random_sae(64, 256, seed=6).to(torch.float32)
    batches = image_batches(2, 5)
    got = downstream_fidelity(
        backbone, sae, -1, batches, NAMES, templates=templates, progress=False
    )

    def splice(acts_btd):
        return sae.decode(sae.encode(acts_btd))

    ref_templates = ["a photo of a {name}.", "itap of the {name}."]
    ce_spliced, acc_spliced = reference(model, raw_tokenizer, batches, ref_templates, 1, splice)
    ce_orig, _ = reference(model, raw_tokenizer, batches, ref_templates, 1)
    ce_zero, _ = reference(model, raw_tokenizer, batches, ref_templates, 1, torch.zeros_like)
    assert got["ce_spliced"] == pytest.approx(ce_spliced, rel=1e-5)
    assert got["acc_spliced"] == acc_spliced
    assert got["fraction_recovered"] == pytest.approx(
        (ce_zero - ce_spliced) / (ce_zero - ce_orig), rel=1e-4
    )
    assert got["ce_spliced"] != pytest.approx(got["ce_original"], rel=1e-6)


def test_fidelity_rejects_bad_labels_and_backbones(tiny_clip):
    backbone = tiny_clip[0]
    sae = identity_sae(64, torch.float32)
    pixels = torch.randn(2, 3, 32, 32)
    with pytest.raises(FidelityError, match=r"\[0, 3\)"):
        downstream_fidelity(backbone, sae, 0, [(pixels, np.array([0, 3]))], NAMES, progress=False)
    with pytest.raises(FidelityError, match="unlabelled"):
        downstream_fidelity(backbone, sae, 0, [(pixels, np.array([-1, 0]))], NAMES, progress=False)
    with pytest.raises(FidelityError, match="d_in=4"):
        downstream_fidelity(backbone, identity_sae(4), 0, [], NAMES, progress=False)
    with pytest.raises(FidelityError, match="empty"):
        downstream_fidelity(backbone, sae, 0, [], NAMES, progress=False)
    dino = SimpleNamespace(family="dinov2", name="tiny-dino", d_model=64)
    with pytest.raises(FidelityError, match="needs a CLIP backbone"):
        downstream_fidelity(dino, sae, 0, [], NAMES, progress=False)


# ---------------------------------------------------------------- evaluate command


@pytest.fixture(scope="module")
def clip_store(tiny_clip, tmp_path_factory):
    """The tiny CLIP saved as a folder, and a 10-image Fashion-MNIST store of its block 0."""
    if not FASHION_MNIST.is_dir():
        pytest.skip(f"Fashion-MNIST not found at {FASHION_MNIST}")
    from patchsae.data.images import DataConfig
    from patchsae.extract import ExtractConfig, extract

    backbone, model, raw_tokenizer = tiny_clip
    root = tmp_path_factory.mktemp("clip_store")
    model_dir = root / "tiny-clip"
    model.save_pretrained(model_dir)
    backbone.image_processor.save_pretrained(model_dir)
    raw_tokenizer.save_pretrained(model_dir)
    cfg = ExtractConfig(
        model=str(model_dir),
        data=DataConfig(str(FASHION_MNIST), split="train"),
        layers=(0,),
        out=str(root / "store"),
        batch_size=5,
        dtype="fp32",
        seed=0,
        limit=10,
        shard_images=10,
        num_workers=0,
    )
    return model_dir, extract(cfg)


def test_evaluate_command_end_to_end(clip_store, tmp_path, capsys):
    import json

    from patchsae.cli import main
    from patchsae.sae.io import save

    model_dir, store_dir = clip_store
    sae_dir = save(identity_sae(64, torch.float32), tmp_path / "sae")
    out = tmp_path / "metrics.json"
    argv = ["evaluate", "--sae", str(sae_dir), "--store", str(store_dir), "--images", "4"]
    argv += ["--data", str(FASHION_MNIST), "--limit", "6", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "fraction_recovered" in printed and "explained_variance" in printed
    result = json.loads(out.read_text())
    assert result["images"] == [6, 10] and result["layer"] == 0
    rec, fid = result["reconstruction"], result["fidelity"]
    assert rec["fvu"] == 0.0 and rec["explained_variance"] == 1.0
    assert rec["n_tokens"] == 4 * 17
    assert fid["n_images"] == 6 and fid["n_bad_images"] == 0
    assert fid["fraction_recovered"] == 1.0
    assert fid["ce_spliced"] == fid["ce_original"] != fid["ce_zero"]


def test_evaluate_matches_direct_computation(clip_store):
    from patchsae.data.store import ActivationStore
    from patchsae.metrics import evaluate
    from patchsae.sae.io import load, save

    _, store_dir = clip_store
    sae_dir = save(random_sae(64, 128, seed=7).to(torch.float32), store_dir.parent / "rand-sae")
    result = evaluate(sae_dir, store_dir, images=7, batch_size=3, progress=False)
    store = ActivationStore.open(store_dir)
    acts = torch.from_numpy(np.array(store.images(3, 10, 0)))
    direct = reconstruction_metrics(load(sae_dir), [acts], store.token_layout, progress=False)
    assert result["reconstruction"] == pytest.approx(direct, rel=1e-9)
    assert direct["l0_patch"] > 0 and direct["fvu"] > 0


def test_evaluate_progress_has_a_total(clip_store, capsys):
    from patchsae.metrics import evaluate
    from patchsae.sae.io import save

    _, store_dir = clip_store
    sae_dir = save(random_sae(64, 128, seed=7).to(torch.float32), store_dir.parent / "bar-sae")
    evaluate(sae_dir, store_dir, images=7, batch_size=3, progress=True)
    assert "3/3" in capsys.readouterr().err  # 7 images in batches of 3


def test_evaluate_command_errors(clip_store, tmp_path, capsys):
    from patchsae.cli import main
    from patchsae.sae.io import save

    _, store_dir = clip_store
    sae_dir = save(identity_sae(64, torch.float32), tmp_path / "sae")
    base = ["evaluate", "--sae", str(sae_dir), "--store", str(store_dir)]
    assert main([*base, "--layer", "1"]) == 2
    assert "stored layers: [0]" in capsys.readouterr().err
    assert main([*base, "--images", "11"]) == 2
    assert "1..10" in capsys.readouterr().err
    assert main([*base, "--limit", "3"]) == 2
    assert "--data" in capsys.readouterr().err
    narrow = save(identity_sae(8, torch.float32), tmp_path / "narrow")
    assert main(["evaluate", "--sae", str(narrow), "--store", str(store_dir)]) == 2
    assert "d_in=8" in capsys.readouterr().err


def test_evaluate_checks_fidelity_backbone_and_labels_first(clip_store, tmp_path, monkeypatch):
    import datasets
    from PIL import Image

    from patchsae.data.images import DataConfig
    from patchsae.data.store import ActivationStore
    from patchsae.metrics import FidelityConfig, evaluate
    from patchsae.sae.io import save

    def no_reconstruction(*args, **kwargs):
        raise AssertionError("reconstruction ran before the fidelity inputs were checked")

    module = sys.modules["patchsae.metrics.evaluate"]
    monkeypatch.setattr(module, "reconstruction_metrics", no_reconstruction)
    _, store_dir = clip_store
    sae_dir = save(identity_sae(64, torch.float32), tmp_path / "sae")
    pixels = [Image.new("RGB", (8, 8), (40 * i, 0, 0)) for i in range(4)]
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])}
    )
    ds = datasets.Dataset.from_dict({"image": pixels, "label": [0, 1, -1, 0]}, features=features)
    ds.save_to_disk(str(tmp_path / "partly-labelled"))
    fidelity = FidelityConfig(DataConfig(str(tmp_path / "partly-labelled"), split="train"))
    with pytest.raises(FidelityError, match="include unlabelled"):
        evaluate(sae_dir, store_dir, fidelity=fidelity, progress=False)

    dino = {"name": "tiny-dino", "family": "dinov2", "n_layers": 2}
    make_store(tmp_path / "dino-store", np.random.default_rng(0).normal(size=(4, 5, 64)), dino)
    assert len(ActivationStore.open(tmp_path / "dino-store")) == 4
    fidelity = FidelityConfig(DataConfig(str(FASHION_MNIST), split="test"), limit=2)
    with pytest.raises(FidelityError, match="CLIP backbone.*dinov2"):
        evaluate(sae_dir, tmp_path / "dino-store", fidelity=fidelity, progress=False)
