"""Tests for patchsae.backbones on tiny models built in code, plus the real DINOv2 asset."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoModel,
    BitImageProcessor,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    SiglipConfig,
    SiglipImageProcessor,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
    ViTConfig,
    ViTImageProcessor,
    ViTModel,
)

from assets import CLIP_TOKENIZER, DINOV2, FASHION_MNIST
from patchsae.backbones import (
    Backbone,
    BackboneError,
    TokenLayout,
    backbone_from_hf,
    folder_hash,
    load_backbone,
)
from patchsae.data.images import load_rgb

FASHION = FASHION_MNIST / "test"

IMAGE, PATCH, LAYERS = 32, 8, 3
VISION = dict(
    hidden_size=64,
    num_hidden_layers=LAYERS,
    num_attention_heads=4,
    intermediate_size=128,
    image_size=IMAGE,
    patch_size=PATCH,
)
TEXT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
FAMILIES = ["clip", "dinov2", "dinov2_registers", "vit", "vit_no_pooler", "siglip_vision", "siglip"]


def make_model(kind: str, image: int = IMAGE) -> tuple[torch.nn.Module, object]:
    """A tiny randomly initialised HF model of ``kind`` and an in-memory processor."""
    torch.manual_seed(0)
    hw = {"height": image, "width": image}
    crop = dict(size={"shortest_edge": image}, crop_size=hw)
    if kind == "clip":
        config = CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=32)
        return CLIPModel(config), CLIPImageProcessor(**crop)
    if kind == "dinov2":
        return Dinov2Model(Dinov2Config(**VISION)), BitImageProcessor(**crop)
    if kind == "dinov2_registers":
        config = Dinov2WithRegistersConfig(**VISION, num_register_tokens=4)
        return Dinov2WithRegistersModel(config), BitImageProcessor(**crop)
    if kind == "vit":
        return ViTModel(ViTConfig(**VISION)), ViTImageProcessor(size=hw)
    if kind == "vit_no_pooler":
        return ViTModel(ViTConfig(**VISION), add_pooling_layer=False), ViTImageProcessor(size=hw)
    if kind == "siglip_vision":
        return SiglipVisionModel(SiglipVisionConfig(**VISION)), SiglipImageProcessor(size=hw)
    if kind == "siglip":
        config = SiglipConfig(text_config=TEXT, vision_config=VISION)
        return SiglipModel(config), SiglipImageProcessor(size=hw)
    raise AssertionError(kind)


def vision_tower(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose forward gives the HF reference hidden states."""
    return model.vision_model if isinstance(model, (CLIPModel, SiglipModel)) else model


def reference_output(model: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """What the full HF forward gives for the backbone's head."""
    if isinstance(model, CLIPModel):
        input_ids = torch.tensor([[49406, 320, 49407]])
        return model(input_ids=input_ids, pixel_values=pixels).image_embeds
    if isinstance(model, SiglipModel):
        return model.get_image_features(pixel_values=pixels).pooler_output
    out = model(pixel_values=pixels)
    return out.last_hidden_state[:, 0] if out.pooler_output is None else out.pooler_output


def random_images(n: int, seed: int = 0, size: tuple[int, int] = (40, 36)) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        for _ in range(n)
    ]


@pytest.fixture(scope="module", params=FAMILIES)
def family_case(request) -> tuple[str, torch.nn.Module, Backbone, torch.Tensor]:
    model, processor = make_model(request.param)
    backbone = backbone_from_hf(model, processor, name=request.param)
    pixels = backbone.preprocess(random_images(2))
    return request.param, model, backbone, pixels


def record_calls(modules: dict[str, torch.nn.Module]) -> tuple[list[str], list]:
    """Forward hooks appending each module's name to a list whenever it runs."""
    calls: list[str] = []
    handles = [
        module.register_forward_hook(lambda *_, name=name: calls.append(name))
        for name, module in modules.items()
    ]
    return calls, handles


def later_modules(
    model: torch.nn.Module, blocks: torch.nn.ModuleList
) -> dict[str, torch.nn.Module]:
    """Every block, plus the final norms, heads and text tower of ``model`` where present."""
    named = {f"block{i}": block for i, block in enumerate(blocks)}
    tower = vision_tower(model)
    for attr in ("post_layernorm", "layernorm", "pooler", "head"):
        module = getattr(tower, attr, None)
        if isinstance(module, torch.nn.Module):
            named[attr] = module
    for attr in ("text_model", "visual_projection", "text_projection"):
        module = getattr(model, attr, None)
        if isinstance(module, torch.nn.Module):
            named[attr] = module
    return named


