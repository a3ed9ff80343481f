"""Downstream fidelity of an SAE spliced into a CLIP backbone (PatchSAE Table 2).

Zero-shot classification with class-name prompts, run three ways from the activations at one
layer: (a) original activations, (b) every token replaced by its SAE reconstruction
``decode(encode(x))``, (c) every token set to zero. The cross-entropy of
``logit_scale * image_emb @ text_emb.T`` against the labels gives
``fraction_recovered = (CE_zero - CE_spliced) / (CE_zero - CE_orig)``.

``FidelityConfig`` says which labelled images to score and how; ``FidelityScorer`` resolves the
backbone, checks the images once and scores any number of SAEs on the same images in the same
order (``patchsae evaluate`` and the trainer's evaluations both use it).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
from tqdm import tqdm

from patchsae.atomic import write_with
from patchsae.backbones import load_backbone
from patchsae.config import ConfigError
from patchsae.data.images import BadRecord, DataConfig, image_batches, open_images, shuffled_order

if TYPE_CHECKING:
    from patchsae.backbones import Backbone
    from patchsae.data.store import ActivationStore
    from patchsae.sae import SAE

DEFAULT_TEMPLATES = ("a photo of a {name}.",)
# The 80 prompt templates of CLIP's ImageNet zero-shot evaluation (Radford et al. 2021), in the
# order of its notebook; PatchSAE's classification averages the text embeddings over all of them.
CLIP_IMAGENET_TEMPLATES = (
    "a bad photo of a {name}.",
    "a photo of many {name}.",
    "a sculpture of a {name}.",
    "a photo of the hard to see {name}.",
    "a low resolution photo of the {name}.",
    "a rendering of a {name}.",
    "graffiti of a {name}.",
    "a bad photo of the {name}.",
    "a cropped photo of the {name}.",
    "a tattoo of a {name}.",
    "the embroidered {name}.",
    "a photo of a hard to see {name}.",
    "a bright photo of a {name}.",
    "a photo of a clean {name}.",
    "a photo of a dirty {name}.",
    "a dark photo of the {name}.",
    "a drawing of a {name}.",
    "a photo of my {name}.",
    "the plastic {name}.",
    "a photo of the cool {name}.",
    "a close-up photo of a {name}.",
    "a black and white photo of the {name}.",
    "a painting of the {name}.",
    "a painting of a {name}.",
    "a pixelated photo of the {name}.",
    "a sculpture of the {name}.",
    "a bright photo of the {name}.",
    "a cropped photo of a {name}.",
    "a plastic {name}.",
    "a photo of the dirty {name}.",
    "a jpeg corrupted photo of a {name}.",
    "a blurry photo of the {name}.",
    "a photo of the {name}.",
    "a good photo of the {name}.",
    "a rendering of the {name}.",
    "a {name} in a video game.",
    "a photo of one {name}.",
    "a doodle of a {name}.",
    "a close-up photo of the {name}.",
    "a photo of a {name}.",
    "the origami {name}.",
    "the {name} in a video game.",
    "a sketch of a {name}.",
    "a doodle of the {name}.",
    "a origami {name}.",
    "a low resolution photo of a {name}.",
    "the toy {name}.",
    "a rendition of the {name}.",
    "a photo of the clean {name}.",
    "a photo of a large {name}.",
    "a rendition of a {name}.",
    "a photo of a nice {name}.",
    "a photo of a weird {name}.",
    "a blurry photo of a {name}.",
    "a cartoon {name}.",
    "art of a {name}.",
    "a sketch of the {name}.",
    "a embroidered {name}.",
    "a pixelated photo of a {name}.",
    "itap of the {name}.",
    "a jpeg corrupted photo of the {name}.",
    "a good photo of a {name}.",
    "a plushie {name}.",
    "a photo of the nice {name}.",
    "a photo of the small {name}.",
    "a photo of the weird {name}.",
    "the cartoon {name}.",
    "art of the {name}.",
    "a drawing of the {name}.",
    "a photo of the large {name}.",
    "a black and white photo of a {name}.",
    "the plushie {name}.",
    "a dark photo of a {name}.",
    "itap of a {name}.",
    "graffiti of the {name}.",
    "a toy {name}.",
    "itap of my {name}.",
    "a photo of a cool {name}.",
    "a photo of a small {name}.",
    "a tattoo of the {name}.",
)
TEXT_CHUNK = 256
VARIANTS = ("original", "spliced", "zero")


class FidelityError(ValueError):
    """The inputs cannot be used for downstream fidelity."""


def build_prompts(class_names: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Prompts in class-major order: (class 0, template 0), (class 0, template 1), ...

    A template holds ``{name}`` (or ``{}``) where the class name goes.
    """
    if not templates:
        raise FidelityError("templates is empty: give at least one, e.g. 'a photo of a {name}.'")
    if not class_names:
        raise FidelityError("class_names is empty: give one human-readable name per label")
    for t in templates:
        if "{name}" not in t and "{}" not in t:
            raise FidelityError(f"template {t!r} has no '{{name}}' placeholder for the class name")
    for name in class_names:
        if not isinstance(name, str) or not name.strip():
            raise FidelityError(
                f"class name {name!r} is not a non-empty string: give human-readable class names"
            )
    return [
        t.replace("{name}", name) if "{name}" in t else t.replace("{}", name)
        for name in class_names
        for t in templates
    ]


