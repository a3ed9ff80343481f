"""Typed, frozen configs loadable from YAML with ``key=value`` overrides.

Every stage describes its options as a frozen dataclass. ``load_config(Cls, path, overrides)``
reads an optional YAML file, applies dotted ``key=value`` overrides (``sae.l1_coefficient=1e-4``)
and converts every value to the annotated type, so a typo or a wrong type fails before any work
starts, with a message naming the key and the valid choices. Integers are read exactly (never
through ``float``); a float form such as ``1e3`` is accepted for an ``int`` only when integral.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is missing, unknown or of the wrong type."""


def _to_int(value: Any, key: str) -> int:
    """``value`` as an exact int: ints as they are, strings by ``int()``, else integral floats.

    Floats and float forms such as ``1e3`` are accepted only when integral; they are the only
    values that go through ``float`` (so ``12345678901234567891`` stays exact).
    """
    if isinstance(value, bool):
        raise ConfigError(f"{key}: {value!r} is not an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: {value!r} is not an integer") from None
    if not number.is_integer():
        raise ConfigError(f"{key}: {value!r} is not an integer")
    return int(number)


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (from YAML or a ``key=value`` string) to the annotated type ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_none and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}: cannot read {value!r} as {tp}: " + "; ".join(errors))
    if origin is typing.Literal:
        for choice in args:
            if value == choice or str(value) == str(choice):
                return choice
        raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
    if origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if origin in (tuple, list):
        if isinstance(value, str):
            text = value.strip()
            value = yaml.safe_load(text) if text.startswith("[") else text.split(",")
        if not isinstance(value, (list, tuple)):
            value = [value]
        item_type = args[0] if args else Any
        return tuple(_convert(v, item_type, f"{key}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        text = str(value).lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}: {value!r} is not a boolean (use true or false)")
    if tp is int:
        return _to_int(value, key)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: {value!r} is not a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: {value!r} is not a number") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build the dataclass ``cls`` from a plain dict, converting and validating every field.

    A class with a ``from_dict_select(data, prefix)`` classmethod picks the concrete class (and
    the keys it takes) itself, as ``SAEConfig`` does by ``arch``.
    """
    pick = getattr(cls, "from_dict_select", None)
    if pick is not None:
        cls, data = pick(data, prefix)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {[prefix + k for k in unknown]}; "
            f"valid keys: {[prefix + k for k in fields]}"
        )
    kwargs = {name: _convert(value, hints[name], prefix + name) for name, value in data.items()}
    missing = [
        prefix + n
        for n, f in fields.items()
        if n not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"missing required config key(s) {missing}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"invalid {cls.__name__}: {err}") from None


_ABSENT = object()


def flatten(data: dict[str, Any], leaves: tuple[str, ...] = (), prefix: str = "") -> dict[str, Any]:
    """``data`` with nested dicts spelled as dotted keys; empty dicts and the dotted keys in
    ``leaves`` stay whole values."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value and dotted not in leaves:
            out.update(flatten(value, leaves, f"{dotted}."))
        else:
            out[dotted] = value
    return out


def differing_keys(
    a: dict[str, Any],
    b: dict[str, Any],
    *,
    leaves: tuple[str, ...] = (),
    ignore: tuple[str, ...] = (),
    absent: Any = _ABSENT,
) -> list[str]:
    """Sorted dotted keys whose values differ between two nested dicts (see ``flatten``).

    A key missing on one side reads as ``absent``: by default it differs from every value; with
    ``absent=None`` a missing key equals an explicit null. Keys in ``ignore`` are left out.
    """
    fa, fb = flatten(a, leaves), flatten(b, leaves)
    keys = sorted(set(fa) | set(fb))
    return [k for k in keys if k not in ignore and fa.get(k, absent) != fb.get(k, absent)]


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as a JSON-ready dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _set_dotted(data: dict[str, Any], key: str, value: str) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {key}: cannot read {value!r} ({_yaml_problem(err)})") from None


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML parse error in one line: the problem and where it is."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or type(err).__name__
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def load_config(
    cls: type[T], path: str | Path | None = None, overrides: typing.Sequence[str] = ()
) -> T:
    """Read ``cls`` from an optional YAML file, then apply ``key=value`` overrides."""
    return from_dict(cls, read_config(path, overrides))


def read_config(
    path: str | Path | None = None, overrides: typing.Sequence[str] = ()
) -> dict[str, Any]:
    """The nested dict of an optional YAML file with ``key=value`` overrides applied (what
    ``load_config`` builds its dataclass from)."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"config file {path} is a folder: pass the YAML file inside it")
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(
                f"config file {path} is not valid YAML: {_yaml_problem(err)}; fix the file"
            ) from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file {path} is not a text file") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys to values")
        data = loaded
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, value = item.split("=", 1)
        _set_dotted(data, key.strip(), value)
    return data
