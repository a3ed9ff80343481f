"""The remapping analysis (``patchsae compare``): one SAE, the base and the adapted CLIP.

The same SAE reads the hook activations of both models over one labelled dataset; the latent
atlas (:mod:`patchsae.stats`) is computed for each (``OUT/atlas-base``, ``OUT/atlas-adapted``,
each resumable), and the two are compared:

- per latent: image frequency and mean activation in both models and their shifts; Spearman
  rank correlations over the latents that fire in either model; latents that *appear* (fire on
  no image of the base, on some of the adapted) or *vanish* (the reverse);
- per class c, with ``top_k(model, c)`` = the first ``k`` latents of the atlas's class ranking
  (``AtlasDataset.class_rankings(by)``) among those with a positive value for c:
  ``jaccard`` = |top_k(base, c) & top_k(adapted, c)| / |union|;
  ``adapted_evidence_on_base_top`` = sum of the adapted model's ``by`` values of class c over
  top_k(base, c) / their sum over all latents (the share of the adapted model's class evidence
  carried by latents the base model already ranked top for c);
  ``adapted_evidence_on_adapted_top`` and ``base_evidence_on_base_top``, the same shares on each
  model's own top-k, as the reference points.

Undefined values (a class on which no latent fires) are NaN in memory and null in JSON.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from patchsae.config import ConfigError
from patchsae.data.images import DataConfig
from patchsae.stats import Atlas, AtlasDataset, StatsConfig, compute_stats

from .config import AdaptError


@dataclass(frozen=True)
class CompareConfig:
    """One comparison: ``sae`` on layer ``layer`` of ``base`` (a CLIP) and ``adapted`` (an
    adapter folder, e.g. a ``patchsae adapt`` run), over the labelled images ``data``."""

    sae: str
    base: str
    adapted: str
    data: DataConfig
    layer: int
    out: str
    k: int = 10
    by: Literal["class_counts", "class_mean_act"] = "class_counts"
    threshold: float = 0.2
    aggregate: Literal["mean", "max"] = "mean"
    include_cls: bool = True
    batch_images: int | None = None
    num_workers: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ConfigError(f"k must be >= 1, got {self.k}")


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN under 2 points or no spread."""
    try:
        from scipy.stats import rankdata
    except ImportError:
        raise AdaptError("compare needs scipy: pip install 'patchsae[atlas]'") from None
    if len(a) < 2:
        return float("nan")
    ra, rb = rankdata(a), rankdata(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def latent_changes(
    base: dict[str, np.ndarray], adapted: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Per-latent arrays and summary numbers from the two atlases' ``image_freq`` and
    ``mean_act`` (each (m,))."""
    fb, fa = np.asarray(base["image_freq"]), np.asarray(adapted["image_freq"])
    ab, aa = np.asarray(base["mean_act"]), np.asarray(adapted["mean_act"])
    alive = (fb > 0) | (fa > 0)
    arrays = {
        "image_freq_base": fb,
        "image_freq_adapted": fa,
        "freq_shift": fa - fb,
        "mean_act_base": ab,
        "mean_act_adapted": aa,
        "mean_act_shift": aa - ab,
        "appears": (fb == 0) & (fa > 0),
        "vanishes": (fb > 0) & (fa == 0),
    }
    summary = {
        "d_sae": int(len(fb)),
        "alive_base": int((fb > 0).sum()),
        "alive_adapted": int((fa > 0).sum()),
        "appear": int(arrays["appears"].sum()),
        "vanish": int(arrays["vanishes"].sum()),
        "spearman_image_freq": _spearman(fb[alive], fa[alive]),
        "spearman_mean_act": _spearman(ab[alive], aa[alive]),
        "mean_abs_freq_shift": float(np.abs(fa - fb)[alive].mean()) if alive.any() else 0.0,
    }
    return arrays, summary


def top_set(ranking_m: np.ndarray, values_m: np.ndarray, k: int) -> np.ndarray:
    """The first ``k`` latents of ``ranking_m`` whose value is positive."""
    ranked = ranking_m[values_m[ranking_m] > 0]
    return ranked[:k]


def _share(values_m: np.ndarray, latents: np.ndarray) -> float:
    total = float(values_m.sum())
    return float(values_m[latents].sum()) / total if total > 0 else float("nan")


def class_overlap(
    rank_base: np.ndarray,
    rank_adapted: np.ndarray,
    values_base: np.ndarray,
    values_adapted: np.ndarray,
    k: int,
) -> list[dict[str, Any]]:
    """Per class (rows of the (c, m) rankings and values): the top-k sets and the measures of
    the module docstring."""
    rows = []
    for c in range(values_base.shape[0]):
        vb, va = np.asarray(values_base[c], np.float64), np.asarray(values_adapted[c], np.float64)
        tb, ta = top_set(rank_base[c], vb, k), top_set(rank_adapted[c], va, k)
        union = len(np.union1d(tb, ta))
        rows.append(
            {
                "class": c,
                "top_base": tb.tolist(),
                "top_adapted": ta.tolist(),
                "jaccard": len(np.intersect1d(tb, ta)) / union if union else float("nan"),
                "adapted_evidence_on_base_top": _share(va, tb),
                "adapted_evidence_on_adapted_top": _share(va, ta),
                "base_evidence_on_base_top": _share(vb, tb),
            }
        )
    return rows


def _mean_defined(values: list[float]) -> float:
    """Mean of the values that are not NaN (NaN when none is)."""
    defined = [v for v in values if not np.isnan(v)]
    return float(np.mean(defined)) if defined else float("nan")


def _atlas(cfg: CompareConfig, model: str, name: str) -> AtlasDataset:
    folder = compute_stats(
        StatsConfig(
            sae=cfg.sae,
            out=str(Path(cfg.out) / name),
            model=model,
            data=cfg.data,
            layer=cfg.layer,
            threshold=cfg.threshold,
            aggregate=cfg.aggregate,
            include_cls=cfg.include_cls,
            batch_images=cfg.batch_images,
            thumbnails=False,
            num_workers=cfg.num_workers,
            device=cfg.device,
        )
    )
    return Atlas.open(folder.parent.parent).dataset(folder.name)


def compare_atlases(base: AtlasDataset, adapted: AtlasDataset, k: int, by: str) -> dict[str, Any]:
    """Every number of the comparison (arrays under ``latents``, the rest JSON-ready)."""
    if not (base.meta["has_labels"] and adapted.meta["has_labels"]):
        raise AdaptError("compare needs labelled images: the atlases have no class statistics")
    if base.class_names != adapted.class_names or base.meta["n_images"] != adapted.meta["n_images"]:
        raise AdaptError(
            "the two atlases were computed on different images or classes: compare them on the "
            "same dataset"
        )
    arrays, summary = latent_changes(
        {key: base.array(key) for key in ("image_freq", "mean_act")},
        {key: adapted.array(key) for key in ("image_freq", "mean_act")},
    )
    rows = class_overlap(
        base.class_rankings(by), adapted.class_rankings(by), base.array(by), adapted.array(by), k
    )
    for row in rows:
        row["class_name"] = base.class_names[row["class"]]
    classes = {
        key: _mean_defined([r[key] for r in rows])
        for key in (
            "jaccard",
            "adapted_evidence_on_base_top",
            "adapted_evidence_on_adapted_top",
            "base_evidence_on_base_top",
        )
    }
    return {"latents": arrays, "latent_summary": summary, "classes": rows, "class_means": classes}


def compare(cfg: CompareConfig) -> Path:
    """Both atlases (computed or finished), the comparison and its report in ``cfg.out``;
    returns the report's path."""
    from .report import write_report

    base = _atlas(cfg, cfg.base, "atlas-base")
    adapted = _atlas(cfg, cfg.adapted, "atlas-adapted")
    return write_report(compare_atlases(base, adapted, cfg.k, cfg.by), cfg, Path(cfg.out))