def text_cache_key(backbone: Backbone, class_names: Sequence[str], templates: Sequence[str]) -> str:
    """BLAKE2b key of a zero-shot classifier: the backbone's identity (name, revision, folder
    hash, adapter hash where there is one), its tokenizer's name, a hash of its text projection
    weights (models built in code have no folder hash), the class names and the templates."""
    projection = backbone.model.text_projection.weight.detach().float().cpu().contiguous()
    description = {
        "backbone": backbone.identity(),
        "tokenizer": getattr(backbone.tokenizer, "name_or_path", None),
        "text_projection": hashlib.blake2b(projection.numpy().tobytes()).hexdigest(),
        "class_names": list(class_names),
        "templates": list(templates),
    }
    text = json.dumps(description, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=20).hexdigest()


@torch.no_grad()
def zero_shot_classifier(
    backbone: Backbone,
    class_names: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    cache_dir: str | os.PathLike | None = None,
) -> torch.Tensor:
    """(n_classes, proj_dim) text embeddings: template embeddings averaged per class, renormed.

    cache_dir: a folder of ``<text_cache_key>.safetensors`` files; the embeddings are read from
    it when present (float32, on the backbone's device) and written to it (atomically) when not.
    Another model, tokenizer, class list or template list gives another key.
    """
    prompts = build_prompts(class_names, templates)
    if cache_dir is not None:
        path = Path(cache_dir) / f"{text_cache_key(backbone, class_names, templates)}.safetensors"
        if path.is_file():
            try:
                cached = safetensors.torch.load_file(str(path)).get("text")
            except (OSError, safetensors.SafetensorError):
                cached = None
            if cached is not None and cached.ndim == 2 and cached.shape[0] == len(class_names):
                return cached.float().to(backbone.device)
        text = zero_shot_classifier(backbone, class_names, templates)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_with(path, lambda tmp: safetensors.torch.save_file({"text": text.cpu()}, str(tmp)))
        return text
    chunks = [
        backbone.encode_text(prompts[i : i + TEXT_CHUNK])
        for i in range(0, len(prompts), TEXT_CHUNK)
    ]
    text_ckp = torch.cat(chunks).float().reshape(len(class_names), len(templates), -1)
    return F.normalize(text_ckp.mean(1), dim=-1)


def _labels_tensor(labels: torch.Tensor | np.ndarray, n_classes: int, batch: int) -> torch.Tensor:
    labels_b = torch.as_tensor(np.asarray(labels) if not torch.is_tensor(labels) else labels)
    labels_b = labels_b.to(torch.int64).reshape(-1)
    if labels_b.numel() != batch:
        raise FidelityError(f"a batch has {batch} images but {labels_b.numel()} labels")
    if labels_b.numel() and (labels_b.min() < 0 or labels_b.max() >= n_classes):
        raise FidelityError(
            f"labels must lie in [0, {n_classes}) to match the class names; got values from "
            f"{int(labels_b.min())} to {int(labels_b.max())} (-1 marks unlabelled images, "
            "which cannot be scored)"
        )
    return labels_b


def _summary(means: dict[str, float], n_images: int) -> dict[str, float]:
    """``ce_*`` then ``acc_*`` of the variants in ``means`` (in ``VARIANTS`` order), then
    ``fraction_recovered`` (when all three are there; NaN when CE_zero == CE_orig), ``n_images``."""
    keys = [f"{m}_{v}" for m in ("ce", "acc") for v in VARIANTS]
    out = {k: means[k] for k in keys if k in means}
    if all(f"ce_{v}" in means for v in VARIANTS):
        gap = out["ce_zero"] - out["ce_original"]
        out["fraction_recovered"] = (out["ce_zero"] - out["ce_spliced"]) / gap if gap else math.nan
    out["n_images"] = n_images
    return out


