"""Atomic writes leave the old file or the new one, never a mix, and no temporary files."""

import json

import pytest

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
