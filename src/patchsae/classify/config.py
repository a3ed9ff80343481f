"""``ClassifyConfig``: what ``patchsae classify`` runs (loadable from YAML, ``key=value``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from patchsae.classify.splice import Condition, Splice
from patchsae.config import ConfigError
from patchsae.data.images import DataConfig
from patchsae.metrics.fidelity import CLIP_IMAGENET_TEMPLATES, FidelityError, build_prompts

# k values of the paper's Fig. 5b; 0 means every latent ("all").
DEFAULT_KS = (1, 2, 5, 10, 50, 100, 500, 1000, 2000, 0)
SELECTIONS = ("class", "dataset", "random")
MODES = ("on", "off")
# Keys that do not change the results: a resumed run may change them.
RUNTIME_KEYS = ("device", "num_workers", "checkpoint_seconds", "plot", "text_cache")


class ClassifyError(ValueError):
    """The inputs cannot be classified as asked (one line: the problem and the fix)."""


@dataclass(frozen=True)
class ClassifyConfig:
    """Zero-shot classification of ``data`` by the CLIP ``model``; with ``sae``, also spliced at
    ``layer``; with ``selections`` and ``modes``, top-k latent masking (see docs/classify.md).

    ``atlas`` (+ ``atlas_dataset``) supplies the class- and dataset-level counts that rank the
    latents (``class``, ``dataset``); ``random`` ranks them by a permutation seeded by ``seed``.
    ``mask_by``: the latent set of the image's ground-truth class (``label``, the paper's oracle
    protocol) or of the class the unspliced model predicts (``predicted``). ``same_split`` must
    be true to evaluate on the images the atlas was computed on (the paper's protocol).
    ``tokens``, ``error``, ``offset``: see ``Splice``. ``limit`` images drawn with ``seed``
    (None: all, in source order).
    """

    model: str
    data: DataConfig
    out: str
    sae: str | None = None
    layer: int = -2
    atlas: str | None = None
    atlas_dataset: str | None = None
    selections: tuple[str, ...] = ("class",)
    ks: tuple[int, ...] = DEFAULT_KS
    modes: tuple[str, ...] = MODES
    mask_by: Literal["label", "predicted"] = "label"
    same_split: bool = False
    tokens: Literal["all", "cls", "patches"] = "all"
    error: bool = False
    offset: float = 0.0
    templates: tuple[str, ...] = CLIP_IMAGENET_TEMPLATES
    tokenizer: str | None = None
    text_cache: str | None = None
    seed: int = 0
    limit: int | None = None
    batch_size: int = 32
    num_workers: int = 0
    device: str = "cpu"
    checkpoint_seconds: float = 60.0
    plot: bool = True

    def __post_init__(self) -> None:
        if (
            self.batch_size < 1
            or self.num_workers < 0
            or (self.limit is not None and self.limit < 1)
        ):
            raise ConfigError("batch_size and limit must be >= 1, num_workers >= 0")
        bad = [s for s in self.selections if s not in SELECTIONS]
        if bad or len(set(self.selections)) != len(self.selections):
            raise ConfigError(f"selections must be distinct values of {SELECTIONS}, got {bad}")
        if any(m not in MODES for m in self.modes):
            raise ConfigError(f"modes must be values of {MODES}, got {self.modes}")
        if any(k < 0 for k in self.ks):
            raise ConfigError(f"ks must be >= 1 (0 means every latent), got {self.ks}")
        if self.masking and not self.ks:
            raise ConfigError("ks is empty: give the latent counts to keep or remove")
        if {"class", "dataset"} & set(self.selections) and self.masking and self.atlas is None:
            raise ConfigError(
                "class and dataset selections rank latents by an atlas's counts: set atlas=DIR "
                "(patchsae stats builds one), use selections=[random], or selections=[] to "
                "classify unspliced and spliced only"
            )
        try:
            build_prompts(["class"], self.templates)
        except FidelityError as err:
            raise ConfigError(f"templates: {err}") from None

    @property
    def masking(self) -> bool:
        """True when on / off conditions run (an SAE, a selection and a mode)."""
        return self.sae is not None and bool(self.selections) and bool(self.modes)

    @property
    def splice(self) -> Splice:
        return Splice(self.tokens, self.error, self.offset)

    def conditions(self) -> list[Condition]:
        """unspliced; spliced (with an SAE); on / off for each selection and k (masking)."""
        out = [Condition("unspliced")]
        if self.sae is not None:
            out.append(Condition("spliced"))
        if self.masking:
            ks = list(dict.fromkeys(self.ks))
            for sel in self.selections:
                out += [Condition(mode, sel, k) for k in ks for mode in self.modes]
        return out
