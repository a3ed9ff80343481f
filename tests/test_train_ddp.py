"""Two gloo processes on CPU train the same weights as one process on the same global batch.

The run is a sweep of the PatchSAE ReLU SAE and a TopK SAE, both exact under DDP. A run also
frees its process group (and so joins gloo's worker threads) before returning.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from patchsae.config import to_dict
from patchsae.train import train
from run_files import metrics, weights
from test_train import config, tiny_acts
from tiny_stores import make_store

TIMEOUT_S = 600


def torchrun(args: list[str], nproc: int) -> None:
    """``python args`` (e.g. ``-m patchsae train CFG``) under torchrun, ``nproc`` gloo processes.

    ``--standalone`` lets the launcher bind its own free port and host the rendezvous store, so
    no port is guessed and the store outlives every worker. On failure or timeout the launcher's
    output (both ranks' tracebacks and exit codes) is in the assertion message.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc-per-node={nproc}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        proc = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as err:
        raise AssertionError(f"torchrun did not finish in {TIMEOUT_S} s:\n{err.stderr}") from None
    assert proc.returncode == 0, f"torchrun exit {proc.returncode}:\n{proc.stderr[-4000:]}"


def test_two_processes_equal_one_process(tmp_path: Path) -> None:
    store = make_store(tmp_path / "store", tiny_acts())
    # float64: a large lr kills latents fast (ghost grads on), and Adam's first steps are
    # ~lr * sign(g), which would amplify float32 summation-order noise on near-zero gradients.
    sae = {"d_in": 16, "d_sae": 32, "l1_coefficient": 1.0, "use_ghost_grads": True}
    sae["dtype"] = "float64"
    sweep = [{}, {"arch": "topk", "k": 4, "aux_k": 8}]
    settings = {"sae": sae, "lr": 0.1, "warmup_steps": 1, "dead_feature_window": 0}
    settings["sweep"] = sweep
    cfg = config(store, tmp_path / "ddp", total_images=40, checkpoint_every=4, **settings)
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(to_dict(cfg)))
    torchrun(["-m", "patchsae", "train", str(cfg_file)], 2)
    single = train(
        config(store, tmp_path / "single", total_images=40, checkpoint_every=4, **settings)
    )
    relu, topk = "sae-00", "sae-01"
    rows = [r for r in metrics(tmp_path / "ddp" / relu) if "lr" in r]
    assert any(r["ghost"] > 0 for r in rows), "no dead latents: the ghost path went untested"
    topk_rows = [r for r in metrics(tmp_path / "ddp" / topk) if "lr" in r]
    assert any(r["aux"] > 0 for r in topk_rows), "no dead latents: the AuxK path went untested"
    for member in (relu, topk):
        rows = [r for r in metrics(tmp_path / "ddp" / member) if "lr" in r]
        single_rows = [r for r in metrics(single / member) if "lr" in r]
        assert [r["step"] for r in rows] == [r["step"] for r in single_rows] == list(range(1, 11))
        for a, b in zip(rows, single_rows, strict=True):
            assert a["l0"] == b["l0"] and abs(a["loss"] - b["loss"]) <= 1e-9 * abs(b["loss"])
        a, b = weights(tmp_path / "ddp" / member), weights(single / member)
        for k in b:
            diff = (a[k] - b[k]).abs().max().item()
            assert diff <= 1e-5, f"{member} {k} differs by {diff}"


THREADS_AFTER_TRAIN = """
import json, os, sys
from pathlib import Path
from patchsae.config import load_config
from patchsae.train import TrainConfig, train

train(load_config(TrainConfig, sys.argv[1], []))
names = []
for tid in os.listdir("/proc/self/task"):
    try:
        names.append(Path(f"/proc/self/task/{tid}/comm").read_text().strip())
    except OSError:
        pass
Path(sys.argv[2], f"threads-{os.environ['RANK']}.json").write_text(json.dumps(names))
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_train_frees_the_process_group_before_returning(tmp_path: Path) -> None:
    """No gloo thread is left once ``train`` returns, so none can die in interpreter shutdown.

    A gloo worker thread still alive at exit can be freeing a finished job (which needs the GIL)
    while Python finalises, which aborts the process. The threads end only when the group is
    freed, which fails if anything still references it (as ``torch.distributed.nn.functional``'s
    default arguments do when that module is first imported after the group exists).
    """
    store = make_store(tmp_path / "store", tiny_acts())
    cfg = config(store, tmp_path / "ddp", total_images=8, checkpoint_every=1)
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(to_dict(cfg)))
    script = tmp_path / "threads_after_train.py"
    script.write_text(THREADS_AFTER_TRAIN)
    torchrun([str(script), str(cfg_file), str(tmp_path)], 2)
    for rank in range(2):
        names = json.loads((tmp_path / f"threads-{rank}.json").read_text())
        assert not [n for n in names if "gloo" in n], f"rank {rank} threads after train: {names}"


def test_a_locked_run_folder_stops_every_rank(tmp_path: Path) -> None:
    """Another process holds the run folder: rank 0 is refused the lock, and every rank stops
    with one line (none is left waiting at a collective)."""
    from test_hardening import hold_lock

    store = make_store(tmp_path / "store", tiny_acts())
    out = tmp_path / "ddp"
    out.mkdir()
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(to_dict(config(store, out, total_images=8))))
    holder = hold_lock(out)
    try:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += ["--nproc-per-node=2", "-m", "patchsae", "train", str(cfg_file)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode != 0
    assert f"patchsae train: error: another train process is writing to {out}" in proc.stderr
    assert f"patchsae train: error: rank 0 could not lock the run folder {out}" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [".lock"]
