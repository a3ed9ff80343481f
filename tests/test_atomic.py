"""Atomic writes leave the old file or the new one, never a mix, and no temporary files."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from patchsae.atomic import atomic_file, write_json, write_text, write_with


def test_write_json_and_text(tmp_path):
    path = tmp_path / "sub" / "a.json"
    write_json(path, {"x": [1, 2]})
    assert json.loads(path.read_text()) == {"x": [1, 2]}
    write_text(path, "new")
    assert path.read_text() == "new"
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.json"]


def test_failure_keeps_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_file(path) as f:
        f.write(b"half")
        raise RuntimeError("killed mid-write")
    assert path.read_bytes() == b"old"

    def failing(tmp):
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_with(path, failing)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_write_with_renames_what_the_writer_wrote(tmp_path):
    path = tmp_path / "w.bin"
    write_with(path, lambda tmp: tmp.write_bytes(b"payload"))
    assert path.read_bytes() == b"payload"
    assert [p.name for p in tmp_path.iterdir()] == ["w.bin"]


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_files_get_the_mode_open_would_give(tmp_path, umask):
    old = os.umask(umask)
    try:
        plain = tmp_path / "plain"
        plain.write_bytes(b"x")
        paths = [tmp_path / n for n in ("a.json", "b.bin", "c.bin", "d.safetensors")]
        write_json(paths[0], {})
        with atomic_file(paths[1]) as f:
            f.write(b"x")
        write_with(paths[2], lambda tmp: tmp.write_bytes(b"x"))
        write_with(paths[3], lambda tmp: save_file({"x": torch.zeros(1)}, str(tmp)))
        assert os.umask(umask) == umask
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    assert plain.stat().st_mode & 0o777 == expected
    assert [p.stat().st_mode & 0o777 for p in paths] == [expected] * 4


def test_text_is_utf8_whatever_the_locale(tmp_path):
    """Under an ASCII locale (C, UTF-8 mode off) text is still written as UTF-8."""
    path = tmp_path / "t.txt"
    script = (
        "import sys; from patchsae.atomic import write_text, write_json; "
        "write_text(sys.argv[1], '\\u03a9 \\u00fc \\u2713'); "
        "write_json(sys.argv[1] + '.json', {'name': '\\u03a9'})"
    )
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    subprocess.run([sys.executable, "-c", script, str(path)], env=env, check=True)
    assert path.read_bytes() == "\u03a9 \u00fc \u2713".encode()
    assert json.loads(path.with_suffix(".txt.json").read_bytes()) == {"name": "\u03a9"}


def test_json_ready_turns_nan_and_infinities_into_null() -> None:
    from patchsae.atomic import json_ready

    value = {"a": float("nan"), "b": [1.5, float("inf"), (float("-inf"), 2)], "c": {"d": 3}}
    text = json.dumps(json_ready(value), allow_nan=False)
    assert json.loads(text) == {"a": None, "b": [1.5, None, [None, 2]], "c": {"d": 3}}
