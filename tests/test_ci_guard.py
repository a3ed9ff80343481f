"""Under CI=true a clone without ../shared fails instead of skipping the shared tests."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_suite(root: Path, ci: str) -> subprocess.CompletedProcess:
    tests = root / "project" / "tests"
    tests.mkdir(parents=True)
    for name in ("conftest.py", "assets.py"):
        shutil.copy(HERE / name, tests / name)
    (tests / "test_one.py").write_text("def test_one():\n    assert True\n")
    env = {**os.environ, "CI": ci}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests)],
        cwd=tests.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_ci_without_shared_assets_fails_the_run(tmp_path: Path) -> None:
    failed = run_suite(tmp_path / "ci", "true")
    assert failed.returncode != 0
    assert "CI=true but the shared assets" in failed.stdout + failed.stderr
    local = run_suite(tmp_path / "local", "")
    assert local.returncode == 0, local.stdout + local.stderr
