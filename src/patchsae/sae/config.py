"""SAE configs: the options every architecture shares and each architecture's own.

``SAEConfig(arch=..., **options)`` returns the config class registered for ``arch``
(``ReluConfig``, ``TopKConfig``, ``BatchTopKConfig``, ``JumpReLUConfig``, or one added with
``register_sae(name, config=...)``), which holds the shared fields and that architecture's
options only. Configs import no architecture: a config validates on its own, and
``patchsae.sae.registry`` builds the model. The keys read from YAML and ``cfg.json`` are the
same flat keys as always (see docs/sae.md for the rule on another architecture's keys).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Literal

from patchsae.config import ConfigError, _convert, from_dict, to_dict
from patchsae.sae.recipe import MSE_NORMALIZATIONS, MseNormalization

DTYPES = ("float32", "float64", "bfloat16", "float16")
INITS = ("patchsae", "tied")
Init = Literal["patchsae", "tied"]

_CONFIGS: dict[str, type[SAEConfig]] = {}


def register_config(arch: str, cls: type[SAEConfig]) -> None:
    """Make ``cls`` the config of ``arch`` (``register_sae`` calls it for each architecture)."""
    if arch in _CONFIGS and _CONFIGS[arch] is not cls:
        raise ValueError(f"SAE arch {arch!r} already has the config {_CONFIGS[arch].__name__}")
    _CONFIGS[arch] = cls


def config_class(arch: str) -> type[SAEConfig]:
    """The config class of ``arch``; ConfigError listing the known names otherwise."""
    if arch not in _CONFIGS:
        raise ConfigError(f"unknown SAE arch {arch!r}; choose one of {sorted(_CONFIGS)}")
    return _CONFIGS[arch]


def _keys(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _is_default(cls: type[SAEConfig], key: str, value: Any) -> bool:
    default = next(f.default for f in dataclasses.fields(cls) if f.name == key)
    try:
        return _convert(value, typing.get_type_hints(cls)[key], key) == default
    except ConfigError:
        return False


def select(
    data: dict[str, Any], prefix: str = "", saved: bool = False
) -> tuple[type[SAEConfig], dict[str, Any]]:
    """The config class of ``data["arch"]`` (default relu) and ``data`` without the keys that
    are another architecture's options.

    Such a key is dropped when ``saved`` (files written before configs were per architecture
    carry every option) or when it holds that option's default (a shared YAML file switched to
    another arch by an override); otherwise it is a ConfigError naming the key and the arch.
    Keys no architecture has stay, for the caller to refuse.
    """
    arch = str(data.get("arch", SAEConfig.arch))
    cls = config_class(arch)
    own, kept = _keys(cls), {}
    for key, value in data.items():
        owners = [c for c in _CONFIGS.values() if key in _keys(c)]
        if key in own or not owners:
            kept[key] = value
        elif not saved and not any(_is_default(c, key, value) for c in owners):
            users = sorted(a for a, c in _CONFIGS.items() if key in _keys(c))
            raise ConfigError(
                f"{prefix}{key}={value!r} is an option of arch {'/'.join(users)}, not of "
                f"{prefix}arch={arch}; remove it or change {prefix}arch"
            )
    return cls, kept


def from_saved(data: dict[str, Any]) -> SAEConfig:
    """The config of a saved ``cfg.json`` / training config, whatever options it carries."""
    cls, kept = select(data, saved=True)
    return from_dict(cls, kept)


def own_options(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` (a saved config dict) without the options of other architectures; as it is
    when its arch is unknown."""
    try:
        return select(data, saved=True)[1]
    except ConfigError:
        return data


def merged(base: SAEConfig, entry: dict[str, Any], prefix: str = "") -> SAEConfig:
    """``base`` with the keys of ``entry`` (a sweep entry). An entry that changes ``arch``
    inherits only the values ``base`` sets away from its own defaults, and of those only the
    options its arch has: the rest are the new arch's defaults (its own ``init``, say)."""
    arch = entry.get("arch", base.arch)
    inherited = to_dict(base)
    if str(arch) != base.arch:
        defaults = to_dict(type(base)(arch=base.arch))
        inherited = {k: v for k, v in inherited.items() if v != defaults[k]}
        inherited = own_options({**inherited, "arch": arch})
    return from_dict(SAEConfig, {**inherited, **entry}, prefix=prefix)


