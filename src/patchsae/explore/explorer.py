"""``Explorer``: what each page action asks, answered as JSON-ready dicts (no HTTP here).

One or two models (base, and optionally an adapted model with its own atlas); every answer
lists the models in that order, and with two models groups their top latents into common /
base-only / adapted-only.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from patchsae.explore.core import (
    Encoded,
    ExploreError,
    Model,
    encode,
    group_latents,
    latent_mask,
    patch_at,
    patch_latents,
    png_bytes,
    ranked,
    read_image,
)
from patchsae.explore.sessions import Sessions

TOP_K = 10
PLOT_POINTS = 512
"""Non-zero activations sent for the activation plot (the largest ones)."""
N_EXAMPLES = 8
MASK_STYLES = ("heat", "darken")


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def plot_points(values_m: np.ndarray) -> list[list[float]]:
    """``[[latent, value], ...]`` of the ``PLOT_POINTS`` largest positive entries, by id."""
    ids = np.flatnonzero(values_m > 0)
    if len(ids) > PLOT_POINTS:
        ids = np.sort(ids[np.argsort(-values_m[ids], kind="stable")[:PLOT_POINTS]])
    return [[int(j), float(values_m[j])] for j in ids]


class Explorer:
    """The models, their atlases and the sessions of one explorer server."""

    def __init__(self, models: list[Model], max_sessions: int = 64) -> None:
        if not 1 <= len(models) <= 2:
            raise ExploreError("the explorer shows one model, or a base and an adapted model")
        base = models[0]
        for other in models[1:]:
            if other.layout.grid != base.layout.grid or other.sae.cfg.d_sae != base.sae.cfg.d_sae:
                raise ExploreError(
                    f"model {other.name!r} has another patch grid or d_sae than {base.name!r}; "
                    "side by side needs SAEs of the same size on models with the same patches"
                )
        self.models = models
        self.by_name = {m.name: m for m in models}
        self.sessions = Sessions(max_sessions)
        self.d_sae = base.sae.cfg.d_sae

    def info(self) -> dict[str, Any]:
        base = self.models[0]
        return {
            "models": [
                {
                    "name": m.name,
                    "backbone": m.backbone.name,
                    "layer": m.layer,
                    "datasets": list(m.atlas.datasets),
                }
                for m in self.models
            ],
            "d_sae": self.d_sae,
            "grid": list(base.layout.grid),
            "n_examples": len(self.examples()),
        }

    def examples(self) -> list[tuple[str, int]]:
        """(dataset, thumbnail row) of up to ``N_EXAMPLES`` images bundled in the base atlas."""
        out = []
        for name, ds in self.models[0].atlas.datasets.items():
            if "thumbs" in ds.meta["files"]:
                n = len(ds.array("thumbs"))
                out += [(name, row) for row in range(min(n, N_EXAMPLES - len(out)))]
        return out

    def example_png(self, index: int) -> bytes:
        examples = self.examples()
        if not 0 <= index < len(examples):
            raise ExploreError(f"example {index} does not exist; there are {len(examples)}")
        name, row = examples[index]
        return png_bytes(np.asarray(self.models[0].atlas.dataset(name).array("thumbs")[row]))

    def _side_by_side(self, values: dict[str, np.ndarray]) -> dict[str, Any]:
        tops = {m.name: ranked(values[m.name], TOP_K) for m in self.models}
        out: dict[str, Any] = {
            "top": tops,
            "plot": {m.name: plot_points(values[m.name]) for m in self.models},
        }
        if len(self.models) == 2:
            base, adapted = (tops[m.name] for m in self.models)
            out["groups"] = group_latents(
                [e["latent"] for e in base], [e["latent"] for e in adapted]
            )
        return out

    def encode(self, data: bytes) -> dict[str, Any]:
        """Encode an upload; returns its session token, display image, grid and top latents."""
        encoded = encode(self.models, read_image(data))
        token = self.sessions.put(encoded)
        width, height = encoded.size_wh
        box = encoded.box
        return {
            "session": token,
            "image": data_url(png_bytes(encoded.display)),
            "size": [width, height],
            "grid": list(self.models[0].layout.grid),
            "box": [box.left / width, box.top / height, box.right / width, box.bottom / height],
            **self._side_by_side(encoded.image_acts),
        }

    def click(self, session: str, fx: float, fy: float) -> dict[str, Any]:
        """Top latents of the patch under a click at fractions (fx, fy) of the image."""
        encoded = self.sessions.get(session)
        grid = self.models[0].layout.grid
        where = patch_at(fx, fy, encoded.size_wh, encoded.box, grid)
        if where is None:
            return {"patch": None, "message": "outside the part of the image the model sees"}
        row, col = where
        values = {
            m.name: patch_latents(encoded.codes[m.name], m.layout, row, col) for m in self.models
        }
        return {"patch": [row, col], **self._side_by_side(values)}

    def _model(self, name: str) -> Model:
        if name not in self.by_name:
            raise ExploreError(f"no model {name!r}; the explorer has {list(self.by_name)}")
        return self.by_name[name]

    def _check_latent(self, latent: int) -> None:
        if not 0 <= latent < self.d_sae:
            raise ExploreError(f"latent {latent} is outside 0..{self.d_sae - 1}")

    def latent(
        self, latent: int, session: str | None = None, style: str = "heat"
    ) -> dict[str, Any]:
        """A latent's statistics and reference images per model and dataset, and its mask on
        the session's image."""
        self._check_latent(latent)
        if style not in MASK_STYLES:
            raise ExploreError(f"mask style must be one of {MASK_STYLES}, got {style!r}")
        encoded: Encoded | None = None if session is None else self.sessions.get(session)
        out: dict[str, Any] = {"latent": latent, "link": f"/?latent={latent}", "models": []}
        for m in self.models:
            datasets = []
            for stats in m.atlas.latent(latent)["datasets"]:
                ds = m.atlas.dataset(stats["dataset"])
                has_thumbs = "thumbs" in ds.meta["files"]
                for ref in stats["references"]:
                    base = f"/api/thumb/{m.name}/{ds.name}/{latent}/{ref['slot']}"
                    ref["url"] = base if has_thumbs else None
                    ref["mask_url"] = f"{base}?mask={style}" if has_thumbs else None
                datasets.append(stats)
            entry: dict[str, Any] = {"name": m.name, "datasets": datasets}
            if encoded is not None:
                entry["mask"] = data_url(png_bytes(latent_mask(encoded, m, latent, style)))
            out["models"].append(entry)
        return out

    def thumb(
        self, model: str, dataset: str, latent: int, slot: int, mask: str | None = None
    ) -> bytes:
        """PNG of reference ``slot`` of ``latent`` in ``dataset``, with its mask when asked."""
        self._check_latent(latent)
        if mask is not None and mask not in MASK_STYLES:
            raise ExploreError(f"mask style must be one of {MASK_STYLES}, got {mask!r}")
        ds = self._model(model).atlas.dataset(dataset)
        if not 0 <= slot < ds.meta["options"]["top_k"]:
            raise ExploreError(f"slot {slot} is outside 0..{ds.meta['options']['top_k'] - 1}")
        return png_bytes(ds.thumbnail(latent, slot, mask))

    def browse(
        self, kind: str, model: str | None = None, dataset: str | None = None, limit: int = 50
    ) -> dict[str, Any]:
        """Latents of one atlas dataset: ``dense`` (most frequent first) or ``low_entropy``
        (references dominated by one class)."""
        m = self._model(model or self.models[0].name)
        ds = m.atlas.dataset(dataset or next(iter(m.atlas.datasets), None))
        if kind == "dense":
            ids = ds.dense()
        elif kind == "low_entropy":
            ids = ds.low_entropy()
        else:
            raise ExploreError(f"browse kind must be 'dense' or 'low_entropy', got {kind!r}")
        freq, entropy = ds.array("image_freq"), ds.array("label_entropy")
        labels = ds.array("top_labels")
        rows = [
            {
                "latent": j,
                "image_freq": float(freq[j]),
                "label_entropy": float(entropy[j]),
                "top_class": ds.class_name(int(labels[j, 0])),
            }
            for j in ids[: max(0, limit)]
        ]
        return {"kind": kind, "model": m.name, "dataset": ds.name, "total": len(ids), "rows": rows}
