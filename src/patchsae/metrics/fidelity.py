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

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from patchsae.backbones import load_backbone
from patchsae.config import ConfigError
from patchsae.data.images import BadRecord, DataConfig, image_batches, open_images, shuffled_order

if TYPE_CHECKING:
    from patchsae.backbones import Backbone
    from patchsae.data.store import ActivationStore
    from patchsae.sae import SAE

DEFAULT_TEMPLATES = ("a photo of a {name}.",)
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


@torch.no_grad()
def zero_shot_classifier(
    backbone: Backbone, class_names: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES
) -> torch.Tensor:
    """(n_classes, proj_dim) text embeddings: template embeddings averaged per class, renormed."""
    prompts = build_prompts(class_names, templates)
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
) -> dict[str, float]:
    """Zero-shot cross-entropy and accuracy with original, SAE-spliced and zero-ablated activations.

    batches: (pixel_values (B, 3, H, W), labels (B,)) with labels indexing ``class_names``.
    The SAE is moved to the backbone's device and run in eval mode (its mode is restored).
    Returns ``ce_{original,spliced,zero}``, ``acc_{original,spliced,zero}`` (means over images),
    ``fraction_recovered`` (NaN when CE_zero == CE_orig) and ``n_images``.
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
    layer = backbone.resolve_layer(layer)
    text_cp = zero_shot_classifier(backbone, class_names, templates).to(backbone.device)
    scale = float(backbone.logit_scale)
    was_training = sae.training
    sae.to(backbone.device).eval()
    sae_dtype = next(sae.parameters()).dtype
    ce = dict.fromkeys(VARIANTS, 0.0)
    correct = dict.fromkeys(VARIANTS, 0)
    n_images = 0
    try:
        for pixel_values, labels in tqdm(batches, desc="fidelity", disable=not progress):
            labels_b = _labels_tensor(labels, len(class_names), pixel_values.shape[0])
            if labels_b.numel() == 0:
                continue
            labels_b = labels_b.to(backbone.device)
            pixels = pixel_values.to(device=backbone.device, dtype=backbone.dtype)
            acts_btd = backbone.encode(pixels, layer)
            spliced_btd = sae.decode(sae.encode(acts_btd.to(sae_dtype))).to(acts_btd.dtype)
            inputs = {
                "original": acts_btd,
                "spliced": spliced_btd,
                "zero": torch.zeros_like(acts_btd),
            }
            for variant, acts in inputs.items():
                image_bp = backbone.forward_from(acts, layer).float()
                logits_bc = (scale * image_bp @ text_cp.T).double()
                ce[variant] += F.cross_entropy(logits_bc, labels_b, reduction="sum").item()
                correct[variant] += int((logits_bc.argmax(-1) == labels_b).sum())
            n_images += labels_b.numel()
    finally:
        sae.train(was_training)
    if n_images == 0:
        raise FidelityError("no labelled images to score: the image slice is empty")
    out = {f"ce_{v}": ce[v] / n_images for v in VARIANTS}
    out.update({f"acc_{v}": correct[v] / n_images for v in VARIANTS})
    gap = out["ce_zero"] - out["ce_original"]
    out["fraction_recovered"] = (out["ce_zero"] - out["ce_spliced"]) / gap if gap else float("nan")
    out["n_images"] = n_images
    return out


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
    templates with ``{name}``; ``tokenizer``: a tokenizer folder (None: the model's own).
    """

    data: DataConfig
    limit: int | None = None
    seed: int = 0
    batch_size: int = 32
    num_workers: int = 0
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    tokenizer: str | None = None

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
        self.d_model = store.d_model if store is not None else None
        named = store.metadata.get("backbone", {}) if store is not None else {}
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

    def __call__(self, sae: SAE, progress: bool = False) -> dict[str, float]:
        """``ce_*``, ``acc_*`` (original, spliced, zero), ``fraction_recovered``, ``n_images``
        and ``n_bad_images`` (images that could not be decoded, skipped).

        The global torch RNG is left as it was.
        """
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
            )
        out["n_bad_images"] = len(bad)
        return out
