"""SAEConfig: the architecture, size, dtype and loss options of one sparse autoencoder."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from patchsae.config import ConfigError
from patchsae.sae.recipe import MSE_NORMALIZATIONS, MseNormalization

DTYPES = ("float32", "float64", "bfloat16", "float16")
INITS = ("patchsae", "tied")


@dataclass(frozen=True)
class SAEConfig:
    """One SAE. Fields used by one architecture only are ignored by the others.

    ``relu`` uses l1_coefficient, use_ghost_grads, mse_cls_coefficient, mse_normalization;
    ``topk`` / ``batchtopk`` use k, aux_k, aux_coefficient (and threshold_momentum);
    ``jumprelu`` uses the jumprelu_* fields and l0_coefficient. See docs/sae.md.
    """

    arch: str = "relu"
    d_in: int = 768
    d_sae: int = 49152
    dtype: str = "float32"
    l1_coefficient: float = 8e-5
    use_ghost_grads: bool = True
    mse_cls_coefficient: float = 1.0
    mse_normalization: MseNormalization = "patchsae"
    normalize_decoder: bool = True
    k: int = 64
    aux_k: int = 512
    aux_coefficient: float = 1 / 32
    threshold_momentum: float = 0.99
    jumprelu_threshold_init: float = 0.001
    jumprelu_bandwidth: float = 0.001
    l0_coefficient: float = 1e-3
    init: Literal["patchsae", "tied"] = "patchsae"

    def __post_init__(self) -> None:
        from patchsae.sae.registry import available_archs, sae_class

        archs = available_archs()
        if self.arch not in archs:
            raise ConfigError(f"unknown SAE arch {self.arch!r}; choose one of {archs}")
        if self.d_in < 1 or self.d_sae < 1:
            raise ConfigError(
                f"d_in and d_sae must be >= 1, got d_in={self.d_in}, d_sae={self.d_sae}"
            )
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype {self.dtype!r} is not one of {list(DTYPES)}")
        if self.mse_normalization not in MSE_NORMALIZATIONS:
            raise ConfigError(
                f"mse_normalization {self.mse_normalization!r} is not one of "
                f"{list(MSE_NORMALIZATIONS)}"
            )
        if self.init not in INITS:
            raise ConfigError(f"init {self.init!r} is not one of {list(INITS)}")
        if getattr(sae_class(self.arch), "uses_k", False):
            if not 1 <= self.k <= self.d_sae:
                raise ConfigError(
                    f"k={self.k} must be between 1 and d_sae={self.d_sae}; lower k or raise d_sae"
                )
            if self.aux_k < 1:
                raise ConfigError(f"aux_k must be >= 1, got {self.aux_k}")
        for name in ("l1_coefficient", "mse_cls_coefficient", "aux_coefficient", "l0_coefficient"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.threshold_momentum < 1:
            raise ConfigError(
                f"threshold_momentum must be in [0, 1), got {self.threshold_momentum}"
            )
        if self.jumprelu_threshold_init <= 0 or self.jumprelu_bandwidth <= 0:
            raise ConfigError(
                "jumprelu_threshold_init and jumprelu_bandwidth must be > 0, got "
                f"{self.jumprelu_threshold_init} and {self.jumprelu_bandwidth}"
            )
