"""Silent corruption is caught: bytes changed in place (same size) in a store shard or index
file, an SAE's weights or a training checkpoint are named by the readers, by ``patchsae verify``,
and rerunning ``extract`` recomputes what is damaged. NaN in activations read for evaluation is
reported as such."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from patchsae import cli
from patchsae.checksum import file_checksum, file_problem
from patchsae.config import from_dict
from patchsae.data.store import (
    ActivationStore,
    StoreError,
    StoreMetadata,
    StoreWriter,
    verify_store,
)
from patchsae.metrics.firing import MetricsError
from patchsae.metrics.reconstruction import reconstruction_metrics
from patchsae.sae.config import SAEConfig
from patchsae.sae.io import CheckpointError, load, save
from patchsae.sae.registry import make_sae
from patchsae.train import TrainConfig, train
from patchsae.train.trainer import TrainingError
from patchsae.verify import verify
from tiny_stores import make_store


def flip_byte(path: Path, offset: int = -5) -> None:
    """Change one byte of ``path`` in place; its size stays the same."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x55
    path.write_bytes(bytes(data))


@pytest.fixture(autouse=True)
def no_traceback_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)


@pytest.fixture
def store(tmp_path: Path) -> Path:
    acts = np.random.default_rng(0).normal(size=(8, 5, 4)).astype(np.float32)
    return make_store(tmp_path / "store", acts)


def test_checksum_names_a_change_of_one_byte(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(bytes(range(256)) * 100)
    recorded = file_checksum(path)
    assert recorded.startswith("blake2b:") and file_problem(path, recorded) is None
    flip_byte(path, 1000)
    assert "has changed since it was written" in file_problem(path, recorded)
    assert file_problem(path, None) is None  # nothing recorded: older files pass
    assert file_problem(tmp_path / "gone", recorded) == "is missing"


def test_store_shard_changed_in_place_is_found_and_recomputed_by_extract(store, capsys):
    shard = store / "layer_0" / "00000.npy"
    before = ActivationStore.open(store).get(3).copy()
    flip_byte(shard)
    assert ActivationStore.open(store)  # opening checks sizes only: shards are large
    (problem,) = verify_store(store)
    assert "layer_0/00000.npy has changed since it was written" in problem
    assert cli.main(["verify", str(store)]) == 2
    out, err = capsys.readouterr()
    assert "00000.npy has changed" in out and err.count("\n") == 1 and "1 problem(s)" in err
    with StoreWriter(store, plan_of(store)) as writer:
        assert not writer.complete and writer.shard_entry(0) is None
        assert "00000.npy has changed" in writer.damage
    assert not json.loads((store / "metadata.json").read_text())["complete"]
    assert before.shape == (5, 4)


def plan_of(store: Path) -> StoreMetadata:
    from patchsae.data.store import RESULT_KEYS

    meta = json.loads((store / "metadata.json").read_text())
    return StoreMetadata.from_dict({k: v for k, v in meta.items() if k not in RESULT_KEYS})


@pytest.mark.parametrize("name", ["example_ids.npy", "labels.npy"])
def test_store_index_file_changed_or_truncated_is_one_store_error(store, name, capsys):
    path = store / name
    good = path.read_bytes()
    flip_byte(path, 20)  # inside the .npy header
    with pytest.raises(StoreError, match=f"damaged: {name} has changed"):
        ActivationStore.open(store)
    path.write_bytes(good[:-8])
    with pytest.raises(StoreError, match=f"damaged: {name} has changed"):
        ActivationStore.open(store)
    assert cli.main(["verify", str(store)]) == 2
    with StoreWriter(store, plan_of(store)) as writer:  # extract reruns instead of "complete"
        assert not writer.complete


def test_store_written_before_checksums_reports_a_bad_npy_in_one_line(store):
    meta = json.loads((store / "metadata.json").read_text())
    del meta["checksums"]
    (store / "metadata.json").write_text(json.dumps(meta))
    path = store / "example_ids.npy"
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(StoreError, match="example_ids.npy is not a readable .npy file"):
        ActivationStore.open(store)


def test_extract_rerun_recomputes_a_damaged_shard(tmp_path, capsys):
    from patchsae.extract import extract
    from test_extract import config, make_folder, tree
    from tiny_models import save_tiny_vit

    model = save_tiny_vit(
        tmp_path / "m", width=32, n_layers=2, heads=2, image_size=32, patch_size=8
    )
    data = make_folder(tmp_path / "imgs", per_class=4, bad=False)
    out = extract(config(model, data, tmp_path / "store", layers=(1,)))
    expected = tree(out)
    flip_byte(out / "layer_1" / "00001.npy")
    flip_byte(out / "example_ids.npy")
    capsys.readouterr()
    extract(config(model, data, tmp_path / "store", layers=(1,)))
    printed = capsys.readouterr().out
    assert "is damaged" in printed and "already complete" not in printed
    assert tree(out) == expected
    assert verify_store(out) == []


def test_sae_weights_changed_in_place_are_refused(tmp_path, capsys):
    torch.manual_seed(0)
    folder = save(make_sae(SAEConfig(d_in=4, d_sae=8)), tmp_path / "sae")
    load(folder)
    flip_byte(folder / "sae.safetensors")
    with pytest.raises(CheckpointError, match="has changed since it was written"):
        load(folder)
    assert cli.main(["verify", str(folder)]) == 2
    assert "sae.safetensors has changed" in capsys.readouterr().out


def run_config(store: Path, out: Path, **overrides) -> TrainConfig:
    data = {
        "store": str(store),
        "out": str(out),
        "sae": {"d_in": 4, "d_sae": 8},
        "batch_images": 2,
        "total_images": 8,
        "warmup_steps": 1,
        "checkpoint_every": 2,
        "b_dec_init": "zeros",
        **overrides,
    }
    return from_dict(TrainConfig, data)


@pytest.mark.parametrize(
    "name", ["trainer_state.safetensors", "sae/sae.safetensors", "sae/cfg.json"]
)
def test_checkpoint_changed_in_place_stops_resume(store, tmp_path, name, capsys):
    out = train(run_config(store, tmp_path / "run"))
    assert verify(out) == []
    flip_byte(out / "checkpoint" / name, -3)
    with pytest.raises(TrainingError, match=f"{name} has changed since it was written"):
        train(run_config(store, tmp_path / "run", total_images=16), resume=True)
    assert cli.main(["verify", str(out)]) == 2
    assert f"{name} has changed" in capsys.readouterr().out


def test_verify_passes_intact_outputs_and_refuses_other_folders(store, tmp_path, capsys):
    out = train(run_config(store, tmp_path / "run"))
    for path in (store, out, out / "checkpoint" / "sae"):
        assert cli.main(["verify", str(path)]) == 0
        assert '"ok": true' in capsys.readouterr().out
    assert cli.main(["verify", str(tmp_path)]) == 2
    assert "neither an activation store" in capsys.readouterr().err


def test_nan_activations_in_evaluation_are_reported_not_null():
    torch.manual_seed(0)
    sae = make_sae(SAEConfig(d_in=4, d_sae=8))
    x = torch.randn(2, 4)
    x[1, 2] = float("nan")
    with pytest.raises(MetricsError, match="activations hold 1 NaN or infinite values"):
        reconstruction_metrics(sae, [x], None, progress=False)
    with torch.no_grad():
        sae.W_dec[0, 0] = float("inf")
    with pytest.raises(MetricsError, match="reconstructions hold NaN"):
        reconstruction_metrics(sae, [torch.randn(3, 4).abs() + 1], None, progress=False)
