"""SAE architectures by name: ``register_sae(name)(cls)``, ``make_sae(cfg)``.

Each architecture registers its model class with its config class (``cls.config_class``, or
``config=``); configs live in ``patchsae.sae.config`` and import no model, so the built-in
models are imported only when one is built or listed.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from patchsae.config import ConfigError
from patchsae.sae.config import SAEConfig, register_config

if TYPE_CHECKING:
    from patchsae.sae.base import SAE

_BUILTIN_MODULES = ("patchsae.sae.relu", "patchsae.sae.topk", "patchsae.sae.jumprelu")
_REGISTRY: dict[str, type[SAE]] = {}

S = TypeVar("S", bound="type[SAE]")


def register_sae(name: str, config: type[SAEConfig] | None = None) -> Callable[[S], S]:
    """Class decorator registering an SAE subclass under ``name``, with its options
    ``config`` (default: the class's ``config_class``, e.g. inherited from a built-in)."""

    def decorator(cls: S) -> S:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"SAE arch {name!r} is already registered by {_REGISTRY[name]}")
        register_config(name, config or cls.config_class)
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
