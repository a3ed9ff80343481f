"""SAE architectures by name: ``register_sae(name)(cls)``, ``make_sae(cfg)``."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from patchsae.config import ConfigError

if TYPE_CHECKING:
    from patchsae.sae.base import SAE
    from patchsae.sae.config import SAEConfig

_BUILTIN_MODULES = ("patchsae.sae.relu", "patchsae.sae.topk", "patchsae.sae.jumprelu")
_REGISTRY: dict[str, type[SAE]] = {}

S = TypeVar("S", bound="type[SAE]")


def register_sae(name: str) -> Callable[[S], S]:
    """Class decorator registering an SAE subclass under ``name``."""

    def decorator(cls: S) -> S:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"SAE arch {name!r} is already registered by {_REGISTRY[name]}")
        _REGISTRY[name] = cls
        cls.arch = name
        return cls

    return decorator


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def available_archs() -> list[str]:
    """Names of every registered architecture, sorted."""
    _load_builtins()
    return sorted(_REGISTRY)


def sae_class(name: str) -> type[SAE]:
    """The class registered under ``name``; ConfigError listing the known names otherwise."""
    _load_builtins()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown SAE arch {name!r}; choose one of {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def make_sae(cfg: SAEConfig) -> SAE:
    """A freshly initialised SAE of architecture ``cfg.arch``."""
    return sae_class(cfg.arch)(cfg)