def test_encode_equals_hf_hidden_states(family_case):
    _, model, backbone, pixels = family_case
    with torch.inference_mode():
        hidden = vision_tower(model)(pixel_values=pixels, output_hidden_states=True).hidden_states
        assert len(hidden) == LAYERS + 1
        for layer in (0, 1, 2, -1, -3):
            acts = backbone.encode(pixels, layer)
            assert acts.shape == (2, backbone.token_layout.n_tokens, backbone.d_model)
            torch.testing.assert_close(
                acts, hidden[backbone.resolve_layer(layer) + 1], rtol=0, atol=0
            )


def test_encode_stops_after_the_block(family_case):
    _, model, backbone, pixels = family_case
    calls, handles = record_calls(later_modules(model, backbone._parts.blocks))
    try:
        with torch.inference_mode():
            backbone.encode(pixels, 1)
            assert calls == ["block0", "block1"]
            calls.clear()
            backbone.encode_layers(pixels, [0, -3])
            assert calls == ["block0"]
            calls.clear()
            zeros = torch.zeros(1, backbone.token_layout.n_tokens, 64)
            backbone.forward_from(zeros, 1)
            # CLIP's last block runs for the CLS query only, through its submodules
            cls_only = backbone._parts.cls_block(backbone._parts.blocks[2], zeros) is not None
            first = "post_layernorm" if cls_only else "block2"
            assert calls[0] == first and "block0" not in calls and "block1" not in calls
            assert "text_model" not in calls
    finally:
        for handle in handles:
            handle.remove()


def test_forward_from_reproduces_the_full_forward(family_case):
    kind, model, backbone, pixels = family_case
    with torch.inference_mode():
        expected = reference_output(model, pixels)
        for layer in (0, 1, -1):
            out = backbone.forward_from(backbone.encode(pixels, layer), layer)
            assert out.shape == expected.shape
            torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    if kind == "clip":
        torch.testing.assert_close(out.norm(dim=-1), torch.ones(2))


def test_forward_from_sees_edits_and_carries_gradients(family_case):
    _, _, backbone, pixels = family_case
    acts = backbone.encode(pixels, 0)
    assert acts.requires_grad, "encode must not disable autograd"
    edited = acts.detach().clone().requires_grad_(True)
    out = backbone.forward_from(edited, 0)
    # A weighted sum: a plain sum of a LayerNorm output has zero gradient by construction.
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    (out * weights).sum().backward()
    assert edited.grad is not None and edited.grad.abs().sum() > 0
    with torch.inference_mode():
        base = backbone.forward_from(acts, 0)
        zeroed = acts.clone()
        zeroed[:, backbone.token_layout.patch_start :] = 0
        assert not torch.allclose(backbone.forward_from(zeroed, 0), base)


def test_encode_layers_matches_separate_encodes(family_case):
    _, _, backbone, pixels = family_case
    with torch.inference_mode():
        out = backbone.encode_layers(pixels, [2, 0, -2])
        assert list(out) == [2, 0, -2]
        for layer, acts in out.items():
            torch.testing.assert_close(acts, backbone.encode(pixels, layer), rtol=0, atol=0)


def test_token_layout_matches_the_sequence(family_case):
    kind, model, backbone, pixels = family_case
    layout = backbone.token_layout
    grid = IMAGE // PATCH
    registers = 4 if kind == "dinov2_registers" else 0
    has_cls = not kind.startswith("siglip")
    assert layout.grid == (grid, grid)
    assert layout.n_tokens == int(has_cls) + registers + grid * grid
    assert layout.cls_index == (0 if has_cls else None)
    assert layout.patch_start == int(has_cls) + registers
    assert layout.extra_indices == tuple(range(1, 1 + registers))
    assert list(layout.patch_indices) == list(range(layout.patch_start, layout.n_tokens))
    assert pixels.shape == (2, 3, IMAGE, IMAGE) and pixels.dtype == torch.float32
    with torch.inference_mode():
        embeddings = vision_tower(model)(pixel_values=pixels, output_hidden_states=True)
    assert embeddings.hidden_states[0].shape[1] == layout.n_tokens


