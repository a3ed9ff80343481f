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

With ``classify_split`` set, the masking protocol of ``patchsae classify`` also runs on the
adapted model over that split (``OUT/classify-*``, each resumable): its zero-shot, spliced and
"on" accuracies (only the top-k latents of the image's class kept) with the class latents
ranked by the base model's atlas and by the adapted model's; the zero-shot accuracy of the base
model; the adaptation gain = adapted minus base zero-shot accuracy; and per k the share of that
gain kept with base-model class latents, ``(on_k(base latents) - zero_shot) / gain`` (and the
same with adapted-model latents, for reference). All runs use the adapter's one class prompt
(``"a photo of a {name}."`` for the default ``ctx_init``).

Undefined values (a class on which no latent fires) are NaN in memory and null in JSON.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from patchsae.config import ConfigError
from patchsae.data.images import DataConfig
from patchsae.stats import Atlas, AtlasDataset, StatsConfig, compute_stats

from .config import AdaptError


@dataclass(frozen=True)
class CompareConfig:
    """One comparison: ``sae`` on layer ``layer`` of ``base`` (a CLIP; ``tokenizer`` when it has
    none) and ``adapted`` (an adapter folder, e.g. a ``patchsae adapt`` run), over the labelled
    images ``data``. ``classify_split``: the split of ``data.source`` the masking protocol
    classifies (None: no masking; the atlases' own split is the paper's same-split protocol),
    with ``ks`` latents per class (0 = all)."""

    sae: str
    base: str
    adapted: str
    data: DataConfig
    layer: int
    out: str
    tokenizer: str | None = None
    k: int = 10
    classify_split: str | None = None
    ks: tuple[int, ...] = (1, 2, 5, 10, 50, 100, 0)
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


def _summary(folder: Path) -> dict[tuple[str, str], float]:
    """``(condition, k)`` -> accuracy from a classify run's ``summary.csv``."""
    with open(folder / "summary.csv", newline="") as f:
        return {(r["condition"], r["k"]): float(r["accuracy"]) for r in csv.DictReader(f)}


def masking(cfg: CompareConfig) -> dict[str, Any]:
    """The classify runs of the module docstring and the numbers drawn from them."""
    from patchsae.backbones import load_backbone
    from patchsae.classify import ClassifyConfig, classify

    out = Path(cfg.out)
    data = replace(cfg.data, split=cfg.classify_split)
    templates = load_backbone(cfg.adapted, device=cfg.device).templates
    common = {
        "data": data,
        "templates": templates,
        "batch_size": cfg.batch_images or 32,
        "num_workers": cfg.num_workers,
        "device": cfg.device,
        "plot": False,
    }
    zero_shot = classify(
        ClassifyConfig(
            model=cfg.base,
            out=str(out / "classify-zero-shot"),
            tokenizer=cfg.tokenizer,
            selections=(),
            **common,
        )
    )
    runs = {}
    for source in ("base", "adapted"):
        runs[source] = _summary(
            classify(
                ClassifyConfig(
                    model=cfg.adapted,
                    out=str(out / f"classify-{source}-latents"),
                    sae=cfg.sae,
                    layer=cfg.layer,
                    atlas=str(out / f"atlas-{source}"),
                    selections=("class",),
                    ks=cfg.ks,
                    modes=("on",),
                    same_split=cfg.classify_split == cfg.data.split,
                    **common,
                )
            )
        )
    zs = _summary(zero_shot)[("unspliced", "")]
    adapted = runs["base"][("unspliced", "")]
    gain = adapted - zs
    rows = []
    for k in cfg.ks:
        key = ("on", str(k) if k else "all")
        on_base, on_adapted = runs["base"][key], runs["adapted"][key]
        rows.append(
            {
                "k": key[1],
                "on_base_latents": on_base,
                "on_adapted_latents": on_adapted,
                "gain_kept_base_latents": (on_base - zs) / gain if gain else float("nan"),
                "gain_kept_adapted_latents": (on_adapted - zs) / gain if gain else float("nan"),
            }
        )
    return {
        "split": cfg.classify_split,
        "protocol": "same_split" if cfg.classify_split == cfg.data.split else "held_out",
        "zero_shot_base": zs,
        "adapted": adapted,
        "adapted_spliced": runs["base"][("spliced", "")],
        "adaptation_gain": gain,
        "by_k": rows,
    }


def compare(cfg: CompareConfig) -> Path:
    """Both atlases (computed or finished), the comparison, the masking runs (with
    ``classify_split``) and the report in ``cfg.out``; returns the report's path."""
    from .report import write_report

    base = _atlas(cfg, cfg.base, "atlas-base")
    adapted = _atlas(cfg, cfg.adapted, "atlas-adapted")
    result = compare_atlases(base, adapted, cfg.k, cfg.by)
    result["masking"] = masking(cfg) if cfg.classify_split is not None else None
    return write_report(result, cfg, Path(cfg.out))
