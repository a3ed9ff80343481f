"""``evaluate``: reconstruction metrics of a saved SAE on a store slice, plus CLIP fidelity.

The slice is the last ``images`` images of the store, the same held-out tail that the trainer's
``eval_images`` keeps apart. Fidelity runs the backbone on labelled images from an image source.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from patchsae.data.loaders import image_batches_from_store
from patchsae.data.store import ActivationStore
from patchsae.metrics.fidelity import FidelityConfig, FidelityScorer
from patchsae.metrics.reconstruction import reconstruction_metrics
from patchsae.sae.io import load

FORMAT_VERSION = 1


class EvaluateError(ValueError):
    """The SAE, the store and the options of an evaluation do not fit together."""


def evaluate(
    sae_path: str | Path,
    store_dir: str | Path,
    *,
    layer: int | None = None,
    images: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    fidelity: FidelityConfig | None = None,
    model: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Metrics of the SAE at ``sae_path`` on the last ``images`` images of the store (all: None).

    ``layer``: the store layer the SAE was trained on (None: the store's only layer).
    ``fidelity``: also score downstream fidelity on those labelled images through ``model`` (None:
    the backbone named in the store's metadata); its backbone and images are checked before the
    reconstruction metrics are computed.
    Returns ``{"format_version", "sae", "store", "layer", "images": [start, stop],
    "reconstruction": {...}, "fidelity": {...} (only with ``fidelity``)}``.
    """
    store = ActivationStore.open(store_dir)
    if layer is None and len(store.layers) > 1:
        raise EvaluateError(f"the store holds layers {store.layers}: choose the SAE's with --layer")
    layer = store.resolve_layer(layer)
    if images is not None and not 0 < images <= len(store):
        raise EvaluateError(f"images must be in 1..{len(store)} (the store's size), got {images}")
    start = len(store) - images if images is not None else 0
    sae = load(sae_path, device=device)
    if sae.cfg.d_in != store.d_model:
        raise EvaluateError(
            f"the SAE has d_in={sae.cfg.d_in} but the store holds d_model={store.d_model}: "
            "evaluate it on activations of the model it was trained on"
        )
    scorer = None
    if fidelity is not None:
        scorer = FidelityScorer(fidelity, layer, model=model, store=store, device=device)
    elif model is not None:
        raise EvaluateError("model is the backbone for fidelity: pass fidelity too")
    batches = image_batches_from_store(store, batch_size, layer=layer, start=start)
    result: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "sae": str(sae_path),
        "store": str(store_dir),
        "layer": layer,
        "images": [start, len(store)],
        "reconstruction": reconstruction_metrics(
            sae,
            batches,
            store.token_layout,
            device=device,
            progress=progress,
            n_batches=-(-(len(store) - start) // batch_size),
        ),
    }
    if scorer is not None:
        result["fidelity"] = scorer(sae, progress=progress)
    return result


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