def test_dinov2_registers_sit_after_cls():
    model, processor = make_model("dinov2_registers")
    backbone = backbone_from_hf(model, processor)
    with torch.inference_mode():
        embedded = backbone._parts.embed(backbone.preprocess(random_images(1)))
    registers = model.embeddings.register_tokens[0]
    torch.testing.assert_close(embedded[0, list(backbone.token_layout.extra_indices)], registers)
    assert not torch.allclose(embedded[0, backbone.token_layout.patch_start], registers[0])


def test_resolve_layer_and_errors():
    model, processor = make_model("vit")
    backbone = backbone_from_hf(model, processor)
    assert [backbone.resolve_layer(i) for i in (0, 2, -1, -3)] == [0, 2, 2, 0]
    assert backbone.resolve_layer(np.int64(1)) == 1
    with pytest.raises(
        BackboneError, match=r"layer 3 is out of range for a 3-block model: use -3..2"
    ):
        backbone.resolve_layer(3)
    with pytest.raises(BackboneError, match=r"layer -4 is out of range"):
        backbone.encode(torch.zeros(1, 3, IMAGE, IMAGE), -4)
    for bad in (1.5, "1", True):
        with pytest.raises(BackboneError, match="integer block index"):
            backbone.resolve_layer(bad)
    with pytest.raises(BackboneError, match="no layers"):
        backbone.encode_layers(torch.zeros(1, 3, IMAGE, IMAGE), [])
    with pytest.raises(BackboneError, match=r"\(batch, channels, height, width\)"):
        backbone.encode(torch.zeros(3, IMAGE, IMAGE), 0)
    with pytest.raises(BackboneError, match="1 channels"):
        backbone.encode(torch.zeros(1, 1, IMAGE, IMAGE), 0)
    with pytest.raises(BackboneError, match=r"\(batch, tokens, 64\)"):
        backbone.forward_from(torch.zeros(1, 17, 32), 0)
    with pytest.raises(BackboneError, match="needs a clip backbone"):
        backbone.encode_text(["a photo"])
    with pytest.raises(BackboneError, match="needs a clip backbone"):
        _ = backbone.logit_scale
    with pytest.raises(BackboneError, match="no images"):
        backbone.preprocess([])


def test_siglip_without_head_explains():
    config = SiglipVisionConfig(**VISION, vision_use_head=False)
    backbone = backbone_from_hf(SiglipVisionModel(config), SiglipImageProcessor())
    acts = torch.zeros(1, backbone.token_layout.n_tokens, 64)
    with pytest.raises(BackboneError, match="no pooling head"):
        backbone.forward_from(acts, -1)


def test_interpolated_position_embeddings():
    """A processor whose output is larger than the config's image_size: HF interpolates."""
    for kind in ("clip", "dinov2", "vit", "siglip_vision"):
        model, _ = make_model(kind)
        processor = make_model(kind, image=48)[1]
        backbone = backbone_from_hf(model, processor)
        assert backbone.token_layout.grid == (6, 6)
        pixels = backbone.preprocess(random_images(2, seed=1))
        assert pixels.shape[-2:] == (48, 48)
        kwargs = {} if kind == "dinov2" else {"interpolate_pos_encoding": True}
        with torch.inference_mode():
            hidden = vision_tower(model)(
                pixel_values=pixels, output_hidden_states=True, **kwargs
            ).hidden_states
            acts = backbone.encode(pixels, 1)
        assert acts.shape[1] == backbone.token_layout.n_tokens
        torch.testing.assert_close(acts, hidden[2], rtol=0, atol=0)


def test_preprocessor_is_picklable_and_converts_grayscale():
    model, processor = make_model("vit")
    backbone = backbone_from_hf(model, processor)
    gray = [Image.fromarray(np.full((28, 28), 200, dtype=np.uint8), mode="L")]
    clone = pickle.loads(pickle.dumps(backbone.preprocessor))
    pixels = clone(gray)
    torch.testing.assert_close(pixels, backbone.preprocess(gray))
    torch.testing.assert_close(pixels, backbone.preprocess([gray[0].convert("RGB")]))
    assert pixels.shape == (1, 3, IMAGE, IMAGE)
    # the processor's own normalisation is applied: grey 200 maps to (200/255 - mean) / std
    mean, std = processor.image_mean, processor.image_std
    expected = torch.tensor([(200 / 255 - m) / s for m, s in zip(mean, std, strict=True)])
    torch.testing.assert_close(pixels[0, :, 0, 0], expected, rtol=0, atol=1e-5)