@torch.no_grad()
def downstream_fidelity(
    backbone: Backbone,
    sae: SAE,
    layer: int,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor | np.ndarray]],
    class_names: Sequence[str],
    *,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    progress: bool = True,
    text_embeddings: torch.Tensor | None = None,
    variants: Sequence[str] = VARIANTS,
) -> dict[str, float]:
    """Zero-shot cross-entropy and accuracy with original, SAE-spliced and zero-ablated activations.

    batches: (pixel_values (B, 3, H, W), labels (B,)) with labels indexing ``class_names``.
    text_embeddings: (n_classes, proj_dim), ``zero_shot_classifier(backbone, class_names,
    templates)`` computed once by a caller that scores several SAEs (None: computed here).
    variants: which of ``VARIANTS`` to score ("original" and "zero" do not depend on the SAE).
    The SAE is moved to the backbone's device and run in eval mode (its mode is restored).
    Returns ``ce_<variant>``, ``acc_<variant>`` (means over images) of each variant scored,
    ``fraction_recovered`` (when all three are scored; NaN when CE_zero == CE_orig) and
    ``n_images``.
    """
    if backbone.family != "clip":
        raise FidelityError(
            f"downstream fidelity needs a CLIP backbone (zero-shot text head); "
            f"{backbone.name!r} is a {backbone.family} model"
        )
    if sae.cfg.d_in != backbone.d_model:
        raise FidelityError(
            f"the SAE has d_in={sae.cfg.d_in} but {backbone.name!r} has d_model="
            f"{backbone.d_model}: use an SAE trained on this backbone"
        )
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise FidelityError(f"variants must be a non-empty subset of {VARIANTS}, got {variants}")
    scored = [v for v in VARIANTS if v in variants]
    layer = backbone.resolve_layer(layer)
    if text_embeddings is None:
        text_embeddings = zero_shot_classifier(backbone, class_names, templates)
    text_cp = text_embeddings.to(backbone.device)
    if text_cp.shape[0] != len(class_names):
        raise FidelityError(
            f"text_embeddings has {text_cp.shape[0]} rows for {len(class_names)} class names: "
            "build it with zero_shot_classifier on the same class names"
        )
    scale = float(backbone.logit_scale)
    was_training = sae.training
    sae.to(backbone.device).eval()
    ce = dict.fromkeys(scored, 0.0)
    correct = dict.fromkeys(scored, 0)
    n_images = 0
    try:
        for pixel_values, labels in tqdm(batches, desc="fidelity", disable=not progress):
            labels_b = _labels_tensor(labels, len(class_names), pixel_values.shape[0])
            if labels_b.numel() == 0:
                continue
            labels_b = labels_b.to(backbone.device)
            pixels = pixel_values.to(device=backbone.device, dtype=backbone.dtype)
            acts_btd = backbone.encode(pixels, layer)
            for variant in scored:
                if variant == "original":
                    acts = acts_btd
                elif variant == "spliced":
                    acts = sae.decode(sae.encode(acts_btd.to(sae.dtype))).to(acts_btd.dtype)
                else:
                    acts = torch.zeros_like(acts_btd)
                image_bp = backbone.forward_from(acts, layer).float()
                logits_bc = (scale * image_bp @ text_cp.T).double()
                ce[variant] += F.cross_entropy(logits_bc, labels_b, reduction="sum").item()
                correct[variant] += int((logits_bc.argmax(-1) == labels_b).sum())
            n_images += labels_b.numel()
    finally:
        sae.train(was_training)
    if n_images == 0:
        raise FidelityError("no labelled images to score: the image slice is empty")
    means = {f"ce_{v}": ce[v] / n_images for v in scored}
    means.update({f"acc_{v}": correct[v] / n_images for v in scored})
    return _summary(means, n_images)


def labelled_batches(
    batches: Iterator[Any], bad: list[BadRecord]
) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
    """(pixel_values, labels) of each ``ImageBatch``, the input of ``downstream_fidelity``.

    Bad images the batches dropped are appended to ``bad``.
    """
    for batch in batches:
        bad.extend(batch.bad)
        yield batch.pixel_values, batch.labels


@dataclass(frozen=True)
class FidelityConfig:
    """Which labelled images downstream fidelity scores, and how.

    ``data``: labelled images (class names from the class folders or ``class_names_file``);
    ``limit``: score that many of them, drawn with ``seed`` (None: all); ``templates``: prompt
    templates with ``{name}``; ``tokenizer``: a tokenizer folder (None: the model's own);
    ``text_cache``: a folder caching the text embeddings (see ``zero_shot_classifier``).
    """

    data: DataConfig
    limit: int | None = None
    seed: int = 0
    batch_size: int = 32
    num_workers: int = 0
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    tokenizer: str | None = None
    text_cache: str | None = None

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"fidelity.limit must be >= 1 or null (all), got {self.limit}")
        if self.batch_size < 1 or self.num_workers < 0:
            raise ConfigError("fidelity.batch_size must be >= 1 and fidelity.num_workers >= 0")
        try:
            build_prompts(["class"], self.templates)
        except FidelityError as err:
            raise ConfigError(f"fidelity.templates: {err}") from None


