"""Two gloo processes under torchrun write the same store, byte for byte, as one process; a rank
killed with SIGKILL is recovered by running the same command again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_extract import make_folder, run_extract, tiny_model, tree  # noqa: F401 (fixture)

TIMEOUT_S = 600


def torchrun_extract(args: list[str], nproc: int = 2) -> subprocess.Popen:
    """``python -m patchsae extract key=value ...`` under torchrun, ``nproc`` gloo processes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc-per-node={nproc}", "-m", "patchsae", "extract", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen) -> None:
    try:
        code = proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"did not finish in {TIMEOUT_S} s") from None
    assert code == 0, proc.stderr.read().decode()[-4000:]


def rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of the worker of ``rank`` started by the torchrun process ``launcher``."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == launcher and f"RANK={rank}".encode() in environ:
            return int(stat.parent.name)
    return None


def assert_same_store(single: Path, pair: Path) -> None:
    """Every file of the 2-rank store ``pair`` has the bytes of the 1-process store ``single``."""
    expected, got = tree(single), tree(pair)
    assert sorted(got) == sorted(expected)
    for name, content in expected.items():
        assert got[name] == content, f"{name} differs between 2 ranks and 1 process"


@pytest.fixture
def common(tiny_model: Path, tmp_path: Path) -> list[str]:  # noqa: F811 (the fixture)
    data = make_folder(tmp_path / "imgs", per_class=30, bad=True)
    args = [f"model={tiny_model}", f"data.source={data}", "layers=[0,2]", "batch_size=2"]
    return args + ["shard_images=4", "num_workers=0", "dtype=fp32", "seed=3"]


@pytest.mark.slow
def test_two_ranks_write_the_single_process_store(common: list[str], tmp_path: Path) -> None:
    single, pair = tmp_path / "single", tmp_path / "pair"
    reference = run_extract([*common, f"out={single}"])
    finish(torchrun_extract([*common, f"out={pair}"]))
    finish(reference)
    assert_same_store(single, pair)
    finish(torchrun_extract([*common, f"out={pair}"]))  # complete: every rank stops at once
    assert_same_store(single, pair)


@pytest.mark.slow
def test_a_rank_killed_mid_run_is_recovered_by_rerunning(common: list[str], tmp_path: Path):
    single, pair = tmp_path / "single", tmp_path / "pair"
    reference = run_extract([*common, f"out={single}"])
    launcher = torchrun_extract([*common, f"out={pair}"])
    deadline = time.monotonic() + TIMEOUT_S
    while not (pair / "shards" / "00001.json").exists():  # rank 1's first shard
        assert launcher.poll() is None, launcher.stderr.read().decode()[-4000:]
        assert time.monotonic() < deadline, "rank 1 wrote no shard"
        time.sleep(0.002)
    victim = rank_pid(launcher.pid, 1)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    assert launcher.wait(timeout=TIMEOUT_S) != 0  # torchrun stops the other rank and fails
    assert '"complete": false' in (pair / "metadata.json").read_text()
    finish(torchrun_extract([*common, f"out={pair}"]))
    finish(reference)
    assert_same_store(single, pair)
