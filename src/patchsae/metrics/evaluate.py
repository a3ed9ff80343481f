"""``evaluate``: reconstruction metrics of a saved SAE on a store slice, plus CLIP fidelity.

The slice is the last ``images`` images of the store, the same held-out tail that the trainer's
``eval_images`` keeps apart. Fidelity runs the backbone on labelled images from an image source.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from patchsae import atomic
from patchsae.backbones import load_backbone
from patchsae.data.images import BadRecord, DataConfig, image_batches, open_images, shuffled_order
from patchsae.data.loaders import image_batches_from_store
from patchsae.data.store import ActivationStore
from patchsae.metrics.fidelity import DEFAULT_TEMPLATES, downstream_fidelity, labelled_batches
from patchsae.metrics.reconstruction import reconstruction_metrics
from patchsae.sae.io import load

FORMAT_VERSION = 1


@dataclass(frozen=True)
class FidelitySpec:
    """Where the labelled images for downstream fidelity come from.

    ``model``: backbone name or folder (None: the store's backbone); ``data``, ``split``,
    ``class_names_file``: the image source; ``limit``: score that many images, drawn with
    ``seed`` (None: all); ``templates``: prompt templates with ``{name}``.
    """

    data: str
    model: str | None = None
    split: str = "test"
    class_names_file: str | None = None
    limit: int | None = None
    seed: int = 0
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    tokenizer: str | None = None
    batch_size: int = 32
    num_workers: int = 0


def _fidelity(
    spec: FidelitySpec, sae: Any, store: ActivationStore, layer: int, device: str, progress: bool
) -> dict[str, float]:
    model = spec.model or store.metadata.get("backbone", {}).get("name")
    if not model:
        raise ValueError("the store does not name its backbone: pass the model for fidelity")
    backbone = load_backbone(model, device=device, tokenizer=spec.tokenizer)
    if backbone.d_model != store.d_model:
        raise ValueError(
            f"backbone {model!r} has d_model={backbone.d_model} but the store holds "
            f"d_model={store.d_model}: pass the model the store was extracted with"
        )
    source = open_images(
        DataConfig(spec.data, split=spec.split, class_names_file=spec.class_names_file)
    )
    if not source.class_names:
        raise ValueError(f"{spec.data} [{spec.split}] has no class names; fidelity needs labels")
    order = shuffled_order(len(source), spec.seed)
    if spec.limit is not None:
        order = order[: spec.limit]
    bad: list[BadRecord] = []
    batches = image_batches(
        source, order, backbone.preprocessor, spec.batch_size, num_workers=spec.num_workers
    )
    out = downstream_fidelity(
        backbone,
        sae,
        layer,
        labelled_batches(batches, bad),
        source.class_names,
        templates=spec.templates,
        progress=progress,
    )
    out["n_bad_images"] = len(bad)
    return out


def evaluate(
    sae_path: str | Path,
    store_dir: str | Path,
    *,
    layer: int | None = None,
    images: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    fidelity: FidelitySpec | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Metrics of the SAE at ``sae_path`` on the last ``images`` images of the store (all: None).

    ``layer``: the store layer the SAE was trained on (None: the store's only layer).
    Returns ``{"format_version", "sae", "store", "layer", "images": [start, stop],
    "reconstruction": {...}, "fidelity": {...} (only with ``fidelity``)}``.
    """
    store = ActivationStore.open(store_dir)
    if layer is None and len(store.layers) > 1:
        raise ValueError(f"the store holds layers {store.layers}: choose the SAE's with --layer")
    layer = store.resolve_layer(layer)
    if images is not None and not 0 < images <= len(store):
        raise ValueError(f"images must be in 1..{len(store)} (the store's size), got {images}")
    start = len(store) - images if images is not None else 0
    sae = load(sae_path, device=device)
    if sae.cfg.d_in != store.d_model:
        raise ValueError(
            f"the SAE has d_in={sae.cfg.d_in} but the store holds d_model={store.d_model}: "
            "evaluate it on activations of the model it was trained on"
        )
    batches = image_batches_from_store(store, batch_size, layer=layer, start=start)
    result: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "sae": str(sae_path),
        "store": str(store_dir),
        "layer": layer,
        "images": [start, len(store)],
        "reconstruction": reconstruction_metrics(
            sae, batches, store.token_layout, device=device, progress=progress
        ),
    }
    if fidelity is not None:
        result["fidelity"] = _fidelity(fidelity, sae, store, layer, device, progress)
    return result


def _json_ready(value: Any) -> Any:
    """NaN and infinities become null (strict JSON)."""
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_ready(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(result: dict[str, Any], path: str | Path) -> None:
    """Write ``result`` to ``path`` atomically (temporary file, then rename)."""
    atomic.write_json(path, _json_ready(result))


def format_table(result: dict[str, Any]) -> str:
    """The metrics as a two-column text table, one section per group."""
    lines = [
        f"sae {result['sae']}",
        f"store {result['store']}  layer {result['layer']}  images "
        f"{result['images'][0]}..{result['images'][1]}",
    ]
    for section in ("reconstruction", "fidelity"):
        if section not in result:
            continue
        lines.append(f"\n{section}")
        for key, value in result[section].items():
            text = f"{value:.6g}" if isinstance(value, float) else str(value)
            lines.append(f"  {key:<30} {text:>14}")
    return "\n".join(lines)
