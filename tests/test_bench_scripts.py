"""The GPU training bench runs end to end on CPU at tiny sizes, so it cannot rot between the
sessions that have a GPU to run it on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_train_gpu_bench_runs_on_cpu_at_tiny_sizes():
    args = ["--device", "cpu", "--d-sae", "512", "--images-per-step", "4", "--steps", "8"]
    args += ["--store-images", "32", "--sync-every", "4"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TQDM_DISABLE": "1"}
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "train_gpu.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["bench"] == "train_gpu" and result["sync_every"] == 4 and result["steps"] == 8
    assert abs(result["dead_frac"] - 0.05) < 0.01  # the resumed checkpoint's dead latents
    assert 0 < result["l0"] < 512 and result["steady_tokens_per_s"] > 0
    assert 0 <= result["input_wait_share"] < 1
