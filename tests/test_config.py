"""Typed YAML configs with key=value overrides."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from patchsae.config import ConfigError, from_dict, load_config, to_dict
from patchsae.paths import check_local_folder


@dataclass(frozen=True)
class Inner:
    lr: float = 4e-4
    arch: Literal["relu", "topk"] = "relu"


@dataclass(frozen=True)
class Outer:
    name: str
    steps: int = 10
    ghost: bool = True
    layers: tuple[int, ...] = (-2,)
    limit: int | None = None
    inner: Inner = field(default_factory=Inner)
    sweep: tuple[dict[str, Any], ...] = ()


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: run\nsteps: 5\ninner:\n  lr: 1.0e-3\n")
    cfg = load_config(Outer, path, ["inner.arch=topk", "steps=7", "layers=[3, -1]", "ghost=false"])
    assert cfg == Outer(
        name="run", steps=7, ghost=False, layers=(3, -1), inner=Inner(lr=1e-3, arch="topk")
    )


def test_values_are_converted_to_annotated_types():
    cfg = load_config(Outer, None, ["name=x", "inner.lr=8e-5", "limit=100", "steps=1e3"])
    assert cfg.inner.lr == pytest.approx(8e-5) and isinstance(cfg.inner.lr, float)
    assert cfg.limit == 100 and cfg.steps == 1000
    assert load_config(Outer, None, ["name=x", "limit=none"]).limit is None


def test_sweep_mappings():
    cfg = load_config(Outer, None, ["name=x", "sweep=[{lr: 1}, {arch: topk}]"])
    assert cfg.sweep == ({"lr": 1}, {"arch": "topk"})


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["name=x", "stepz=3"], "unknown config key"),
        (["name=x", "inner.arch=gated"], "not one of"),
        (["name=x", "steps=2.5"], "is not an integer"),
        (["name=x", "ghost=maybe"], "not a boolean"),
        (["steps=3"], "missing required"),
        (["name"], "key=value"),
    ],
)
def test_bad_values_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Outer, None, overrides)


def test_round_trip_through_dict():
    cfg = Outer(name="a", layers=(1, 2), inner=Inner(arch="topk"))
    assert from_dict(Outer, to_dict(cfg)) == cfg


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "nope.yaml")


def test_large_integers_stay_exact(tmp_path):
    big = 12345678901234567891
    assert load_config(Outer, None, ["name=x", f"steps={big}"]).steps == big
    assert load_config(Outer, None, ["name=x", f"limit={big}"]).limit == big
    assert from_dict(Outer, {"name": "x", "steps": big}).steps == big
    assert from_dict(Outer, {"name": "x", "steps": str(big)}).steps == big
    path = tmp_path / "c.yaml"
    path.write_text(f"name: x\nsteps: {big}\nlayers: [{big}, -1]\n")
    cfg = load_config(Outer, path)
    assert cfg.steps == big and cfg.layers == (big, -1)
    assert load_config(Outer, None, ["name=x", "steps=2.5e3", "limit=4.0"]).steps == 2500
    for bad in ("2.5", "1e-3", "inf", "nan", "ten", "true"):
        with pytest.raises(ConfigError, match="steps: .* is not an integer"):
            load_config(Outer, None, ["name=x", f"steps={bad}"])


class FolderError(ValueError):
    pass


def test_check_local_folder_tells_paths_from_names(tmp_path, monkeypatch):
    (tmp_path / "dir").mkdir()
    (tmp_path / "file.txt").write_text("x")
    monkeypatch.chdir(tmp_path)
    assert check_local_folder("./dir", FolderError, fix="f") == Path("dir")
    assert check_local_folder(str(tmp_path / "dir"), FolderError, fix="f") == tmp_path / "dir"
    assert check_local_folder("org/model-name", FolderError, fix="f") is None
    with pytest.raises(FolderError, match="file.txt is a file, not a model folder: pass X"):
        check_local_folder("file.txt", FolderError, kind="model folder", fix="pass X")
    for missing in ("./nope", str(tmp_path / "nope"), "~/surely-missing-patchsae-folder"):
        with pytest.raises(FolderError, match=f"folder {missing} does not exist: check the path"):
            check_local_folder(missing, FolderError, fix="f")