def test_preprocessor_runs_in_dataloader_workers():
    model, processor = make_model("vit")
    backbone = backbone_from_hf(model, processor)
    images = random_images(4, seed=3)

    loader = torch.utils.data.DataLoader(
        list(range(4)),
        batch_size=2,
        num_workers=1,
        collate_fn=_Collate(images, backbone.preprocessor),
    )
    batches = torch.cat(list(loader))
    torch.testing.assert_close(batches, backbone.preprocess(images))


class _Collate:
    def __init__(self, images, preprocessor):
        self.images, self.preprocessor = images, preprocessor

    def __call__(self, ids):
        return self.preprocessor([self.images[i] for i in ids])


def test_token_layout_round_trip_and_validation():
    layout = TokenLayout(n_tokens=21, cls_index=0, patch_start=5, grid=(4, 4), extra_indices=(1, 2))
    assert TokenLayout.from_dict(layout.to_dict()) == layout
    assert layout.n_patches == 16 and layout.patch_indices == range(5, 21)
    no_cls = TokenLayout(n_tokens=16, cls_index=None, patch_start=0, grid=(4, 4), extra_indices=())
    assert TokenLayout.from_dict(no_cls.to_dict()) == no_cls
    with pytest.raises(BackboneError, match="exceeds n_tokens"):
        TokenLayout(n_tokens=16, cls_index=0, patch_start=1, grid=(4, 4), extra_indices=())
    with pytest.raises(BackboneError, match="non-patch position"):
        TokenLayout(n_tokens=17, cls_index=3, patch_start=1, grid=(4, 4), extra_indices=())
    with pytest.raises(BackboneError, match="keys"):
        TokenLayout.from_dict({"n_tokens": 17, "grid": [4, 4]})
    prompted = TokenLayout(n_tokens=19, cls_index=0, patch_start=1, grid=(4, 4), n_prompts=2)
    assert TokenLayout.from_dict(prompted.to_dict()) == prompted
    with pytest.raises(BackboneError, match="exceeds n_tokens 19 less the 3 prompt tokens"):
        TokenLayout(n_tokens=19, cls_index=0, patch_start=1, grid=(4, 4), n_prompts=3)
    with pytest.raises(BackboneError, match="non-patch position"):
        TokenLayout(n_tokens=19, cls_index=18, patch_start=1, grid=(4, 4), n_prompts=2)


def test_token_layout_positions_by_mode():
    layout = TokenLayout(n_tokens=21, cls_index=0, patch_start=5, grid=(4, 4), extra_indices=(1, 2))
    seq = list(range(21))
    assert seq[layout.positions("all")] == seq
    assert seq[layout.positions("cls")] == [0]
    assert seq[layout.positions("patches")] == list(range(5, 21))
    no_cls = TokenLayout(n_tokens=16, cls_index=None, patch_start=0, grid=(4, 4))
    with pytest.raises(BackboneError, match="no CLS token"):
        no_cls.positions("cls")
    with pytest.raises(BackboneError, match="tokens must be"):
        layout.positions("registers")


