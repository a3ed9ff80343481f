"""The recipe scales down: store-given defaults, schedule warnings, the closing summary."""

from pathlib import Path

import pytest
import yaml

from patchsae.cli import main
from patchsae.config import ConfigError, from_dict
from patchsae.sae.io import load
from patchsae.train import TrainConfig
from patchsae.train.config import check_schedule, load_train_config
from test_train import tiny_acts
from tiny_stores import make_store

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "patchsae.yaml"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_store(tmp_path_factory.mktemp("store") / "s", tiny_acts(n=24))


def test_d_in_comes_from_the_store_when_not_given(store: Path, tmp_path: Path) -> None:
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump({"store": str(store), "sae": {"d_sae": 32}}))
    assert load_train_config(cfg_file).sae.d_in == 16
    assert load_train_config(cfg_file, ["sae.d_in=16"]).sae.d_in == 16


def test_the_recipe_on_another_backbones_store_names_every_fix_at_once(store: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_train_config(RECIPE, [f"store={store}"])
    message = str(err.value)
    assert f"the store {store} holds activations of width 16 from 'tiny'" in message
    assert "sae.d_in=16 (not 768)" in message
    assert "model=null (not 'openai/clip-vit-base-patch16')" in message
    cfg = load_train_config(RECIPE, [f"store={store}", "model=null", "sae.d_in=16"])
    assert (cfg.model, cfg.sae.d_in, cfg.sae.arch, cfg.eval_images) == (None, 16, "relu", 1024)


def test_schedule_warnings_name_the_fix(store: Path) -> None:
    base = {"store": str(store), "sae": {"d_in": 16, "d_sae": 32}, "checkpoint_every": 10}
    cfg = from_dict(TrainConfig, {**base, "warmup_steps": 500, "dead_feature_window": 2})
    (warmup,) = check_schedule(cfg, 40)
    assert "warmup_steps=500 but the run has only 40 steps" in warmup
    assert "set warmup_steps=2" in warmup
    cfg = from_dict(TrainConfig, {**base, "warmup_steps": 20, "dead_feature_window": 64})
    long_warmup, windows = check_schedule(cfg, 40)
    assert "warm-up takes 20 of the run's 40 steps" in long_warmup
    assert "under 4 dead-feature windows of 64 steps" in windows
    cfg = from_dict(TrainConfig, {**base, "warmup_steps": 2, "dead_feature_window": 2})
    assert check_schedule(cfg, 40) == []
    assert "nothing is saved before the end" in check_schedule(cfg, 8)[0]


def test_train_ends_with_held_out_metrics_and_the_evaluate_command(
    store: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "run"
    args = [f"store={store}", "sae.d_sae=32", "batch_images=4", "total_images=40"]
    args += ["warmup_steps=1", "dead_feature_window=2", "checkpoint_every=5", "eval_images=4"]
    args += [f"out={out}"]
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("seed: 0\n")
    assert main(["train", str(cfg_file), *args]) == 0
    printed = capsys.readouterr().out
    assert "warning" not in printed
    assert "held-out (4 images): fvu " in printed and ", l0 " in printed
    evaluate = f"patchsae evaluate --sae {out} --store {store} --images 4"
    assert evaluate in printed
    assert load(out).cfg.d_in == 16
    assert main(evaluate.split()[1:]) == 0
