"""Per-architecture SAE configs: no model import to validate, the same keys on disk, old files."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from patchsae.config import ConfigError, from_dict, load_config, to_dict
from patchsae.sae import load, make_sae, save
from patchsae.sae.config import BatchTopKConfig, ReluConfig, SAEConfig, TopKConfig
from patchsae.train.config import TrainConfig, config_differences

ROOT = Path(__file__).resolve().parents[1]

# What cfg.json's "sae" held before configs were per architecture: every option of every arch.
OLD_KEYS = {
    "d_in": 4,
    "d_sae": 8,
    "dtype": "float32",
    "l1_coefficient": 8e-5,
    "use_ghost_grads": True,
    "mse_cls_coefficient": 1.0,
    "mse_normalization": "patchsae",
    "normalize_decoder": True,
    "k": 64,
    "aux_k": 512,
    "aux_coefficient": 1 / 32,
    "threshold_momentum": 0.99,
    "jumprelu_threshold_init": 0.001,
    "jumprelu_bandwidth": 0.001,
    "l0_coefficient": 1e-3,
    "init": "patchsae",
}


def run_python(code: str) -> str:
    src = str(ROOT / "src")
    env = {"PYTHONPATH": src, "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_config_validates_without_importing_any_architecture():
    out = run_python(
        "import sys\n"
        "from patchsae.sae.config import SAEConfig\n"
        "cfg = SAEConfig(arch='topk', d_in=4, d_sae=8, k=2)\n"
        "try:\n"
        "    SAEConfig(arch='topk', d_in=4, d_sae=8, k=9)\n"
        "except ValueError as err:\n"
        "    print(err)\n"
        "print(type(cfg).__name__, sorted(m for m in sys.modules if m.startswith('patchsae.sae.')"
        " and m.split('.')[-1] in ('relu', 'topk', 'jumprelu')))\n"
    )
    assert out.splitlines() == ["k=9 must be between 1 and d_sae=8; lower k or raise d_sae",
                                "TopKConfig []"]  # fmt: skip


@pytest.mark.parametrize("first", ["relu", "topk", "jumprelu", "base", "registry", "config"])
def test_every_module_imports_first(first):
    """No import circle: any module of the package can be the first one imported."""
    code = (
        f"import patchsae.sae.{first}\n"
        "from patchsae.sae import SAEConfig, make_sae\n"
        "print(type(make_sae(SAEConfig(arch='batchtopk', d_in=4, d_sae=8, k=2))).__name__)\n"
    )
    assert run_python(code).strip() == "BatchTopKSAE"


def test_each_arch_holds_its_own_options_only():
    relu = SAEConfig(d_in=4, d_sae=8)
    topk = SAEConfig(arch="topk", d_in=4, d_sae=8, k=2)
    batch = SAEConfig(arch="batchtopk", d_in=4, d_sae=8, k=2, threshold_momentum=0.5)
    jump = SAEConfig(arch="jumprelu", d_in=4, d_sae=8, l0_coefficient=0.1)
    shared = ["arch", "d_in", "d_sae", "dtype", "normalize_decoder", "init"]
    assert list(to_dict(relu)) == shared + [
        "l1_coefficient",
        "use_ghost_grads",
        "mse_cls_coefficient",
        "mse_normalization",
    ]
    assert list(to_dict(topk)) == shared + ["k", "aux_k", "aux_coefficient"]
    assert list(to_dict(batch)) == shared + ["k", "aux_k", "aux_coefficient", "threshold_momentum"]
    assert list(to_dict(jump))[len(shared) :] == [
        "jumprelu_threshold_init",
        "jumprelu_bandwidth",
        "l0_coefficient",
    ]
    assert isinstance(batch, TopKConfig) and type(batch) is BatchTopKConfig
    assert not hasattr(relu, "k") and not hasattr(topk, "l1_coefficient")
    assert TopKConfig(d_in=4, d_sae=8, k=2) == topk  # a concrete class knows its arch
    assert from_dict(SAEConfig, to_dict(batch)) == batch
    assert from_dict(TopKConfig, {"d_in": 4, "d_sae": 8, "k": 2}) == topk


def test_another_archs_option_is_refused_unless_it_holds_its_default():
    with pytest.raises(ConfigError) as err:
        SAEConfig(arch="relu", d_in=4, d_sae=8, k=3)
    assert str(err.value) == (
        "k=3 is an option of arch batchtopk/topk, not of arch=relu; remove it or change arch"
    )
    with pytest.raises(ConfigError, match=r"sae\.l1_coefficient=.* not of sae\.arch=topk"):
        from_dict(TrainConfig, {"store": "s", "sae": {"arch": "topk", "l1_coefficient": "1e-3"}})
    # At their defaults (a relu YAML switched to topk by an override) they are dropped.
    assert SAEConfig(arch="topk", l1_coefficient=8e-5, use_ghost_grads="true") == TopKConfig()
    with pytest.raises(ConfigError, match="unknown config key"):
        from_dict(SAEConfig, {"arch": "topk", "k_typo": 3})
    with pytest.raises(ConfigError, match="arch 'topk' takes TopKConfig, not ReluConfig"):
        dataclasses.replace(SAEConfig(), arch="topk")


def test_the_recipe_yaml_switched_to_topk_by_overrides():
    yaml = ROOT / "configs" / "patchsae.yaml"
    cfg = load_config(TrainConfig, yaml, ["sae.arch=topk", "sae.k=32"])
    assert type(cfg.sae) is TopKConfig and (cfg.sae.k, cfg.sae.d_in) == (32, 768)
    with pytest.raises(ConfigError, match="sae.l1_coefficient"):
        load_config(TrainConfig, yaml, ["sae.arch=topk", "sae.l1_coefficient=1e-3"])


def test_a_sweep_entry_that_changes_arch_leaves_the_base_options_behind():
    base = {"store": "s", "sae": {"d_in": 4, "d_sae": 8, "l1_coefficient": 1e-3}}
    sweep = [{}, {"arch": "topk", "k": 2}]
    relu, topk = from_dict(TrainConfig, {**base, "sweep": sweep}).sae_configs()
    assert relu.l1_coefficient == 1e-3 and topk == SAEConfig(arch="topk", d_in=4, d_sae=8, k=2)
    assert topk.init == "tied"  # its own default, not relu's
    base["sae"]["init"] = "patchsae"  # set explicitly, yet relu's default: not inherited
    assert from_dict(TrainConfig, {**base, "sweep": sweep}).sae_configs()[1].init == "tied"
    base["sae"]["dtype"] = "float64"  # set away from the default: inherited
    assert from_dict(TrainConfig, {**base, "sweep": sweep}).sae_configs()[1].dtype == "float64"
    with pytest.raises(ConfigError, match=r"sweep\[0\]\.l1_coefficient"):
        from_dict(TrainConfig, {**base, "sweep": [{"arch": "topk", "l1_coefficient": 1}]})


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk", "jumprelu"])
def test_a_cfg_json_with_every_old_option_loads(tmp_path: Path, arch: str):
    """Checkpoints saved when every config carried every option (format_version 1) load, even
    with another arch's option off its default (a sweep's base settings)."""
    options = {"k": 2} if arch in ("topk", "batchtopk") else {}
    sae = make_sae(SAEConfig(arch=arch, d_in=4, d_sae=8, **options))
    folder = save(sae, tmp_path / arch)
    info = json.loads((folder / "cfg.json").read_text())
    assert info["format_version"] == 1
    old = {**OLD_KEYS, **options, "arch": arch, "init": sae.cfg.init}
    if arch != "relu":
        old["l1_coefficient"] = 1e-3
    (folder / "cfg.json").write_text(json.dumps({**info, "sae": old}))
    assert load(folder).cfg == sae.cfg


def test_resume_reads_a_run_saved_with_every_option():
    sae = {"arch": "topk", "d_in": 4, "d_sae": 64}
    cfg = from_dict(TrainConfig, {"store": "s", "sae": sae})
    saved = {**to_dict(cfg), "sae": {**OLD_KEYS, **sae, "init": "tied"}}
    assert config_differences(saved, to_dict(cfg)) == []
    saved["sae"]["k"] = 32
    assert config_differences(saved, to_dict(cfg)) == ["sae.k"]
    assert isinstance(SAEConfig(), ReluConfig)


def test_each_arch_has_the_init_of_its_literature():
    """TopK / BatchTopK (Gao et al. 2024) and JumpReLU start tied; relu keeps PatchSAE's init."""
    inits = {a: SAEConfig(arch=a, d_in=4, d_sae=8, k=2).init for a in ("topk", "batchtopk")}
    inits["jumprelu"] = SAEConfig(arch="jumprelu").init
    assert inits == {"topk": "tied", "batchtopk": "tied", "jumprelu": "tied"}
    assert SAEConfig().init == "patchsae"
    recipe = load_config(TrainConfig, ROOT / "configs" / "patchsae.yaml")
    assert recipe.sae.init == "patchsae"
