"""Few-shot prompt learning (``patchsae adapt maple|coop``): the official MaPLe recipe.

``shots`` training images per class drawn by ``seed`` (:mod:`patchsae.adapt.split`); SGD
(lr 0.0035, momentum 0.9, weight decay 5e-4) on the prompt learner only, batch 4, 5 epochs;
the learning rate is constant ``warmup_lr`` for ``warmup_epochs`` epochs, then
``lr * (1 + cos(pi * (epoch - warmup_epochs) / epochs)) / 2`` per epoch (Dassl's
``ConstantWarmupScheduler`` over ``CosineAnnealingLR``); random resized crop and flip;
cross-entropy of ``logit_scale * image @ text.T`` over the training classes. The base-to-novel
protocol trains on the first ceil(n/2) classes and reports accuracy on the base and the novel
test classes (each against its own class names) and their harmonic mean.

Every random choice is a function of ``(seed, step)``: epoch e visits the shots in the order
``seeded_order(n, seed, ORDER_STREAM, e)`` (dropping the incomplete last batch, as Dassl does),
and the augmentation of the shot at position j of that order is drawn from
``keyed_rng(seed, AUGMENT_STREAM, e, j)``. A checkpoint (learner, momentum buffers, step, losses)
is written atomically every ``checkpoint_every`` steps and at the end of each epoch, so a run
killed at any moment resumes from its last checkpoint and ends bit for bit where an
uninterrupted run ends (same device and thread count).

Run folder ``out/`` (format_version 1): ``run.json`` (config, classes, shots; compared on
resume), ``checkpoint.safetensors`` (while training), then ``results.json`` and the adapter
(``adapter.safetensors`` + ``adapter.json``, written last), so ``load_backbone(out)`` gives the
adapted model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from patchsae.atomic import write_json, write_with
from patchsae.backbones import DEFAULT_BACKBONE, Backbone, load_backbone
from patchsae.backbones.loading import ADAPTER_JSON
from patchsae.config import ConfigError, to_dict
from patchsae.data.images import BadImage, DataConfig, image_batches, open_images
from patchsae.data.shuffle import keyed_rng, seeded_order
from patchsae.data.store import differing_keys
from patchsae.lock import LOCK, FolderLock
from patchsae.metrics.fidelity import DEFAULT_TEMPLATES, build_prompts, zero_shot_classifier
from patchsae.paths import resolve_local
from patchsae.pixels import to_rgb

from .augment import augment
from .checkpoint import save_adapter
from .config import AdaptError, PromptConfig
from .model import AdaptedBackbone, adapt
from .split import base_novel, few_shot, harmonic_mean

FORMAT_VERSION = 1
RUN_JSON = "run.json"
CHECKPOINT = "checkpoint.safetensors"
RESULTS_JSON = "results.json"
ORDER_STREAM, AUGMENT_STREAM = 1, 2


@dataclass(frozen=True)
class AdaptConfig:
    """A few-shot prompt-learning run (defaults: MaPLe's base-to-novel config).

    ``data`` gives the labelled training images (its ``split``); ``eval_split`` the split of the
    same source scored at the end (None: no evaluation). ``protocol``: ``base2novel`` (train on
    the first ceil(n/2) classes, score base and novel) or ``all`` (train and score all classes).
    """

    data: DataConfig
    out: str
    model: str = DEFAULT_BACKBONE
    tokenizer: str | None = None
    prompt: PromptConfig = field(default_factory=PromptConfig)
    protocol: Literal["base2novel", "all"] = "base2novel"
    eval_split: str | None = "test"
    shots: int = 16
    seed: int = 1
    epochs: int = 5
    batch_size: int = 4
    lr: float = 0.0035
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    augment: bool = True
    crop_scale: tuple[float, float] = (0.08, 1.0)
    checkpoint_every: int = 100
    eval_batch_size: int = 64
    num_workers: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        positive = ("shots", "epochs", "batch_size", "checkpoint_every", "eval_batch_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seed < 0 or self.warmup_epochs < 0 or self.num_workers < 0:
            raise ConfigError("seed, warmup_epochs and num_workers must be >= 0")
        if not (self.lr > 0 and self.warmup_lr > 0):
            raise ConfigError(f"lr and warmup_lr must be > 0, got {self.lr}, {self.warmup_lr}")
        if not (0 <= self.momentum < 1 and self.weight_decay >= 0):
            raise ConfigError("momentum must lie in [0, 1) and weight_decay be >= 0")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"crop_scale must satisfy 0 < lo <= hi <= 1, got {self.crop_scale}")


def lr_at_epoch(cfg: AdaptConfig, epoch: int) -> float:
    """Learning rate of (0-based) ``epoch``: warm-up constant, then cosine over ``epochs``."""
    if epoch < cfg.warmup_epochs:
        return cfg.warmup_lr
    return cfg.lr * (1 + math.cos(math.pi * (epoch - cfg.warmup_epochs) / cfg.epochs)) / 2


@dataclass
class Plan:
    """Classes and shots of a run: ``train_ids`` (n,) and ``train_labels`` (n,) in 0..len-1 of
    ``train_classes``; ``groups`` maps an evaluation group (base, novel or all) to its labels."""

    class_names: list[str]
    train_classes: list[int]
    groups: dict[str, list[int]]
    shots: dict[int, list[int]]

    @property
    def train_ids(self) -> np.ndarray:
        return np.asarray([i for c in self.train_classes for i in self.shots[c]], dtype=np.int64)

    @property
    def train_labels(self) -> np.ndarray:
        return np.asarray(
            [k for k, c in enumerate(self.train_classes) for _ in self.shots[c]], dtype=np.int64
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "class_names": self.class_names,
            "train_classes": self.train_classes,
            "groups": self.groups,
            "shots": {str(c): ids for c, ids in self.shots.items()},
        }


def make_plan(cfg: AdaptConfig, source: Any) -> Plan:
    """Split the classes by ``cfg.protocol`` and draw the shots of the training classes."""
    names = list(source.class_names)
    if not names or (source.labels < 0).all():
        raise AdaptError(
            f"{cfg.data.source} has no labelled images: few-shot training needs labels"
        )
    if cfg.protocol == "base2novel":
        base, novel = base_novel(len(names))
        groups = {"base": base, "novel": novel}
    else:
        base, groups = list(range(len(names))), {"all": list(range(len(names)))}

    def usable(i: int) -> bool:
        try:
            source.load(i)
        except BadImage:
            return False
        return True

    return Plan(names, base, groups, few_shot(source.labels, base, cfg.shots, cfg.seed, usable))


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Batches per epoch; the incomplete last one is dropped unless it is the only one."""
    return max(n // batch_size, 1)


def text_features(adapted: AdaptedBackbone, names: Sequence[str]) -> torch.Tensor:
    """(C, proj_dim) L2-normalised class embeddings of the adapter's prompt, with gradients."""
    return adapted.encode_text(build_prompts(names, adapted.templates))


def image_features(backbone: Backbone, pixels: torch.Tensor) -> torch.Tensor:
    """(B, proj_dim) L2-normalised image embeddings (the full forward)."""
    return backbone.forward_from(backbone.encode(pixels, -1), -1)


def _batch_pixels(
    cfg: AdaptConfig,
    adapted: AdaptedBackbone,
    source: Any,
    ids: np.ndarray,
    epoch: int,
    positions: np.ndarray,
) -> torch.Tensor:
    images = [to_rgb(source.load(int(i))) for i in ids]
    if cfg.augment:
        size = adapted.preprocessor.size_hw
        images = [
            augment(im, size, cfg.crop_scale, keyed_rng(cfg.seed, AUGMENT_STREAM, epoch, int(j)))
            for im, j in zip(images, positions, strict=True)
        ]
    return adapted.preprocess(images)


def _save_checkpoint(
    out: Path, adapted: AdaptedBackbone, opt: torch.optim.SGD, step: int, losses: list[float]
) -> None:
    tensors = {}
    for name, param in adapted.learner.named_parameters():
        tensors[f"learner.{name}"] = param.detach().cpu().contiguous()
        buf = opt.state.get(param, {}).get("momentum_buffer")
        if buf is not None:
            tensors[f"momentum.{name}"] = buf.detach().cpu().contiguous()
    meta = {"format_version": str(FORMAT_VERSION), "step": str(step), "losses": json.dumps(losses)}
    write_with(out / CHECKPOINT, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def _load_checkpoint(
    out: Path, adapted: AdaptedBackbone, opt: torch.optim.SGD
) -> tuple[int, list[float]]:
    path = out / CHECKPOINT
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        step, losses = int(meta["step"]), json.loads(meta["losses"])
    except (OSError, SafetensorError, KeyError, ValueError) as err:
        raise AdaptError(
            f"{path} is damaged ({err}): delete it to restart the run from step 0"
        ) from None
    with torch.no_grad():
        for name, param in adapted.learner.named_parameters():
            param.copy_(tensors[f"learner.{name}"])
            if f"momentum.{name}" in tensors:
                buf = tensors[f"momentum.{name}"].to(param.device, param.dtype)
                opt.state[param] = {"momentum_buffer": buf}
    return step, losses


def _prepare_out(cfg: AdaptConfig, out: Path, plan: Plan, resume: bool) -> bool:
    """Write or check ``run.json``; True when the run is already complete."""
    run = {"format_version": FORMAT_VERSION, "config": to_dict(cfg), "plan": plan.to_dict()}
    run = json.loads(json.dumps(run))
    run_path = out / RUN_JSON
    if run_path.is_file():
        if not resume:
            raise AdaptError(
                f"{out} already holds an adapt run: pass --resume to continue it, or choose "
                "another out"
            )
        saved = json.loads(run_path.read_text())
        diff = differing_keys(saved, run)
        if diff:
            raise AdaptError(
                f"cannot resume {out}: the run differs from the saved one in {diff[:6]}; use the "
                "saved settings or another out"
            )
        return (out / ADAPTER_JSON).is_file()
    if any(p.name != LOCK for p in out.iterdir()):
        raise AdaptError(f"{out} exists and is not an adapt run: choose an empty or new out")
    write_json(run_path, run)
    return False


@torch.no_grad()
def accuracy(
    backbones: dict[str, Backbone],
    templates: dict[str, Sequence[str]],
    source: Any,
    classes: Sequence[int],
    class_names: Sequence[str],
    batch_size: int,
    num_workers: int = 0,
    progress: bool = True,
) -> dict[str, float]:
    """Top-1 accuracy of each backbone on the images of ``classes`` in ``source``, scored against
    the names of ``classes`` only (one image pass per backbone)."""
    ids = np.flatnonzero(np.isin(source.labels, classes))
    if ids.size == 0:
        raise AdaptError(f"the evaluation split has no images of classes {list(classes)[:5]}")
    relabel = {c: k for k, c in enumerate(classes)}
    names = [class_names[c] for c in classes]
    first = next(iter(backbones.values()))
    text = {k: zero_shot_classifier(b, names, templates[k]) for k, b in backbones.items()}
    correct = dict.fromkeys(backbones, 0)
    n = 0
    batches = image_batches(source, ids, first.preprocessor, batch_size, num_workers)
    for batch in tqdm(
        batches,
        total=-(-ids.size // batch_size),
        disable=not progress,
        desc="evaluate",
        unit="batch",
        leave=False,
    ):
        labels = torch.as_tensor([relabel[int(y)] for y in batch.labels])
        n += len(labels)
        for key, backbone in backbones.items():
            feats = image_features(backbone, batch.pixel_values).float()
            pred = (feats @ text[key].to(feats.device).T).argmax(-1).cpu()
            correct[key] += int((pred == labels).sum())
    if n == 0:
        raise AdaptError("every evaluation image was unreadable")
    return {k: correct[k] / n for k in backbones} | {"n_images": n}


def evaluate(
    cfg: AdaptConfig, adapted: AdaptedBackbone, plan: Plan, progress: bool = True
) -> dict[str, Any]:
    """Accuracy of the adapted and the zero-shot model per group; the harmonic mean of base and
    novel under base2novel."""
    source = open_images(replace(cfg.data, split=cfg.eval_split))
    if list(source.class_names) != plan.class_names:
        raise AdaptError(
            f"the {cfg.eval_split!r} split has classes {source.class_names[:5]}..., the training "
            f"split {plan.class_names[:5]}...: both splits need the same classes"
        )
    models = {"adapted": adapted, "zero_shot": adapted.base}
    templates = {"adapted": adapted.templates, "zero_shot": DEFAULT_TEMPLATES}
    out: dict[str, Any] = {"split": cfg.eval_split}
    for group, classes in plan.groups.items():
        out[group] = accuracy(
            models,
            templates,
            source,
            classes,
            plan.class_names,
            cfg.eval_batch_size,
            cfg.num_workers,
            progress,
        )
    if "novel" in out:
        out["harmonic_mean"] = {k: harmonic_mean(out["base"][k], out["novel"][k]) for k in models}
    return out


def adapt_run(cfg: AdaptConfig, resume: bool = False, progress: bool = True) -> Path:
    """Train (or finish) the run ``cfg.out``; returns the folder, an adapter ``load_backbone``
    reads. ``resume`` continues a run from its checkpoint (refused when the config differs)."""
    out = Path(cfg.out)
    source = open_images(cfg.data)
    plan = make_plan(cfg, source)
    if out.exists() and not out.is_dir():
        raise AdaptError(f"out {out} is a file: choose a folder")
    out.mkdir(parents=True, exist_ok=True)
    busy = AdaptError(f"{out} is in use by another adapt run: wait for it or choose another out")
    with FolderLock(out, busy):
        if _prepare_out(cfg, out, plan, resume):
            tqdm.write(f"{out} is already complete; nothing to do")
            return out
        _train(cfg, out, source, plan, progress)
    return out


def _train(cfg: AdaptConfig, out: Path, source: Any, plan: Plan, progress: bool) -> None:
    """The training loop, evaluation and the final adapter of :func:`adapt_run`."""
    base = load_backbone(cfg.model, device=cfg.device, tokenizer=cfg.tokenizer)
    base.model.requires_grad_(False)
    adapted = adapt(base, cfg.prompt, seed=cfg.seed)
    opt = torch.optim.SGD(
        adapted.learner.parameters(),
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
    )
    step, losses = 0, []
    if (out / CHECKPOINT).is_file():
        step, losses = _load_checkpoint(out, adapted, opt)
    ids, labels = plan.train_ids, torch.as_tensor(plan.train_labels)
    names = [plan.class_names[c] for c in plan.train_classes]
    per_epoch = steps_per_epoch(len(ids), cfg.batch_size)
    total = cfg.epochs * per_epoch
    bar = tqdm(
        total=total,
        initial=step,
        desc=f"adapt {cfg.prompt.method}",
        unit="step",
        disable=not progress,
    )
    adapted.learner.train()
    while step < total:
        epoch, k = divmod(step, per_epoch)
        for group in opt.param_groups:
            group["lr"] = lr_at_epoch(cfg, epoch)
        positions = seeded_order(len(ids), cfg.seed, ORDER_STREAM, epoch)
        positions = positions[k * cfg.batch_size : (k + 1) * cfg.batch_size]
        pixels = _batch_pixels(cfg, adapted, source, ids[positions], epoch, positions)
        logits = (
            adapted.logit_scale * image_features(adapted, pixels) @ text_features(adapted, names).T
        )
        loss = F.cross_entropy(logits, labels[positions].to(logits.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        step += 1
        bar.update(1)
        bar.set_postfix(epoch=epoch, loss=f"{losses[-1]:.3f}")
        if step % cfg.checkpoint_every == 0 or step % per_epoch == 0:
            _save_checkpoint(out, adapted, opt, step, losses)
    bar.close()
    adapted.learner.eval()
    summary: dict[str, Any] = {
        "steps": total,
        "epoch_mean_loss": [
            float(np.mean(losses[e * per_epoch : (e + 1) * per_epoch])) for e in range(cfg.epochs)
        ],
    }
    if cfg.eval_split is not None:
        summary["results"] = evaluate(cfg, adapted, plan, progress)
    write_json(out / RESULTS_JSON, summary)
    save_adapter(
        adapted,
        out,
        base_model=resolve_local(cfg.model),
        tokenizer=resolve_local(cfg.tokenizer),
        extra={"training": {"run": RUN_JSON, "results": RESULTS_JSON}},
    )
    (out / CHECKPOINT).unlink(missing_ok=True)
