"""The trainer's options: one frozen dataclass, loadable from YAML with ``key=value`` overrides.

``fidelity`` takes ``patchsae.metrics.fidelity.FidelityConfig`` (re-exported here), the same
options as ``patchsae evaluate``'s fidelity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from patchsae.config import ConfigError, differing_keys, from_dict, read_config
from patchsae.data.images import LEGACY_DATA_DEFAULTS, DataConfig
from patchsae.data.store import METADATA, StoreError, StoreMetadata
from patchsae.metrics.fidelity import FidelityConfig
from patchsae.paths import resolve_local
from patchsae.sae.config import SAEConfig, merged, own_options
from patchsae.sae.geometric_median import InitMethod


@dataclass(frozen=True)
class TrainConfig:
    """How to train one SAE, or several side by side (``sweep``), on one activation stream.

    The source is ``store`` (an activation store folder) when set; ``model``, if also set, must
    then be the backbone the store was extracted from, and ``data`` is unused. Without ``store``,
    activations are computed on the fly by ``model`` on the images of ``data`` (streaming).
    ``fidelity`` adds zero-shot CLIP fidelity to every evaluation. ``prefetch_batches`` batches
    are read ahead on a background thread (pinned for a CUDA device; 0 reads on the training
    thread); ``tf32`` lets CUDA float32 matmuls use TF32 (faster, about 10 mantissa bits).
    ``sync_every`` steps pass between the host reads of the step's log values and the checks of
    its loss (1: every step; N > 1: one read per N steps, the same metrics lines, up to N - 1
    updates past a non-finite loss before the run stops; see docs/training.md). The
    defaults are the PatchSAE recipe; ``configs/patchsae.yaml`` spells it out.
    """

    sae: SAEConfig = field(default_factory=SAEConfig)
    store: str | None = None
    model: str | None = None
    data: DataConfig | None = None
    layer: int | None = None
    extract_batch_size: int = 64
    shuffle_buffer_images: int = 1024
    batch_mode: Literal["images", "tokens"] = "images"
    batch_images: int = 128
    batch_tokens: int = 4096
    window_images: int = 64
    tokens: Literal["all", "all_with_prompts", "cls", "patches"] = "all"
    total_images: int | None = 2_621_440
    total_tokens: int | None = None
    lr: float = 4e-4
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    warmup_steps: int = 500
    b_dec_init: InitMethod = "geometric_median_images"
    b_dec_init_maxiter: int = 100
    dead_feature_window: int = 64
    seed: int = 42
    out: str = "runs/patchsae"
    checkpoint_every: int = 1000
    eval_every: int = 1000
    eval_images: int = 0
    eval_batch_images: int = 32
    log_every: int = 10
    wandb_project: str | None = None
    device: str = "cpu"
    prefetch_batches: int = 2
    tf32: bool = False
    sync_every: int = 1
    sweep: tuple[dict[str, Any], ...] = ()
    fidelity: FidelityConfig | None = None

    def __post_init__(self) -> None:
        if self.store is None and self.model is None:
            raise ConfigError(
                "set a source: store=DIR (an activation store) or model=NAME with "
                "data.source=IMAGES (streaming)"
            )
        if self.store is None and self.data is None:
            raise ConfigError("streaming from model= needs data.source=IMAGES too (or store=DIR)")
        if self.total_images is None and self.total_tokens is None:
            raise ConfigError("set total_images or total_tokens (or both) to bound the run")
        positive = {
            "batch_images": self.batch_images,
            "batch_tokens": self.batch_tokens,
            "window_images": self.window_images,
            "extract_batch_size": self.extract_batch_size,
            "shuffle_buffer_images": self.shuffle_buffer_images,
            "checkpoint_every": self.checkpoint_every,
            "eval_every": self.eval_every,
            "eval_batch_images": self.eval_batch_images,
            "log_every": self.log_every,
            "warmup_steps": self.warmup_steps,
            "b_dec_init_maxiter": self.b_dec_init_maxiter,
            "total_images": self.total_images,
            "total_tokens": self.total_tokens,
        }
        bad = [k for k, v in positive.items() if v is not None and v <= 0]
        if bad:
            raise ConfigError(f"{bad} must be positive integers")
        if self.eval_images < 0 or self.dead_feature_window < 0 or self.prefetch_batches < 0:
            raise ConfigError("eval_images, dead_feature_window and prefetch_batches must be >= 0")
        if isinstance(self.sync_every, bool) or not isinstance(self.sync_every, int):
            raise ConfigError(f"sync_every must be an integer >= 1, got {self.sync_every!r}")
        if self.sync_every < 1:
            raise ConfigError(
                f"sync_every must be >= 1 (1 reads the step's values every step), got "
                f"{self.sync_every}"
            )
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be a positive finite number, got {self.lr}")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ConfigError(
                f"adam_betas must be two numbers in [0, 1), got {list(self.adam_betas)} "
                "(the default is [0.9, 0.999])"
            )
        if not (math.isfinite(self.adam_eps) and self.adam_eps > 0):
            raise ConfigError(f"adam_eps must be a positive finite number, got {self.adam_eps}")
        if self.batch_mode == "tokens" and self.b_dec_init == "geometric_median_images":
            raise ConfigError(
                "b_dec_init=geometric_median_images needs whole images: use batch_mode=images, "
                "or b_dec_init=geometric_median_tokens with batch_mode=tokens"
            )
        self.sae_configs()

    def sae_configs(self) -> list[SAEConfig]:
        """The SAE configs to train: ``sae`` alone, or ``sae`` merged with each sweep entry."""
        if not self.sweep:
            return [self.sae]
        return [merged(self.sae, entry, f"sweep[{i}].") for i, entry in enumerate(self.sweep)]

    def member_names(self) -> list[str]:
        """Output subfolder of each SAE: ``""`` (the run folder) alone, ``sae-00``... in a sweep."""
        if not self.sweep:
            return [""]
        return [f"sae-{i:02d}" for i in range(len(self.sweep))]


# A run shorter than this many dead-feature windows barely uses ghost grads / AuxK: latents are
# only called dead after one full window without firing.
MIN_DEAD_WINDOWS = 4


def check_schedule(cfg: TrainConfig, n_steps: int) -> list[str]:
    """Warnings for a run of ``n_steps`` too short for its schedule, worst first.

    A warm-up as long as the run is a warning, not an error: a run of a few steps of the recipe
    (the golden first step) is legitimate; ``train`` prints these at the start and again in its
    closing summary.
    """
    warnings = []
    if cfg.warmup_steps >= n_steps:
        warnings.append(
            f"warmup_steps={cfg.warmup_steps} but the run has only {n_steps} steps: the learning "
            f"rate never reaches lr={cfg.lr} and the SAE stays undertrained; set warmup_steps="
            f"{max(1, n_steps // 20)} (5% of the run) or train longer (total_images= / "
            "total_tokens=)"
        )
    elif cfg.warmup_steps > n_steps // 4:
        warnings.append(
            f"warm-up takes {cfg.warmup_steps} of the run's {n_steps} steps (over a quarter); "
            f"consider warmup_steps={max(1, n_steps // 20)}"
        )
    if cfg.dead_feature_window and n_steps < MIN_DEAD_WINDOWS * cfg.dead_feature_window:
        warnings.append(
            f"the run's {n_steps} steps are under {MIN_DEAD_WINDOWS} dead-feature windows of "
            f"{cfg.dead_feature_window} steps: dead latents are barely revived; lower "
            "dead_feature_window or train longer"
        )
    if cfg.checkpoint_every > n_steps:
        warnings.append(
            f"checkpoint_every={cfg.checkpoint_every} exceeds the run's {n_steps} steps: nothing "
            "is saved before the end, so an interrupted run starts over"
        )
    return warnings


def load_train_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """The TrainConfig of a YAML file and ``key=value`` overrides, with what a store fixes
    filled in from it (see :func:`with_store_defaults`)."""
    return from_dict(TrainConfig, with_store_defaults(read_config(path, overrides)))


def with_store_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` (a raw TrainConfig dict) with ``sae.d_in`` taken from its store when not given.

    A given ``sae.d_in`` or ``model`` that disagrees with the store is one ConfigError naming
    every value to change. Without ``store``, or when it cannot be read (the trainer then says
    why), ``data`` is returned unchanged.
    """
    store = data.get("store")
    if not isinstance(store, str):
        return data
    try:
        meta = StoreMetadata.load(Path(store) / METADATA)
    except (StoreError, OSError, ValueError):
        return data
    sae = dict(data.get("sae") or {})
    name = meta.backbone.get("name")
    fixes = []
    if sae.get("d_in") is None:
        sae["d_in"] = meta.d_model
    elif sae["d_in"] != meta.d_model:
        fixes.append(f"sae.d_in={meta.d_model} (not {sae['d_in']})")
    model = data.get("model")
    if isinstance(model, str) and name is not None and resolve_local(model) != name:
        fixes.append(f"model=null (not {model!r})")
    if fixes:
        raise ConfigError(
            f"the store {store} holds activations of width {meta.d_model} from {name!r}: set "
            + " and ".join(fixes)
        )
    return {**data, "sae": sae}


# Keys that may change between a run and its resumption: they do not touch the maths.
RESUMABLE_KEYS = ("device", "wandb_project", "out", "log_every", "prefetch_batches", "sync_every")


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two ``to_dict`` configs (ignoring RESUMABLE_KEYS);
    ``sweep`` compares whole, and a data option the saved run predates reads as its legacy
    default; the saved ``sae`` drops the options of other architectures (runs saved before
    configs were per architecture carry them all)."""
    if isinstance(saved.get("sae"), dict):
        saved = {**saved, "sae": own_options(saved["sae"])}
    if isinstance(saved.get("data"), dict):
        saved = {**saved, "data": {**LEGACY_DATA_DEFAULTS, **saved["data"]}}
    return differing_keys(saved, current, leaves=("sweep",), ignore=RESUMABLE_KEYS, absent=None)
