"""Faults found by hostile use, each kept fixed: thin configs, run-folder locking, CLI details.

Crafted checkpoint files live in ``test_adversarial.py``; hostile images in ``test_images.py``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from patchsae import cli
from patchsae.config import ConfigError, from_dict, load_config
from patchsae.lock import FolderLock
from patchsae.train import TrainConfig, train
from patchsae.train.trainer import TrainingError
from tiny_stores import make_store


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    acts = np.random.default_rng(0).normal(size=(16, 5, 8)).astype(np.float32)
    return make_store(tmp_path_factory.mktemp("store") / "s", acts)


def settings(store: Path, out: Path, **overrides) -> dict:
    return {
        "store": str(store),
        "out": str(out),
        "sae": {"d_in": 8, "d_sae": 16},
        "batch_images": 4,
        "total_images": 16,
        "warmup_steps": 1,
        "checkpoint_every": 2,
        "log_every": 1,
        "b_dec_init": "zeros",
        **overrides,
    }


def write_cfg(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def one_line_error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(autouse=True)
def no_traceback_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)


# ---------------------------------------------------------------- config checking gaps


@pytest.mark.parametrize(
    "override, message",
    [
        ("lr=nan", "lr must be a positive finite number"),
        ("lr=inf", "lr must be a positive finite number"),
        ("lr=-1", "lr must be a positive finite number"),
        ("adam_betas=[2,3]", r"adam_betas must be two numbers in \[0, 1\)"),
        ("adam_betas=[0.9,1.0]", r"adam_betas must be two numbers in \[0, 1\)"),
        ("adam_eps=0", "adam_eps must be a positive finite number"),
        ("total_images=0", r"\['total_images'\] must be positive"),
        ("total_tokens=0", r"\['total_tokens'\] must be positive"),
    ],
)
def test_bad_training_values_are_one_line_before_any_output(
    store, tmp_path, capsys, override, message
):
    out = tmp_path / "run"
    cfg = write_cfg(tmp_path / "c.yaml", settings(store, out))
    err = one_line_error(capsys, ["train", str(cfg), override])
    assert re.search(message, err), err
    assert not out.exists()


@pytest.mark.parametrize("command", [["train"], ["extract", "--config"]])
def test_malformed_yaml_is_one_line(tmp_path, capsys, command):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("sae: {d_in: 8\nlr: [1,\n")
    err = one_line_error(capsys, [*command, str(cfg)])
    assert f"config file {cfg} is not valid YAML" in err and "line" in err


def test_malformed_override_is_one_line(store, tmp_path, capsys):
    cfg = write_cfg(tmp_path / "c.yaml", settings(store, tmp_path / "run"))
    err = one_line_error(capsys, ["train", str(cfg), "adam_betas=[0.9,"])
    assert "override adam_betas: cannot read '[0.9,'" in err


def test_unavailable_device_is_one_line_before_any_output(store, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    out = tmp_path / "run"
    cfg = write_cfg(tmp_path / "c.yaml", settings(store, out, device="cuda"))
    err = one_line_error(capsys, ["train", str(cfg)])
    assert "CUDA is not available" in err
    assert not out.exists()


# ---------------------------------------------------------------- the run folder lock


def hold_lock(folder: Path) -> subprocess.Popen:
    """A process that locks ``folder`` with the shared helper and sleeps until killed."""
    script = (
        "import sys, time; from patchsae.lock import FolderLock; "
        "FolderLock(sys.argv[1], RuntimeError('busy')); print('locked', flush=True); "
        "time.sleep(600)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(folder)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.mark.parametrize("resume", [False, True])
def test_a_run_folder_is_written_by_one_process(store, tmp_path, resume):
    out = tmp_path / "run"
    out.mkdir()
    cfg = from_dict(TrainConfig, settings(store, out))
    holder = hold_lock(out)
    try:
        with pytest.raises(TrainingError, match="another train process is writing to"):
            train(cfg, resume=resume)
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in out.iterdir()) == [".lock"]
    train(cfg, resume=resume)
    assert (out / "sae.safetensors").is_file()


def test_the_lock_is_held_for_the_whole_run(store, tmp_path, monkeypatch):
    """While one run trains, a second one on the same folder (same process here) is refused."""
    out = tmp_path / "run"
    cfg = from_dict(TrainConfig, settings(store, out))
    seen = []

    def second_run(*args, **kwargs):
        with pytest.raises(TrainingError, match="another train process"):
            train(cfg, resume=True)
        seen.append(True)
        return real(*args, **kwargs)

    from patchsae.train import trainer

    real = trainer._checkpoint
    monkeypatch.setattr(trainer, "_checkpoint", second_run)
    train(cfg)
    assert seen
    with FolderLock(out, RuntimeError("still locked")):
        pass


def test_store_and_run_share_one_lock_helper():
    import patchsae.data.store as store_module
    import patchsae.train.trainer as trainer_module

    assert store_module.FolderLock is FolderLock is trainer_module.FolderLock


# ---------------------------------------------------------------- small CLI items


def test_out_that_is_a_file_is_named(store, tmp_path, capsys):
    out = tmp_path / "run"
    out.write_text("x")
    cfg = write_cfg(tmp_path / "c.yaml", settings(store, out))
    err = one_line_error(capsys, ["train", str(cfg)])
    assert f"out={out} is a file, not a folder" in err


def test_config_path_that_is_a_folder_is_named(tmp_path, capsys):
    err = one_line_error(capsys, ["train", str(tmp_path)])
    assert f"config file {tmp_path} is a folder" in err
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(TrainConfig, tmp_path)


def test_evaluate_out_is_checked_before_the_work(store, tmp_path, capsys, monkeypatch):
    from patchsae.metrics import cli as metrics_cli

    monkeypatch.setattr(metrics_cli, "evaluate", lambda *a, **k: pytest.fail("evaluated"))
    argv = ["evaluate", "--sae", str(tmp_path), "--store", str(store)]
    err = one_line_error(capsys, [*argv, "--out", str(tmp_path)])
    assert f"--out {tmp_path} is a folder" in err
    (tmp_path / "file").write_text("x")
    err = one_line_error(capsys, [*argv, "--out", str(tmp_path / "file" / "m.json")])
    assert "which is a file" in err


def test_overrides_may_follow_flags(store, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = write_cfg(tmp_path / "c.yaml", settings(store, out, total_images=8))
    assert cli.main(["train", str(cfg)]) == 0
    assert cli.main(["train", str(cfg), "--resume", "total_images=16"]) == 2
    assert "total_images" in capsys.readouterr().err  # parsed as an override, then compared
    assert cli.main(["train", str(cfg), "--resume", "log_every=2"]) == 0
    with pytest.raises(SystemExit):
        cli.main(["train", str(cfg), "--resume", "--bogus"])


def test_weights_files_get_normal_permissions(store, tmp_path):
    old = os.umask(0o022)
    try:
        out = train(from_dict(TrainConfig, settings(store, tmp_path / "run")))
    finally:
        os.umask(old)
    files = [out / "sae.safetensors", out / "checkpoint" / "trainer_state.safetensors"]
    files.append(out / "checkpoint" / "sae" / "sae.safetensors")
    assert [oct(p.stat().st_mode & 0o777) for p in files] == [oct(0o644)] * 3


def test_saved_config_without_exif_option_compares_as_raw_pixels():
    from patchsae.train.config import config_differences

    saved = {"data": {"source": "x"}, "lr": 1.0}
    assert (
        config_differences(saved, {"data": {"source": "x", "exif_transpose": False}, "lr": 1.0})
        == []
    )
    assert config_differences(
        saved, {"data": {"source": "x", "exif_transpose": True}, "lr": 1.0}
    ) == ["data.exif_transpose"]


# ---------------------------------------------------------------- divergence


def test_a_diverged_run_stops_on_non_finite_adam_state(tmp_path):
    """lr=1e6: the loss stays finite (about 1e12) while Adam's second moment overflows to
    inf; the run stops before any output holds it."""
    acts = (np.random.default_rng(0).normal(size=(64, 5, 16)) * 3 + 1).astype(np.float32)
    big = make_store(tmp_path / "s", acts)
    cfg = settings(big, tmp_path / "run", sae={"d_in": 16, "d_sae": 64}, lr=1e6, log_every=4)
    cfg.update(total_images=256, checkpoint_every=8)
    with pytest.raises(TrainingError, match=r"diverged by step \d+: \d+ NaN/inf values") as err:
        train(from_dict(TrainConfig, cfg))
    assert "Lower lr" in str(err.value) and "checkpoint" in str(err.value)
    assert not (tmp_path / "run" / "sae.safetensors").exists()


def fake_metrics(fvu_by_step: dict[int, float], steps: list[int]):
    def metrics(sae, batches, layout, device, progress):
        steps.append(len(steps))
        return {"fvu": fvu_by_step.get(len(steps) - 1, 0.5), "l0": 1.0}

    return metrics


def test_fvu_above_one_for_three_evaluations_is_warned(store, tmp_path, capsys, monkeypatch):
    from patchsae.train import trainer

    calls: list[int] = []
    bad = {5: 2.0, 6: 3.0, 7: 4.0}  # evaluation k runs at step k (eval_every=1)
    monkeypatch.setattr(trainer, "reconstruction_metrics", fake_metrics(bad, calls))
    cfg = settings(store, tmp_path / "run", total_images=32, eval_images=4, eval_every=1)
    cfg.update(checkpoint_every=4, batch_images=4)
    out = train(from_dict(TrainConfig, cfg))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    warned = [r for r in lines if "warning" in r]
    assert [r["step"] for r in warned] == [7]
    text = warned[0]["warning"]
    assert "held-out FVU has been above 1" in text and "since step 5" in text
    assert f"last good checkpoint is {out / 'checkpoint'} (step 4)" in text
    assert f"warning: {text}" in capsys.readouterr().out


def test_every_latent_dead_for_three_log_lines_is_warned(store, tmp_path, capsys, monkeypatch):
    from patchsae.metrics.firing import FiringWindow

    all_dead = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)  # dead, almost dead, dense
    monkeypatch.setattr(FiringWindow, "fractions_tensor", lambda self: all_dead)
    out = train(from_dict(TrainConfig, settings(store, tmp_path / "run", checkpoint_every=100)))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    warned = [r for r in lines if "warning" in r]
    assert [r["step"] for r in warned] == [3]
    assert (
        "every latent has been dead for 3 log lines in a row, since step 1" in warned[0]["warning"]
    )
    assert "No checkpoint was written before it" in warned[0]["warning"]
    assert "warning: step 3" in capsys.readouterr().out