class _ByArch(type):
    """``SAEConfig(arch=..., ...)`` builds the config class registered for ``arch``."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if cls is SAEConfig:
            if args:
                raise TypeError("SAEConfig takes keyword arguments only")
            cls, kwargs = select(kwargs)
        return super().__call__(*args, **kwargs)


@dataclass(frozen=True)
class SAEConfig(metaclass=_ByArch):
    """What every SAE has: its arch, sizes, dtype, decoder constraint and init (whose default
    each architecture sets).

    Build it as ``SAEConfig(arch=..., **options)``: the instance is the arch's own config class.
    """

    arch: str = "relu"
    d_in: int = 768
    d_sae: int = 49152
    dtype: str = "float32"
    normalize_decoder: bool = True
    init: Init = "patchsae"

    @classmethod
    def from_dict_select(
        cls, data: dict[str, Any], prefix: str = ""
    ) -> tuple[type[SAEConfig], dict[str, Any]]:
        """``from_dict``'s hook: the class for ``data`` (see ``select``); a concrete class
        reads a missing ``arch`` as its own."""
        if cls is not SAEConfig:
            data = {"arch": cls.arch, **data}
        return select(data, prefix)

    def __post_init__(self) -> None:
        if type(self) is not config_class(self.arch):
            raise ConfigError(
                f"arch {self.arch!r} takes {config_class(self.arch).__name__}, not "
                f"{type(self).__name__}; build it with SAEConfig(arch={self.arch!r}, ...)"
            )
        if self.d_in < 1 or self.d_sae < 1:
            raise ConfigError(
                f"d_in and d_sae must be >= 1, got d_in={self.d_in}, d_sae={self.d_sae}"
            )
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype {self.dtype!r} is not one of {list(DTYPES)}")
        if self.init not in INITS:
            raise ConfigError(f"init {self.init!r} is not one of {list(INITS)}")

    def _nonnegative(self, *names: str) -> None:
        for name in names:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class ReluConfig(SAEConfig):
    """``relu``: the PatchSAE objective (normalised MSE + L1 + ghost grads, docs/recipe.md),
    with PatchSAE's own untied init by default (docs/sae.md, "Defaults")."""

    arch: str = "relu"
    l1_coefficient: float = 8e-5
    use_ghost_grads: bool = True
    mse_cls_coefficient: float = 1.0
    mse_normalization: MseNormalization = "patchsae"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mse_normalization not in MSE_NORMALIZATIONS:
            raise ConfigError(
                f"mse_normalization {self.mse_normalization!r} is not one of "
                f"{list(MSE_NORMALIZATIONS)}"
            )
        self._nonnegative("l1_coefficient", "mse_cls_coefficient")


@dataclass(frozen=True)
class TopKConfig(SAEConfig):
    """``topk``: k active latents per token, plus ``aux_coefficient`` * AuxK on the dead.

    Defaults from Gao et al. 2024: the encoder starts as the decoder's transpose (``tied``),
    ``aux_k`` 512 and ``aux_coefficient`` 1/32 (docs/sae.md, "Defaults").
    """

    arch: str = "topk"
    init: Init = "tied"
    k: int = 64
    aux_k: int = 512
    aux_coefficient: float = 1 / 32

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.k <= self.d_sae:
            raise ConfigError(
                f"k={self.k} must be between 1 and d_sae={self.d_sae}; lower k or raise d_sae"
            )
        if self.aux_k < 1:
            raise ConfigError(f"aux_k must be >= 1, got {self.aux_k}")
        self._nonnegative("aux_coefficient")


@dataclass(frozen=True)
class BatchTopKConfig(TopKConfig):
    """``batchtopk``: ``topk``'s options and the EMA momentum of the inference threshold."""

    arch: str = "batchtopk"
    threshold_momentum: float = 0.99

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.threshold_momentum < 1:
            raise ConfigError(
                f"threshold_momentum must be in [0, 1), got {self.threshold_momentum}"
            )


@dataclass(frozen=True)
class JumpReLUConfig(SAEConfig):
    """``jumprelu``: threshold init, STE bandwidth and the L0 coefficient.

    Defaults from Rajamanoharan et al. 2024 (threshold and bandwidth 0.001) and SAELens's
    JumpReLU training SAE (encoder initialised as the decoder's transpose, ``tied``).
    """

    arch: str = "jumprelu"
    init: Init = "tied"
    jumprelu_threshold_init: float = 0.001
    jumprelu_bandwidth: float = 0.001
    l0_coefficient: float = 1e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.jumprelu_threshold_init <= 0 or self.jumprelu_bandwidth <= 0:
            raise ConfigError(
                "jumprelu_threshold_init and jumprelu_bandwidth must be > 0, got "
                f"{self.jumprelu_threshold_init} and {self.jumprelu_bandwidth}"
            )
        self._nonnegative("l0_coefficient")


for _arch, _cls in (
    ("relu", ReluConfig),
    ("topk", TopKConfig),
    ("batchtopk", BatchTopKConfig),
    ("jumprelu", JumpReLUConfig),
):
    register_config(_arch, _cls)
