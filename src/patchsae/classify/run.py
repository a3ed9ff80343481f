"""``classify``: one resumable pass over labelled images, every condition per batch.

The output folder (format in docs/classify.md) holds ``run.json`` (the config and what was
resolved), ``state.json`` (counts and batches done, rewritten atomically every
``checkpoint_seconds``; a rerun of the same command continues from it) and, when complete,
``results.csv``, ``summary.csv`` and the figure.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from patchsae.atomic import write_json
from patchsae.classify.config import RUNTIME_KEYS, ClassifyConfig, ClassifyError
from patchsae.classify.masking import random_latents, top_latents
from patchsae.classify.outputs import write_outputs
from patchsae.classify.splice import clip_head, condition_logits
from patchsae.classify.tally import Tally
from patchsae.config import to_dict
from patchsae.data.images import image_batches, open_images, shuffled_order
from patchsae.lock import FolderLock
from patchsae.metrics.fidelity import zero_shot_classifier
from patchsae.paths import resolve_local

FORMAT, FORMAT_VERSION = "patchsae-classify", 1
RUN_JSON, STATE_JSON = "run.json", "state.json"


def _read_json(path: Path) -> dict[str, Any] | None:
    from patchsae.stats.atlas import read_json

    return read_json(path, f"delete {path.parent} or use another out=") if path.is_file() else None


def _check_rerun(root: Path, run: dict[str, Any]) -> None:
    """Refuse an out folder holding a run with other settings."""
    old = _read_json(root / RUN_JSON)
    if old is None:
        return
    new_cfg, old_cfg = run["config"], old.get("config") or {}
    keys = sorted(
        k
        for k in set(new_cfg) | set(old_cfg)
        if k not in RUNTIME_KEYS and new_cfg.get(k) != old_cfg.get(k)
    )
    if old.get("format") != FORMAT or keys:
        raise ClassifyError(
            f"{root} holds a classify run with other settings ({', '.join(keys) or 'format'}); "
            "use another out= or delete the folder"
        )


def _atlas_dataset(cfg: ClassifyConfig, sae: Any, backbone: Any, layer: int, images: Any) -> Any:
    """The atlas dataset whose counts rank the latents, checked against the SAE (sizes and
    weights), the backbone (its name: the base model's atlas or an adapted one's), the layer, the
    class names and (unless ``same_split``) the evaluation images."""
    from patchsae.stats.atlas import Atlas

    atlas = Atlas.open(cfg.atlas)
    if atlas.d_sae != sae.cfg.d_sae or atlas.meta["sae"].get("d_in") != sae.cfg.d_in:
        raise ClassifyError(
            f"the atlas {cfg.atlas} was computed for an SAE with d_sae={atlas.d_sae}, d_in="
            f"{atlas.meta['sae'].get('d_in')}; the SAE has d_sae={sae.cfg.d_sae}, d_in="
            f"{sae.cfg.d_in}: use the atlas of this SAE"
        )
    from patchsae.stats.compute import sae_identity

    if atlas.meta["sae"].get("weights_sha256") != sae_identity(sae, cfg.sae)["weights_sha256"]:
        raise ClassifyError(
            f"the atlas {cfg.atlas} was computed with another SAE (its weights differ), so its "
            "latent ids name other latents: use the atlas of this SAE"
        )
    named = atlas.meta.get("backbone", {})
    if named.get("name") != backbone.name or atlas.meta.get("layer") != layer:
        raise ClassifyError(
            f"the atlas {cfg.atlas} was computed on {named.get('name')!r} layer "
            f"{atlas.meta.get('layer')}, not {backbone.name!r} layer {layer}: use an atlas of "
            "this backbone and layer"
        )
    ds = atlas.dataset(cfg.atlas_dataset)
    if not ds.meta["has_labels"]:
        raise ClassifyError(f"atlas dataset {ds.name!r} has no labels, so no class counts")
    if ds.class_names != list(images.class_names):
        raise ClassifyError(
            f"atlas dataset {ds.name!r} has {len(ds.class_names)} classes named differently "
            f"from the {len(images.class_names)} of the images: use the same label space"
        )
    same = ds.meta.get("data", {}).get("fingerprint") == images.fingerprint
    if same and not cfg.same_split:
        raise ClassifyError(
            f"atlas dataset {ds.name!r} was computed on the images being classified; select "
            "latents on another split, or set same_split=true for the paper's same-split protocol"
        )
    return ds


def latent_sets(
    cfg: ClassifyConfig, ds: Any, n_classes: int, d_sae: int
) -> dict[str, torch.Tensor]:
    """selection -> (n_classes or 1, k_max) latent ids, best first."""
    k_max = min(max(cfg.ks), d_sae)
    out = {}
    for sel in cfg.selections:
        if sel == "class":
            out[sel] = top_latents(torch.from_numpy(np.array(ds.array("class_counts"))), k_max)
        elif sel == "dataset":
            counts = torch.from_numpy(np.array(ds.array("dataset_counts")))
            out[sel] = top_latents(counts[None], k_max)
        else:
            out[sel] = random_latents(n_classes, d_sae, k_max, cfg.seed)
    return out


def classify(cfg: ClassifyConfig, progress: bool = True, max_batches: int | None = None) -> Path:
    """Run (or continue) ``cfg``; returns the output folder.

    max_batches: stop after that many batches in this call (the state is saved; the next call
    continues), None: to the end.
    """
    root = Path(cfg.out)
    root.mkdir(parents=True, exist_ok=True)
    busy = ClassifyError(
        f"another patchsae classify is writing to {root}; wait or use another out="
    )
    with FolderLock(root, busy):
        return _classify_locked(cfg, root, progress, max_batches)


def _classify_locked(
    cfg: ClassifyConfig, root: Path, progress: bool, max_batches: int | None
) -> Path:
    from patchsae.backbones import load_backbone
    from patchsae.sae import load

    run: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": to_dict(cfg),
    }
    _check_rerun(root, run)
    images = open_images(cfg.data)
    names = list(images.class_names)
    if not names:
        raise ClassifyError(
            f"{cfg.data.source!r} [{cfg.data.split}] has no class names: classification needs "
            "labelled images (class folders, or label_column and class_names_file)"
        )
    order = np.arange(len(images)) if cfg.limit is None else shuffled_order(len(images), cfg.seed)
    order = order[: cfg.limit]
    labels = np.asarray(images.labels)[order]
    if len(order) == 0 or (labels < 0).any():
        raise ClassifyError(
            f"{cfg.data.source!r} [{cfg.data.split}] has unlabelled images (or none): "
            "classification needs a label for every image"
        )
    backbone = load_backbone(cfg.model, device=cfg.device, tokenizer=cfg.tokenizer)
    if backbone.family != "clip":
        raise ClassifyError(
            f"{cfg.model!r} is a {backbone.family} model; zero-shot classification needs a CLIP "
            "backbone (it has a text tower)"
        )
    layer = backbone.resolve_layer(cfg.layer)
    sae, sets, ds = None, {}, None
    if cfg.sae is not None:
        sae = load(cfg.sae, device=cfg.device).eval()
        if sae.cfg.d_in != backbone.d_model:
            raise ClassifyError(
                f"the SAE reads d_in={sae.cfg.d_in}, {backbone.name!r} has width "
                f"{backbone.d_model}: use an SAE trained on this backbone"
            )
    if cfg.masking:
        if {"class", "dataset"} & set(cfg.selections):
            ds = _atlas_dataset(cfg, sae, backbone, layer, images)
        sets = latent_sets(cfg, ds, len(names), sae.cfg.d_sae)
    conditions = cfg.conditions()
    positions = backbone.token_layout.positions(cfg.tokens)
    text = zero_shot_classifier(
        backbone, names, cfg.templates, cfg.text_cache or root / "text_cache"
    )
    head = clip_head(backbone, layer, text)
    run.update(
        {
            "model": backbone.identity(),
            "layer": layer,
            "d_sae": None if sae is None else sae.cfg.d_sae,
            "class_names": names,
            "n_images": len(order),
            "atlas": None if ds is None else {"path": resolve_local(cfg.atlas), "dataset": ds.name},
            "protocol": "same_split" if cfg.same_split else "held_out",
            "conditions": [c.name for c in conditions],
        }
    )
    write_json(root / RUN_JSON, run)

    tally = Tally(conditions, len(names))
    state = _read_json(root / STATE_JSON) or {"batches_done": 0, "n_bad": 0, "complete": False}
    if state["batches_done"]:
        tally.load_json(state["counts"])
    n_batches = -(-len(order) // cfg.batch_size)
    done = state["batches_done"]
    stop = n_batches if max_batches is None else min(n_batches, done + max_batches)
    batches = image_batches(
        images,
        order[done * cfg.batch_size : stop * cfg.batch_size],
        backbone.preprocessor,
        cfg.batch_size,
        num_workers=cfg.num_workers,
    )

    def save() -> None:
        state["counts"] = tally.to_json()
        write_json(root / STATE_JSON, state)

    last = time.monotonic()
    bar = tqdm(total=n_batches, initial=done, desc="classify", disable=not progress)
    for batch in batches:
        state["n_bad"] += len(batch.bad)
        if len(batch.labels):
            labels_b = torch.as_tensor(batch.labels, dtype=torch.int64)
            with torch.no_grad():
                acts = backbone.encode(batch.pixel_values, layer)
                targets = labels_b.to(backbone.device) if cfg.mask_by == "label" else None
                logits = condition_logits(
                    head, sae, acts, conditions, positions, cfg.splice, sets, targets
                )
            for cond, logits_bc in logits.items():
                tally.add(cond, logits_bc, labels_b)
        state["batches_done"] += 1
        bar.update(1)
        if time.monotonic() - last >= cfg.checkpoint_seconds:
            save()
            last = time.monotonic()
    bar.close()
    state["complete"] = state["batches_done"] == n_batches
    save()
    if state["complete"]:
        write_outputs(root, run, tally, plot=cfg.plot)
    return root
