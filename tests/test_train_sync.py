"""``sync_every``: the step's values are read back every N steps, and nothing else changes.

Weights, checkpoints and metrics lines of ``sync_every=N`` equal those of ``sync_every=1`` bit for
bit (ReLU with ghost grads on dead latents, TopK with AuxK, a resume in the middle); a bad step
stops the run at the next sync with the same message and the same checkpoint; the trainer reads
device values back once per N steps.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from patchsae.config import ConfigError, from_dict, to_dict
from patchsae.data.loaders import image_batches_from_store
from patchsae.data.store import ActivationStore
from patchsae.train import TrainConfig, train
from patchsae.train.errors import TrainingError
from run_files import train_until, untimed_metrics, weights
from tiny_stores import make_store

N_IMAGES = 40
SAES = {
    "relu": {"d_in": 16, "d_sae": 64, "l1_coefficient": 1.0},  # latents die, ghost grads run
    "topk": {"arch": "topk", "d_in": 16, "d_sae": 64, "k": 2, "aux_k": 4},
}


def acts() -> np.ndarray:
    return (0.5 + np.random.default_rng(0).normal(size=(N_IMAGES, 5, 16))).astype(np.float32)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_store(tmp_path_factory.mktemp("store") / "s", acts())


def config(store: Path, out: Path, **overrides) -> TrainConfig:
    """14 steps of one image (5 tokens), a window of one step: latents die within a few steps."""
    data = {
        "store": str(store),
        "out": str(out),
        "sae": SAES["relu"],
        "batch_images": 1,
        "total_images": 14,
        "warmup_steps": 2,
        "dead_feature_window": 1,
        "checkpoint_every": 100,
        "log_every": 1,
        "seed": 0,
        "lr": 5e-2,
    }
    return from_dict(TrainConfig, data | overrides)


def saved_tensors(out: Path) -> dict[str, torch.Tensor]:
    """The final weights and every tensor of the last checkpoint (Adam, counters, RNG...)."""
    ckpt = out / "checkpoint"
    files = {"": out, "ckpt.": ckpt / "sae", "state.": ckpt}
    names = {
        "": "sae.safetensors",
        "ckpt.": "sae.safetensors",
        "state.": "trainer_state.safetensors",
    }
    return {
        prefix + k: v
        for prefix, folder in files.items()
        for k, v in load_file(str(folder / names[prefix])).items()
    }


def assert_identical(a: Path, b: Path) -> None:
    ta, tb = saved_tensors(a), saved_tensors(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), f"{k} differs"
    assert untimed_metrics(a) == untimed_metrics(b)


@pytest.mark.parametrize("arch", SAES)
def test_sync_every_changes_no_bit(store: Path, tmp_path: Path, arch: str) -> None:
    every = train(config(store, tmp_path / "1", sae=SAES[arch]))
    bursts = train(config(store, tmp_path / "4", sae=SAES[arch], sync_every=4))  # 14 = 3 * 4 + 2
    rows = untimed_metrics(every)
    assert [r["step"] for r in rows] == list(range(1, 15))
    dead_term = "ghost" if arch == "relu" else "aux"
    assert sum(r["n_dead_mask"] > 0 and r[dead_term] > 0 for r in rows) >= 5
    assert_identical(every, bursts)


def test_resume_mid_run_with_bursts_equals_a_straight_run(store: Path, tmp_path: Path) -> None:
    train_until(config(store, tmp_path / "cut", sync_every=4, checkpoint_every=6), step=10)
    # synced at steps 4, 6 (checkpoint) and 8; the lines of steps 9 and 10 died with the process
    assert max(r["step"] for r in untimed_metrics(tmp_path / "cut")) == 8
    resumed = train(config(store, tmp_path / "cut", sync_every=3, checkpoint_every=6), resume=True)
    straight = train(config(store, tmp_path / "straight", checkpoint_every=6))
    assert_identical(resumed, straight)


def poisoned_store(root: Path, store: Path, step: int) -> Path:
    """A copy of ``store`` with a NaN in the (seed 0) one-image batch of ``step``."""
    batches = image_batches_from_store(ActivationStore.open(store), 1, shuffle_seed=0, epochs=None)
    for _ in range(step):
        next(batches)
    target = next(batches)[0].numpy()
    data = acts()
    image = int(np.flatnonzero((data == target).all(axis=(1, 2)))[0])
    data[image, 2, 3] = np.nan
    return make_store(root, data)


def test_a_bad_batch_stops_the_run_at_the_next_sync_as_at_once(store: Path, tmp_path: Path) -> None:
    """Step 5's batch holds a NaN. With sync_every=4 the run notices at the sync the checkpoint
    after step 5 forces (steps done: 6), before writing it, and stops as sync_every=1 does."""
    bad = poisoned_store(tmp_path / "bad", store, step=5)
    errors, checkpoints = [], []
    for n in (1, 4):
        with pytest.raises(TrainingError) as err:
            train(config(bad, tmp_path / str(n), sync_every=n, checkpoint_every=3))
        errors.append(str(err.value))
        ckpt = tmp_path / str(n) / "checkpoint"
        assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 3
        checkpoints.append(load_file(str(ckpt / "trainer_state.safetensors")))
    assert errors[0] == errors[1]
    assert "non-finite activations in the batch of step 5" in errors[0]
    assert all(torch.equal(v, checkpoints[1][k]) for k, v in checkpoints[0].items())
    assert [r["step"] for r in untimed_metrics(tmp_path / "4")] == [1, 2, 3, 4, 5]
    assert untimed_metrics(tmp_path / "1") == untimed_metrics(tmp_path / "4")


def test_a_non_finite_loss_names_the_first_bad_step_and_the_sae(
    store: Path, tmp_path: Path
) -> None:
    sweep = [{}, {"l1_coefficient": float("inf")}]
    with pytest.raises(TrainingError, match=r"non-finite loss at step 0 \(SAE sae-01\)"):
        train(config(store, tmp_path / "run", sweep=sweep, sync_every=5))
    assert not (tmp_path / "run" / "sae-00" / "metrics.jsonl").exists()


def test_diverged_weights_stop_the_run_with_the_same_message(tmp_path: Path) -> None:
    """lr=1e6: Adam's second moment overflows while the loss stays finite (test_hardening)."""
    big = (np.random.default_rng(0).normal(size=(64, 5, 16)) * 3 + 1).astype(np.float32)
    store = make_store(tmp_path / "s", big)
    settings = {"sae": {"d_in": 16, "d_sae": 64}, "lr": 1e6, "batch_images": 4, "warmup_steps": 1}
    settings |= {"total_images": 256, "log_every": 4, "checkpoint_every": 8, "b_dec_init": "zeros"}
    settings |= {"dead_feature_window": 64, "seed": 42}
    messages = []
    for n in (1, 3):
        out = tmp_path / str(n)
        with pytest.raises(TrainingError, match=r"diverged by step \d+: \d+ NaN/inf") as err:
            train(config(store, out, sync_every=n, **settings))
        messages.append(str(err.value).replace(str(out), "OUT"))
        assert not (out / "sae.safetensors").exists()
    assert messages[0] == messages[1]


