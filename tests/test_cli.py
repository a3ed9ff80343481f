"""The ``patchsae`` command: entry points, one-line errors, the traceback switch, Ctrl-C."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys

import pytest

from patchsae import cli
from patchsae.config import ConfigError
from patchsae.data.images import DataError


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("command", [["patchsae"], [sys.executable, "-m", "patchsae"]])
def test_help_lists_the_commands(command):
    if command == ["patchsae"] and shutil.which("patchsae") is None:
        pytest.skip("the patchsae console script is not installed")
    done = run(*command, "--help")
    assert done.returncode == 0, done.stderr
    assert "usage: patchsae" in done.stdout
    for name in ("extract", "train"):
        assert name in done.stdout


def test_config_error_is_one_line_with_exit_code_2(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
    missing = tmp_path / "missing.yaml"
    assert cli.main(["train", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err == f"patchsae train: error: config file {missing} does not exist\n"


def test_config_error_from_a_subprocess(tmp_path):
    done = run(sys.executable, "-m", "patchsae", "train", str(tmp_path / "missing.yaml"))
    assert done.returncode == 2
    assert "error: config file" in done.stderr and "Traceback" not in done.stderr


def fake_parser(exc: BaseException) -> argparse.ArgumentParser:
    """A parser with one command ``boom`` whose function raises ``exc``."""

    def boom(args: argparse.Namespace) -> int:
        raise exc

    parser = argparse.ArgumentParser(prog="patchsae")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("boom").set_defaults(func=boom)
    return parser


@pytest.mark.parametrize(
    "exc",
    [
        DataError("folder /x does not exist: check the path"),
        PermissionError(13, "Permission denied", "/shared/out"),
        FileNotFoundError(2, "No such file or directory", "/x"),
        OSError(28, "No space left on device"),
    ],
)
def test_user_errors_print_one_line(exc, capsys, monkeypatch):
    monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
    monkeypatch.setattr(cli, "build_parser", lambda: fake_parser(exc))
    assert cli.main(["boom"]) == 2
    assert capsys.readouterr().err == f"patchsae boom: error: {exc}\n"


@pytest.mark.parametrize("exc", [ValueError("internal bug"), KeyError("k"), TypeError("t")])
def test_bugs_keep_their_traceback(exc, monkeypatch):
    monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
    monkeypatch.setattr(cli, "build_parser", lambda: fake_parser(exc))
    with pytest.raises(type(exc)):
        cli.main(["boom"])


def test_traceback_switch_reraises(tmp_path, monkeypatch):
    monkeypatch.setenv(cli.TRACEBACK_ENV, "1")
    with pytest.raises(ConfigError, match="does not exist"):
        cli.main(["train", str(tmp_path / "missing.yaml")])
    monkeypatch.setattr(cli, "build_parser", lambda: fake_parser(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        cli.main(["boom"])


def test_interrupt_says_how_to_resume(capsys, monkeypatch):
    monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
    monkeypatch.setattr(cli, "build_parser", lambda: fake_parser(KeyboardInterrupt()))
    assert cli.main(["boom"]) == 130
    err = capsys.readouterr().err
    assert "interrupted; rerun the same command to resume" in err and "Traceback" not in err
