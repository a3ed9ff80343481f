"""MaPLe / CoOp on HF CLIP: the original code's forward (golden), official files, our files."""

from __future__ import annotations

import collections
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from assets import CLIP_TOKENIZER, SHARED
from patchsae.adapt import (
    AdaptedBackbone,
    AdaptError,
    PromptConfig,
    adapt,
    export_official,
    load_adapter,
    load_official,
    read_official_state,
    save_adapter,
)
from patchsae.adapt.checkpoint import learner_tensors, load_learner_tensors
from patchsae.adapt.model import new_learner
from patchsae.backbones import TokenLayout, backbone_from_hf, load_backbone
from patchsae.metrics.fidelity import zero_shot_classifier
from tiny_models import tiny_clip

GOLDEN = SHARED / "golden" / "maple"
GOLDEN_CKPT = GOLDEN / "MultiModalPromptLearner" / "model.pth.tar-5"
GOLDEN_NAMES = ["cat", "sea turtle", "fire truck"]
NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress"]


@pytest.fixture(scope="module")
def golden():
    if not GOLDEN.is_dir():
        pytest.skip(f"MaPLe golden folder {GOLDEN} is absent")
    return load_file(str(GOLDEN / "outputs.safetensors")), load_backbone(GOLDEN / "clip")


def text_hidden(adapted: AdaptedBackbone, prompts: list[str]) -> list[torch.Tensor]:
    """Output of every text block, recorded by forward hooks while encoding ``prompts``."""
    seen: list[torch.Tensor] = []
    layers = adapted.model.text_model.encoder.layers
    hooks = [layer.register_forward_hook(lambda m, i, o: seen.append(o)) for layer in layers]
    try:
        adapted.encode_text(prompts)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def check_forward(adapted: AdaptedBackbone, g: dict[str, torch.Tensor], prefix: str) -> None:
    """Logits 1e-4, normalised features 1e-5, every vision block 1e-4, vs the golden ``prefix``."""
    with torch.no_grad():
        acts = adapted.encode_layers(g["pixel_values"], list(range(9)))
        image = adapted.forward_from(acts[8], 8)
        text = zero_shot_classifier(adapted, GOLDEN_NAMES, adapted.templates)
    logits = adapted.logit_scale * image @ text.T
    assert (logits - g[f"{prefix}logits"]).abs().max() < 1e-4
    assert (image - g[f"{prefix}image_features"]).abs().max() < 1e-5
    assert (text - g[f"{prefix}text_features"]).abs().max() < 1e-5
    for block in range(9):
        want = g[f"{prefix}vision.hidden_after_block.{block}"]
        assert acts[block].shape == want.shape == (2, 19, 64)
        assert (acts[block] - want).abs().max() < 1e-4, block


@pytest.mark.shared
def test_golden_as_run_with_fp16_prompt_rounding(golden):
    g, base = golden
    adapted = load_official(GOLDEN_CKPT, base, PromptConfig(round_prompts_fp16=True))
    assert adapted.templates == ("a photo of a {name}.",)
    check_forward(adapted, g, "")
    with torch.no_grad():
        embedded = adapted._parts.embed(g["pixel_values"])
        learner = adapted.learner
        shared = learner.proj(learner.ctx)
        deep = [
            learner.compound_prompt_projections[j](learner.compound_prompts_text[j])
            for j in range(8)
        ]
        hidden = text_hidden(adapted, [f"a photo of a {n}." for n in GOLDEN_NAMES])
    assert (shared - g["prompt_learner.shared_ctx"]).abs().max() < 1e-5
    assert (torch.stack(deep) - g["prompt_learner.visual_deep_prompts"]).abs().max() < 1e-5
    ln_pre = adapted.model.vision_model.pre_layrnorm
    assert (embedded - ln_pre(g["vision.embeddings_with_prompts"])).abs().max() < 1e-5
    assert torch.equal(
        g["vision.embeddings_with_prompts"][:, 17:], shared.half().float()[None].expand(2, -1, -1)
    )
    ids = g["tokenized_prompts"]
    eos = ids.argmax(-1)
    for block in range(9):
        want = g[f"text.hidden_after_block_first16.{block}"]
        for c in range(3):
            got = hidden[block][c, : eos[c] + 1]
            assert (got - want[c, : eos[c] + 1]).abs().max() < 1e-4, (block, c)