@pytest.mark.parametrize("value", [0, -2, 2.5, "x", True])
def test_sync_every_must_be_a_positive_integer(store: Path, tmp_path: Path, value) -> None:
    with pytest.raises(ConfigError, match="sync_every") as err:
        config(store, tmp_path, sync_every=value)
    assert "\n" not in str(err.value)


READS = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy")


def reads_by_caller(monkeypatch: pytest.MonkeyPatch) -> collections.Counter:
    """Counts of host reads of tensors (``.tolist()``, ``.item()``, ``bool(t)``...) made by code
    of ``patchsae.train``, keyed by the calling module."""
    counts: collections.Counter = collections.Counter()
    for name in READS:
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("patchsae.train"):
                counts[caller] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return counts


def test_the_loop_reads_the_device_once_per_sync(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every step logs a line (the most reads); reads outside ``sync`` are per run (the lock,
    the final checkpoint), so adding 4 steps adds 4 reads with sync_every=1 and 1 with 4."""
    counts = reads_by_caller(monkeypatch)
    found = {}
    for n in (1, 4):
        for steps in (8, 12):
            counts.clear()
            train(config(store, tmp_path / f"{n}-{steps}", total_images=steps, sync_every=n))
            found[n, steps] = dict(counts)
    for n in (1, 4):
        assert found[n, 8]["patchsae.train.sync"] == 8 // n
        assert found[n, 12]["patchsae.train.sync"] == 12 // n
        assert sum(found[n, 12].values()) - sum(found[n, 8].values()) == 4 // n
    others = [{k: v for k, v in f.items() if k != "patchsae.train.sync"} for f in found.values()]
    assert all(o == others[0] for o in others)


def test_two_processes_with_bursts_equal_one_process(tmp_path: Path) -> None:
    """Under torchrun (2 gloo processes) the deferred reads change nothing: the float64 sweep of
    test_train_ddp with sync_every=3 equals one process with sync_every=1."""
    from test_train_ddp import torchrun

    store = make_store(tmp_path / "store", acts())
    sae = {"d_in": 16, "d_sae": 32, "l1_coefficient": 1.0, "dtype": "float64"}
    settings = {"sae": sae, "lr": 0.1, "warmup_steps": 1, "batch_images": 4, "total_images": 40}
    settings |= {"sweep": [{}, {"arch": "topk", "k": 4, "aux_k": 8}], "checkpoint_every": 4}
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(to_dict(config(store, tmp_path / "ddp", **settings))))
    torchrun(["-m", "patchsae", "train", str(cfg_file), "sync_every=3"], 2)
    single = train(config(store, tmp_path / "single", **settings))
    for member, dead_term in (("sae-00", "ghost"), ("sae-01", "aux")):
        rows, single_rows = (
            untimed_metrics(tmp_path / "ddp" / member),
            untimed_metrics(single / member),
        )
        assert [r["step"] for r in rows] == [r["step"] for r in single_rows] == list(range(1, 11))
        assert [r["l0"] for r in rows] == [r["l0"] for r in single_rows]
        assert any(r[dead_term] > 0 for r in rows), "no dead latents: that path went untested"
        a, b = weights(tmp_path / "ddp" / member), weights(single / member)
        assert max((a[k] - b[k]).abs().max().item() for k in b) <= 1e-5


def test_a_bad_batch_stops_every_process_at_the_sync(store: Path, tmp_path: Path) -> None:
    """Each rank reads the all-reduced values at the same syncs, so every rank stops there with
    the same line: none is left waiting at a collective."""
    from test_train_ddp import TIMEOUT_S

    bad = poisoned_store(tmp_path / "bad", store, step=5)
    cfg = config(bad, tmp_path / "ddp", batch_images=2, total_images=28, sync_every=4)
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(to_dict(cfg)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd += ["-m", "patchsae", "train", str(cfg_file)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode != 0
    # the poisoned image is the 6th of the seed-0 order: in step 2's batch of 2, on rank 1 only
    assert proc.stderr.count("non-finite activations in the batch of step 2") == 2, proc.stderr