def test_unknown_model_type_and_bad_paths(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(BackboneError, match=r"'bert' is not supported.*clip.*dinov2.*siglip.*vit"):
        load_backbone(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BackboneError, match="no config.json"):
        load_backbone(tmp_path / "empty")
    with pytest.raises(BackboneError, match="is a file, not a model folder"):
        load_backbone(tmp_path / "config.json")
    with pytest.raises(BackboneError, match="does not exist"):
        load_backbone(str(tmp_path / "missing"))
    model, processor = make_model("vit")
    model.config.model_type = "bert"
    with pytest.raises(BackboneError, match="model type 'bert' is not supported"):
        backbone_from_hf(model, processor)


def save(kind: str, folder: Path) -> tuple[torch.nn.Module, object]:
    model, processor = make_model(kind)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor


def test_load_folder_round_trip_clip(tmp_path):
    model, _ = save("clip", tmp_path / "clip")
    tokenizer = CLIP_TOKENIZER if CLIP_TOKENIZER.is_dir() else None
    backbone = load_backbone(tmp_path / "clip", tokenizer=tokenizer)
    identity = backbone.identity()
    assert identity["family"] == "clip" and identity["revision"] is None
    assert identity["name"] == str(tmp_path / "clip")
    assert len(identity["folder_hash"]) == 64
    assert backbone.n_layers == LAYERS and backbone.d_model == 64
    assert backbone.logit_scale == pytest.approx(float(model.logit_scale.detach().exp()))
    pixels = backbone.preprocess(random_images(2))
    with torch.inference_mode():
        expected = model.vision_model(pixel_values=pixels, output_hidden_states=True)
        torch.testing.assert_close(backbone.encode(pixels, 1), expected.hidden_states[2])
    if tokenizer is None:
        with pytest.raises(BackboneError, match="no tokenizer"):
            backbone.encode_text(["a photo"])
        return
    prompts = ["a photo of a bag.", "a photo of a much longer ankle boot, seen from the side."]
    tokens = backbone.tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        text = backbone.encode_text(prompts)
        reference = model(**tokens, pixel_values=pixels).text_embeds
    assert text.shape == (2, 32)
    torch.testing.assert_close(text, reference, rtol=0, atol=1e-6)


def test_folder_without_processor_or_tokenizer(tmp_path):
    model, _ = make_model("clip")
    model.save_pretrained(tmp_path / "bare")
    with pytest.raises(BackboneError, match="preprocessor_config.json"):
        load_backbone(tmp_path / "bare")
    CLIPImageProcessor().save_pretrained(tmp_path / "bare")
    backbone = load_backbone(tmp_path / "bare")
    assert backbone.tokenizer is None
    with pytest.raises(BackboneError, match="no tokenizer"):
        backbone.encode_text(["a photo"])
    with pytest.raises(BackboneError, match="cannot load a tokenizer"):
        load_backbone(tmp_path / "bare", tokenizer=tmp_path / "bare")


def test_folder_hash_tracks_config_and_weights_only(tmp_path):
    save("dinov2_registers", tmp_path / "a")
    backbone = load_backbone(tmp_path / "a")
    assert backbone.family == "dinov2" and backbone.token_layout.extra_indices == (1, 2, 3, 4)
    first = backbone.identity()["folder_hash"]
    assert first == folder_hash(tmp_path / "a")
    (tmp_path / "a" / "README.md").write_text("notes")
    assert folder_hash(tmp_path / "a") == first
    weights = tmp_path / "a" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert folder_hash(tmp_path / "a") != first


def test_folder_name_is_resolved_and_hash_computed_once_on_demand(tmp_path, monkeypatch):
    import patchsae.backbones.core as core

    save("vit", tmp_path / "a")
    calls = []
    monkeypatch.setattr(core, "folder_hash", lambda folder: calls.append(folder) or "h" * 64)
    monkeypatch.chdir(tmp_path)
    backbone = load_backbone("./a/")
    assert backbone.name == str((tmp_path / "a").resolve())
    assert calls == []
    assert backbone.identity()["folder_hash"] == "h" * 64
    assert backbone.identity()["name"] == backbone.name
    assert calls == [(tmp_path / "a").resolve()]


def test_load_vit_without_pooler_weights(tmp_path):
    model, _ = save("vit_no_pooler", tmp_path / "vit")
    backbone = load_backbone(tmp_path / "vit")
    assert backbone.model.pooler is None
    pixels = backbone.preprocess(random_images(2))
    with torch.inference_mode():
        out = backbone.forward_from(backbone.encode(pixels, 0), 0)
        torch.testing.assert_close(out, model(pixel_values=pixels).last_hidden_state[:, 0])
    half = load_backbone(tmp_path / "vit", dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.model.layernorm.weight.dtype == torch.bfloat16
    with torch.inference_mode():
        acts = half.encode(pixels, 0)
        assert acts.dtype == torch.bfloat16
        torch.testing.assert_close(acts.float(), backbone.encode(pixels, 0), rtol=0.05, atol=0.05)
        assert half.forward_from(acts, 0).dtype == torch.bfloat16


@pytest.mark.shared
@pytest.mark.skipif(not DINOV2.is_dir() or not FASHION.is_dir(), reason="needs ../shared assets")
def test_real_dinov2_small():
    backbone = load_backbone(DINOV2)
    layout = backbone.token_layout
    assert backbone.family == "dinov2" and backbone.n_layers == 12 and backbone.d_model == 384
    assert (layout.n_tokens, layout.grid, layout.cls_index, layout.patch_start) == (
        257,
        (16, 16),
        0,
        1,
    )
    assert backbone.identity()["folder_hash"] == folder_hash(DINOV2)
    files = [sorted(FASHION.glob(f"{label}_*/*.png"))[0] for label in (0, 9)]
    images = [Image.open(f) for f in files]
    assert images[0].mode == "L"
    pixels = backbone.preprocess(images)
    assert pixels.shape == (2, 3, 224, 224)
    model = AutoModel.from_pretrained(DINOV2, local_files_only=True).eval()
    with torch.inference_mode():
        out = model(pixel_values=pixels, output_hidden_states=True)
        acts = backbone.encode_layers(pixels, [3, -1])
        torch.testing.assert_close(acts[3], out.hidden_states[4], rtol=0, atol=0)
        torch.testing.assert_close(acts[-1], out.hidden_states[12], rtol=0, atol=0)
        pooled = backbone.forward_from(acts[3], 3)
        torch.testing.assert_close(pooled, out.pooler_output, rtol=0, atol=1e-5)


def test_load_by_hub_id_from_the_offline_cache(tmp_path, monkeypatch):
    """A hub id resolves through the local HF cache; identity records the snapshot commit."""
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--tiny-dinov2"
    model, _ = save("dinov2", repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    backbone = load_backbone("org/tiny-dinov2")
    assert backbone.identity() == {
        "name": "org/tiny-dinov2",
        "family": "dinov2",
        "revision": commit,
        "folder_hash": None,
    }
    pixels = backbone.preprocess(random_images(1))
    with torch.inference_mode():
        expected = model(pixel_values=pixels, output_hidden_states=True).hidden_states[1]
        torch.testing.assert_close(backbone.encode(pixels, 0), expected, rtol=0, atol=0)
    with pytest.raises(BackboneError, match=r"cannot load 'org/absent'.*pass a local folder"):
        load_backbone("org/absent")


def test_preprocess_converts_like_load_rgb():
    """Transparent and 16-bit images give the same pixels with or without ``load_rgb`` first."""
    model, processor = make_model("vit")
    backbone = backbone_from_hf(model, processor)
    rgba = np.zeros((20, 20, 4), dtype=np.uint8)
    rgba[..., 0] = 90
    rgba[:10, :, 3] = 255
    transparent = Image.fromarray(rgba, mode="RGBA")
    deep = Image.fromarray(np.full((20, 20), 65535 // 2, dtype=np.uint16))
    assert deep.mode.startswith("I;16")
    for image in (transparent, deep):
        direct = backbone.preprocess([image])
        via_loader = backbone.preprocess([load_rgb(image)])
        torch.testing.assert_close(direct, via_loader, rtol=0, atol=0)
    mean, std = processor.image_mean, processor.image_std
    # fully transparent pixels are white, not the black stored under them
    white = torch.tensor([(1 - m) / s for m, s in zip(mean, std, strict=True)])
    torch.testing.assert_close(
        backbone.preprocess([transparent])[0, :, -1, 0], white, rtol=0, atol=1e-5
    )
    # 16-bit 32767 is mid-grey 127, not clipped to 255 by convert("RGB")
    grey = torch.tensor([(127 / 255 - m) / s for m, s in zip(mean, std, strict=True)])
    torch.testing.assert_close(backbone.preprocess([deep])[0, :, 0, 0], grey, rtol=0, atol=1e-5)


def test_load_backbone_checks_the_device_first(tmp_path, monkeypatch):
    save("vit", tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BackboneError, match=r"CUDA is not available.*--device cpu"):
        load_backbone(tmp_path, device="cuda")
    with pytest.raises(BackboneError, match=r"'gpu' is not a torch device"):
        load_backbone(tmp_path, device="gpu")
    # checked before the model is looked up: a bad device is reported even for a missing folder
    with pytest.raises(BackboneError, match="CUDA is not available"):
        load_backbone(tmp_path / "missing", device="cuda:0")
    assert load_backbone(tmp_path, device="cpu").device == torch.device("cpu")