@pytest.mark.shared
def test_golden_without_rounding_is_the_default(golden):
    g, base = golden
    adapted = load_official(GOLDEN_CKPT, base, PromptConfig())
    check_forward(adapted, g, "variant_nohalf.")
    assert (adapted.logit_scale - g["logit_scale"].exp()).abs() < 1e-6


@pytest.mark.shared
def test_golden_depth5_blocks_past_the_depth_propagate(golden):
    """The original loads the depth-9 file into a depth-5 model with strict=False (extras
    ignored); we refuse that, so the depth-5 learner gets the first 4 deep prompts explicitly."""
    g, base = golden
    cfg = PromptConfig(depth=5, round_prompts_fp16=True)
    with pytest.raises(AdaptError, match="prompt depth 9 .* configured for depth 5"):
        load_official(GOLDEN_CKPT, base, cfg)
    tensors = learner_tensors(read_official_state(GOLDEN_CKPT), "golden")
    kept = {
        k: v for k, v in tensors.items() if not k.startswith("compound") or int(k.split(".")[1]) < 4
    }
    learner = new_learner(base, cfg)
    load_learner_tensors(learner, kept, "golden")
    check_forward(AdaptedBackbone(base, learner), g, "variant_depth5.")


@pytest.mark.shared
def test_golden_checkpoint_refused_for_other_shapes(golden):
    _, base = golden
    with pytest.raises(AdaptError, match="n_ctx 2, the model is configured for n_ctx 4"):
        load_official(GOLDEN_CKPT, base, PromptConfig(n_ctx=4))
    with pytest.raises(AdaptError, match="method maple, the model is configured for method coop"):
        load_official(GOLDEN_CKPT, base, PromptConfig(method="coop"))
    with pytest.raises(AdaptError, match="prompt depth 9 .* depth 3"):
        load_official(GOLDEN_CKPT, base, PromptConfig(depth=3))


@pytest.mark.shared
def test_golden_tokenizer_ids(golden):
    g, base = golden
    ids = base.tokenizer([f"a photo of a {n}." for n in GOLDEN_NAMES])["input_ids"]
    for c, row in enumerate(ids):
        want = g["tokenized_prompts"][c]
        assert row == want[: int(want.argmax()) + 1].tolist()


@pytest.fixture(scope="module")
def tiny_base():
    if not CLIP_TOKENIZER.is_dir():
        pytest.skip(f"CLIP tokenizer not found at {CLIP_TOKENIZER}")
    from transformers import CLIPTokenizerFast

    model, processor = tiny_clip(
        width=32, n_layers=3, heads=2, image_size=32, patch_size=8, projection_dim=16
    )
    return backbone_from_hf(model, processor, CLIPTokenizerFast.from_pretrained(CLIP_TOKENIZER))


def randomised(adapted: AdaptedBackbone, seed: int = 1) -> AdaptedBackbone:
    """``adapted`` with every prompt tensor redrawn (trained-looking, far from the init)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapted.learner.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return adapted


def logits(backbone, pixels: torch.Tensor, names=NAMES) -> torch.Tensor:
    with torch.no_grad():
        image = backbone.forward_from(backbone.encode(pixels, -1), -1)
        text = zero_shot_classifier(
            backbone, names, getattr(backbone, "templates", ("a photo of a {name}.",))
        )
    return backbone.logit_scale * image @ text.T


def pixels(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def test_layout_marks_prompt_tokens(tiny_base):
    maple = adapt(tiny_base, PromptConfig(depth=3))
    layout = maple.token_layout
    assert layout.n_tokens == 1 + 16 + 2 and layout.n_prompts == 2
    assert list(layout.prompt_indices) == [17, 18]
    assert layout.positions("all") == slice(0, 17)
    assert layout.positions("all_with_prompts") == slice(0, 19)
    assert TokenLayout.from_dict(layout.to_dict()) == layout
    assert "n_prompts" not in tiny_base.token_layout.to_dict()
    acts = maple.encode(pixels(), 1)
    assert acts.shape == (3, 19, 32)
    assert adapt(tiny_base, PromptConfig(method="coop")).token_layout == tiny_base.token_layout


def test_prompts_change_outputs_and_forward_from_resumes(tiny_base):
    maple = randomised(adapt(tiny_base, PromptConfig(depth=3)))
    x = pixels()
    with torch.no_grad():
        full = maple.forward_from(maple.encode(x, 0), 0)
        for layer in (1, 2):
            assert torch.allclose(
                maple.forward_from(maple.encode(x, layer), layer), full, atol=1e-6
            )
        base_image = tiny_base.forward_from(tiny_base.encode(x, -1), -1)
        assert (full - base_image).abs().max() > 1e-2
        prompts = ["a photo of a cat."]
        assert (maple.encode_text(prompts) - tiny_base.encode_text(prompts)).abs().max() > 1e-2
    coop = randomised(adapt(tiny_base, PromptConfig(method="coop")))
    with torch.no_grad():
        assert torch.equal(coop.forward_from(coop.encode(x, -1), -1), base_image)
        assert (coop.encode_text(prompts) - tiny_base.encode_text(prompts)).abs().max() > 1e-2


def test_init_prompts_reproduce_the_base_text_features(tiny_base):
    """At init the context is the embedding of "a photo" and CoOp changes nothing else, so the
    class prompt equals the base model's "a photo of a {name}." (positions are the same)."""
    coop = adapt(tiny_base, PromptConfig(method="coop"))
    with torch.no_grad():
        prompts = [f"a photo of a {n}." for n in NAMES]
        assert torch.allclose(coop.encode_text(prompts), tiny_base.encode_text(prompts), atol=1e-6)
    assert adapt(tiny_base, PromptConfig(n_ctx=5, depth=2)).templates == ("X X X X X {name}.",)