class FidelityScorer:
    """Downstream fidelity of SAEs on the labelled images of a ``FidelityConfig``.

    The backbone is ``backbone`` when given (reused unless ``cfg.tokenizer`` asks for another
    tokenizer), else ``model``, else the one named in ``store``'s metadata. Checked at
    construction, before any SAE is scored: the backbone is CLIP (from the store's metadata when
    it names the model, else by loading it), the images have class names, and none of the images
    scored is unlabelled. The images scored are the first ``limit`` of the seeded order, the same
    at every call. A backbone not yet loaded is loaded at the first call, once; with ``store`` its
    width must equal the store's ``d_model``.
    """

    def __init__(
        self,
        cfg: FidelityConfig,
        layer: int,
        *,
        model: str | None = None,
        store: ActivationStore | None = None,
        backbone: Backbone | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        self.cfg, self.layer, self.device = cfg, layer, device
        self._text: torch.Tensor | None = None
        self._fixed: dict[str, float] | None = None
        self.d_model = store.d_model if store is not None else None
        named = store.meta.backbone if store is not None else {}
        self._backbone = backbone if cfg.tokenizer is None else None
        if backbone is not None:
            self.model, family = model or backbone.name, backbone.family
        else:
            self.model = model or named.get("name")
            if not self.model:
                raise FidelityError(
                    "fidelity needs the CLIP backbone, but the store does not name it: "
                    "give the model explicitly"
                )
            family = named.get("family") if self.model == named.get("name") else None
            if family is None:
                family = self.backbone.family
        if family != "clip":
            raise FidelityError(
                f"fidelity needs a CLIP backbone (zero-shot text head), but {self.model!r} is a "
                f"{family} model: score a CLIP backbone or leave fidelity out"
            )
        self.images = open_images(cfg.data)
        where = f"{cfg.data.source!r} [{cfg.data.split}]"
        if not self.images.class_names:
            raise FidelityError(
                f"the fidelity images {where} have no class names: give labelled images "
                "(class folders, or label_column and class_names_file)"
            )
        order = shuffled_order(len(self.images), cfg.seed)
        self.order = order if cfg.limit is None else order[: cfg.limit]
        if (self.images.labels[self.order] < 0).any():
            raise FidelityError(
                f"the fidelity images {where} include unlabelled ones (label -1); fidelity "
                "scores labelled images only"
            )

    @property
    def backbone(self) -> Backbone:
        """The backbone scored through (loaded at the first use)."""
        if self._backbone is None:
            backbone = load_backbone(self.model, device=self.device, tokenizer=self.cfg.tokenizer)
            if self.d_model is not None and backbone.d_model != self.d_model:
                raise FidelityError(
                    f"backbone {self.model!r} has d_model={backbone.d_model} but the store "
                    f"holds d_model={self.d_model}: use the model the store was extracted with"
                )
            self._backbone = backbone
        return self._backbone

    @property
    def text_embeddings(self) -> torch.Tensor:
        """(n_classes, proj_dim) zero-shot text embeddings (computed at the first use)."""
        if self._text is None:
            self._text = zero_shot_classifier(
                self.backbone, self.images.class_names, self.cfg.templates, self.cfg.text_cache
            )
        return self._text

    def __call__(self, sae: SAE, progress: bool = False) -> dict[str, float]:
        """``ce_*``, ``acc_*`` (original, spliced, zero), ``fraction_recovered``, ``n_images``
        and ``n_bad_images`` (images that could not be decoded, skipped).

        The original and zero-ablated scores depend only on the backbone and the images: they
        are computed at the first call and reused, so later calls run the spliced variant only.
        The global torch RNG is left as it was.
        """
        fixed = self._fixed
        out = self._score(sae, VARIANTS if fixed is None else ("spliced",), progress)
        if fixed is not None and out["n_images"] != fixed["n_images"]:
            fixed, out = None, self._score(sae, VARIANTS, progress)
        if fixed is None:
            self._fixed = {k: v for k, v in out.items() if k.endswith(("_original", "_zero"))}
            self._fixed["n_images"] = out["n_images"]
            return out
        summary = _summary({**fixed, **out}, out["n_images"])
        return {**summary, "n_bad_images": out["n_bad_images"]}

    def _score(self, sae: SAE, variants: Sequence[str], progress: bool) -> dict[str, float]:
        bad: list[BadRecord] = []
        batches = image_batches(
            self.images,
            self.order,
            self.backbone.preprocessor,
            self.cfg.batch_size,
            num_workers=self.cfg.num_workers,
        )
        with torch.random.fork_rng(devices=[]):
            out = downstream_fidelity(
                self.backbone,
                sae,
                self.layer,
                labelled_batches(batches, bad),
                self.images.class_names,
                templates=self.cfg.templates,
                progress=progress,
                text_embeddings=self.text_embeddings,
                variants=variants,
            )
        out["n_bad_images"] = len(bad)
        return out