def test_depth_past_the_towers_and_short_prompts_refused(tiny_base):
    with pytest.raises(AdaptError, match="depth 4 exceeds"):
        adapt(tiny_base, PromptConfig(depth=4))
    maple = adapt(tiny_base, PromptConfig(n_ctx=4, depth=2))
    with pytest.raises(AdaptError, match="fewer than n_ctx=4 tokens"):
        maple.encode_text(["a cat"])


def official_file(path: Path, adapted: AdaptedBackbone, depth_keys: int | None = None) -> Path:
    """A checkpoint as the original trainer writes it: CustomCLIP state (prompt learner, rebuilt
    buffers, frozen encoders, logit_scale), SGD state, a pickled cosine scheduler object."""
    state = collections.OrderedDict()
    for key, value in adapted.learner.state_dict().items():
        if (
            key.startswith("compound")
            and depth_keys is not None
            and int(key.split(".")[1]) >= depth_keys
        ):
            continue
        state[f"prompt_learner.{key}"] = value.half() if key.startswith(("ctx", "proj")) else value
    state["prompt_learner.token_prefix"] = torch.zeros(4, 1, 32).half()
    state["prompt_learner.token_suffix"] = torch.zeros(4, 74, 32).half()
    state["image_encoder.conv1.weight"] = torch.zeros(32, 3, 8, 8).half()
    state["text_encoder.ln_final.weight"] = torch.ones(32)
    state["logit_scale"] = torch.tensor(4.6)
    params = [torch.nn.Parameter(v.float()) for v in adapted.learner.state_dict().values()]
    opt = torch.optim.SGD(params, lr=0.0035, momentum=0.9)
    sum(p.sum() for p in params).backward()
    opt.step()
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 5)
    torch.save(
        {
            "state_dict": state,
            "epoch": 5,
            "optimizer": opt.state_dict(),
            "scheduler": {"successor": sched, "last_epoch": 5},
            "val_result": None,
        },
        path,
    )
    return path


def test_official_layout_loads_strictly_and_round_trips(tiny_base, tmp_path):
    maple = randomised(adapt(tiny_base, PromptConfig(depth=3)))
    path = official_file(tmp_path / "model.pth.tar-5", maple)
    loaded = load_official(path, tiny_base, PromptConfig(depth=3))
    want = logits(loaded, pixels())
    assert (want - logits(maple, pixels())).abs().max() < 1e-2  # fp16 ctx / proj in the file
    save_adapter(loaded, tmp_path / "ours", base_model="in-memory")
    again = load_adapter(tmp_path / "ours", base=tiny_base)
    assert torch.equal(logits(again, pixels()), want)
    export_official(again, tmp_path / "export.pth.tar-1", epoch=1)
    exported = load_official(tmp_path / "export.pth.tar-1", tiny_base, PromptConfig(depth=3))
    assert torch.equal(logits(exported, pixels()), want)
    assert torch.load(tmp_path / "export.pth.tar-1", weights_only=True)["epoch"] == 1


def test_official_with_fewer_deep_prompts_refused(tiny_base, tmp_path):
    maple = adapt(tiny_base, PromptConfig(depth=3))
    path = official_file(tmp_path / "model.pth.tar-1", maple, depth_keys=1)
    with pytest.raises(AdaptError, match="prompt depth 2 .* configured for depth 3"):
        load_official(path, tiny_base, PromptConfig(depth=3))


def test_coop_official_layout(tiny_base, tmp_path):
    coop = randomised(adapt(tiny_base, PromptConfig(method="coop")))
    export_official(coop, tmp_path / "model.pth.tar-50", epoch=50)
    assert set(torch.load(tmp_path / "model.pth.tar-50", weights_only=True)["state_dict"]) == {
        "ctx"
    }
    loaded = load_official(tmp_path / "model.pth.tar-50", tiny_base, PromptConfig(method="coop"))
    assert torch.equal(logits(loaded, pixels()), logits(coop, pixels()))


class Exploit:
    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_pickle_carrying_code_refused_and_not_executed(tmp_path):
    marker = tmp_path / "executed"
    exploit = Exploit()
    exploit.marker = marker
    path = tmp_path / "model.pth.tar-1"
    torch.save(
        {"state_dict": {"prompt_learner.ctx": torch.zeros(2, 4)}, "scheduler": exploit}, path
    )
    with pytest.raises(AdaptError, match="refused global"):
        read_official_state(path)
    assert not marker.exists()
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"state_dict": exploit}))
    with pytest.raises(AdaptError, match="refused global"):
        read_official_state(plain)
    assert not marker.exists()
    assert zipfile.is_zipfile(path)


def test_our_folder_loads_through_load_backbone(tiny_base, tmp_path):
    if not CLIP_TOKENIZER.is_dir():
        pytest.skip("no tokenizer")
    base_dir = tmp_path / "base"
    tiny_base.model.save_pretrained(base_dir)
    tiny_base.image_processor.save_pretrained(base_dir)
    base = load_backbone(base_dir, tokenizer=CLIP_TOKENIZER)
    maple = randomised(adapt(base, PromptConfig(depth=2)))
    save_adapter(
        maple, tmp_path / "adapter", base_model=str(base_dir), tokenizer=str(CLIP_TOKENIZER)
    )
    loaded = load_backbone(tmp_path / "adapter")
    assert isinstance(loaded, AdaptedBackbone)
    assert loaded.identity()["adapter"] == maple.identity()["adapter"]
    assert torch.equal(logits(loaded, pixels()), logits(maple, pixels()))
    (tmp_path / "adapter" / "adapter.safetensors").write_bytes(b"garbage")
    with pytest.raises(AdaptError, match="not a readable tensor file"):
        load_backbone(tmp_path / "adapter")


def test_extract_and_token_batches_accept_an_adapter_folder(tiny_base, tmp_path):
    """An adapter folder is a model for extract: the store holds the prompt tokens, marked in its
    layout, and token mode ``all`` leaves them out (``all_with_prompts`` keeps them)."""
    from patchsae.data import DataConfig
    from patchsae.data.images import open_images
    from patchsae.data.loaders import token_batches
    from patchsae.data.store import ActivationStore
    from patchsae.extract import ExtractConfig, extract
    from tiny_atlas import image_folder

    tiny_base.model.save_pretrained(tmp_path / "base")
    tiny_base.image_processor.save_pretrained(tmp_path / "base")
    base = load_backbone(tmp_path / "base", tokenizer=CLIP_TOKENIZER)
    maple = randomised(adapt(base, PromptConfig(depth=2)))
    folder = save_adapter(
        maple,
        tmp_path / "adapter",
        base_model=str(tmp_path / "base"),
        tokenizer=str(CLIP_TOKENIZER),
    )
    images = image_folder(tmp_path / "images", n_per_class=2)
    store = ActivationStore.open(
        extract(
            ExtractConfig(
                model=str(folder),
                data=DataConfig(str(images)),
                layers=(1,),
                out=str(tmp_path / "store"),
                batch_size=4,
                shard_images=4,
                dtype="fp32",
                num_workers=0,
            )
        )
    )
    assert store.token_layout == maple.token_layout and store.token_layout.n_prompts == 2
    acts = torch.from_numpy(np.array(store.images(0, 4)))
    source = open_images(DataConfig(str(images)))
    pixels = maple.preprocess([source.load(i) for i in range(4)])
    with torch.no_grad():
        assert torch.allclose(acts, maple.encode(pixels, 1), atol=1e-5)
    kept = next(token_batches(store, 4 * 17, seed=None, epochs=1))
    assert torch.equal(kept, acts[:, :17].reshape(-1, 32))
    everything = next(token_batches(store, 4 * 19, seed=None, epochs=1, tokens="all_with_prompts"))
    assert torch.equal(everything, acts.reshape(-1, 32))
