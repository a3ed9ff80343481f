"""Crafted SAE checkpoints, built here in code: each is refused with one CheckpointError line
(exit 2 from the CLI), and loading any of them stays within a small multiple of its size.

Nothing here is committed as a file, and no crafted pickle names a callable outside the
unpickler's allow-list: the faults are sizes, strides, lengths and nesting, not code.
"""

from __future__ import annotations

import gzip
import io
import json
import pickle
import re
import struct
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from patchsae import cli
from patchsae.sae.io import CheckpointError, load
from tiny_stores import make_store

BIG = (8192, 32768)  # 1 GiB of float32 per matrix: what a crafted config claims
OURS = {"format": "patchsae-sae", "format_version": 1, "save_id": "x"}


def ours(folder: Path, sae: dict, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Our folder layout: cfg.json with ``sae`` and sae.safetensors with ``tensors``."""
    folder.mkdir()
    (folder / "cfg.json").write_text(json.dumps({**OURS, "sae": sae}))
    tensors = tensors if tensors is not None else {"b_dec": torch.zeros(4)}
    save_file(tensors, str(folder / "sae.safetensors"), metadata={"save_id": "x"})
    return folder


def original(path: Path, cfg: dict, state: dict[str, torch.Tensor], fmt: str = "zip") -> Path:
    """An original-PatchSAE-like ``{"cfg": dict, "state_dict": ...}`` via torch.save."""
    obj = {"cfg": cfg, "state_dict": state}
    if fmt == "zip":
        torch.save(obj, path)
    else:
        blob = io.BytesIO()
        torch.save(obj, blob, _use_new_zipfile_serialization=False)
        path.write_bytes(gzip.compress(blob.getvalue(), compresslevel=9))
    return path


def relu_state(d_in: int, d_sae: int, make: Callable[..., torch.Tensor]) -> dict:
    return {
        "W_enc": make(d_in, d_sae),
        "b_enc": make(d_sae),
        "W_dec": make(d_sae, d_in),
        "b_dec": make(d_in),
    }


def stride0(*shape: int) -> torch.Tensor:
    """A view of one element expanded to ``shape``: torch.save keeps its zero strides."""
    return torch.zeros(1).expand(*shape)


def deflated(src: Path, dst: Path) -> Path:
    """``src`` (a torch.save zip) rewritten with every member deflated."""
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as b:
        for name in a.namelist():
            b.writestr(name, a.read(name))
    src.unlink()
    return dst


def deep_list_pickle(depth: int) -> bytes:
    """Protocol 2 ``{"cfg": {"d_in": [[[...]]] (depth deep), "d_sae": 16}, "state_dict": {}}``,
    written opcode by opcode (pickle.dumps itself would recurse too deep)."""

    def text(s: str) -> bytes:
        return b"X" + struct.pack("<I", len(s)) + s.encode()

    nested = b"]" * depth + b"a" * (depth - 1)
    cfg = b"}(" + text("d_in") + nested + text("d_sae") + b"K\x10u"
    return b"\x80\x02}(" + text("cfg") + cfg + text("state_dict") + b"}u."


def absurd_length(opcode: bytes, fmt: str) -> bytes:
    """A pickle whose only string opcode declares 2**40 (or 2**31 - 1) bytes it does not hold."""
    n = (2**31 - 1) if fmt == "<I" else 2**40
    return b"\x80\x05" + opcode + struct.pack(fmt, n) + b"abc."


def crafted(tmp: Path) -> dict[str, tuple[Path, str]]:
    """Every crafted checkpoint: name -> (path, what its CheckpointError must say)."""
    files: dict[str, tuple[Path, str]] = {}
    small = relu_state(4, 8, torch.zeros)
    files["ours: config claims 8192x32768, 4 floats present"] = (
        ours(tmp / "ours-big", {"d_in": BIG[0], "d_sae": BIG[1]}),
        r"missing keys|expected \(8192, 32768\)",
    )
    files["ours: config sizes 2**40"] = (
        ours(tmp / "ours-2-40", {"d_in": 2**40, "d_sae": 2**40}),
        "declares sizes no SAE can have",
    )
    (tmp / "ours-huge-int").mkdir()
    huge = '{"d_in": 1' + "0" * 5000 + ', "d_sae": 8}'
    (tmp / "ours-huge-int" / "cfg.json").write_text(
        json.dumps({**OURS, "sae": "SAE"}).replace('"SAE"', huge)
    )
    files["ours: d_in=10**5000 in cfg.json"] = (tmp / "ours-huge-int", "is not a config")
    (tmp / "ours-deep").mkdir()
    (tmp / "ours-deep" / "cfg.json").write_text('{"sae": ' + "[" * 100_000 + "]" * 100_000 + "}")
    files["ours: cfg.json nested 100,000 deep"] = (tmp / "ours-deep", "nests .* too deeply")
    files["ours: safetensors without the tensors its config needs"] = (
        ours(tmp / "ours-wrong", {"d_in": 4, "d_sae": 8}, {"W_enc": torch.zeros(4, 8)}),
        "missing keys",
    )
    files["original: config claims 8192x32768, tiny tensors"] = (
        original(tmp / "claims.pt", {"d_in": BIG[0], "d_sae": BIG[1]}, small),
        r"W_enc: expected \(8192, 32768\), found \(4, 8\)",
    )
    files["original: stride-0 8192x32768 tensors"] = (
        original(tmp / "stride0.pt", {"d_in": BIG[0], "d_sae": BIG[1]}, relu_state(*BIG, stride0)),
        "stride-0 or overlapping view",
    )
    files["original: huge stride-0 2**21 x 2**21 tensor"] = (
        original(tmp / "huge.pt", {"d_in": 4, "d_sae": 8}, {"W_enc": stride0(2**21, 2**21)}),
        "stride-0 or overlapping view",
    )
    files["original: overlapping (stride 1, 1) view"] = (
        original(
            tmp / "overlap.pt",
            {"d_in": 4, "d_sae": 8},
            {"W_enc": torch.zeros(11).as_strided((4, 8), (1, 1))},
        ),
        "stride-0 or overlapping view",
    )
    files["original: config sizes 2**40"] = (
        original(tmp / "sizes.pt", {"d_in": 2**40, "d_sae": 2**40}, small),
        "declares sizes no SAE can have",
    )
    files["original: d_in=10**5000"] = (
        original(tmp / "digits.pt", {"d_in": 10**5000, "d_sae": 8}, small),
        "declares sizes no SAE can have",
    )
    zeros = relu_state(1024, 2048, torch.zeros)
    files["original: deflated zip of zero weights (zip bomb)"] = (
        deflated(original(tmp / "z.pt", {"d_in": 1024, "d_sae": 2048}, zeros), tmp / "zip.pt"),
        "decompression bomb",
    )
    files["original: gzip of zero weights (gzip bomb)"] = (
        original(tmp / "bomb.pkl.gz", {"d_in": 1024, "d_sae": 2048}, zeros, fmt="gz"),
        "decompression bomb",
    )
    (tmp / "deep.pkl").write_bytes(deep_list_pickle(100_000))
    files["original: config list nested 100,000 deep"] = (tmp / "deep.pkl", "no integer d_in")
    for name, opcode, fmt in [
        ("BINUNICODE", b"X", "<I"),
        ("BINUNICODE8", b"\x8d", "<Q"),
        ("BINBYTES8", b"\x8e", "<Q"),
        ("BYTEARRAY8", b"\x96", "<Q"),
    ]:
        (tmp / f"{name}.pkl").write_bytes(absurd_length(opcode, fmt))
        files[f"pickle: {name} declaring an absurd length"] = (
            tmp / f"{name}.pkl",
            r"declares? .*(bytes|length)|asks for \d+ bytes",
        )
    (tmp / "truncated.pkl").write_bytes(pickle.dumps({"cfg": {}, "state_dict": {}})[:-3])
    files["pickle: truncated"] = (tmp / "truncated.pkl", r"\w")
    return files


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    return crafted(tmp_path_factory.mktemp("crafted"))


def test_every_crafted_checkpoint_is_one_clear_checkpoint_error(files):
    for name, (path, reason) in files.items():
        with pytest.raises(CheckpointError) as caught:
            load(path)
        message = str(caught.value)
        assert "\n" not in message and len(message) < 1000, name
        assert str(path) in message, (name, message)
        assert re.search(reason, message), (name, message)


def test_crafted_checkpoints_exit_2_from_the_cli(files, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(cli.TRACEBACK_ENV, raising=False)
    acts = np.random.default_rng(0).normal(size=(4, 3, 4)).astype(np.float32)
    store = make_store(tmp_path / "store", acts)
    for name, (path, _) in files.items():
        assert cli.main(["evaluate", "--sae", str(path), "--store", str(store)]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("patchsae evaluate: error: ") and err.count("\n") == 1, (name, err)


PROBE = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    from patchsae.sae.io import CheckpointError, load
    try:  # warm up: imports and allocator pools before the first measurement
        load(sys.argv[1])
    except CheckpointError:
        pass
    out = {}
    for path in sys.argv[1:]:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            load(path)
            refused = False
        except CheckpointError:
            refused = True
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out[path] = [refused, (after - before) * 1024]
    print(json.dumps(out))
    """
)


def peak_growth(paths: list[Path]) -> dict[str, tuple[bool, int]]:
    """For each path, in one fresh process: (refused, growth of the peak RSS in bytes).

    Peak RSS only rises, so each load's growth is measured against the peak before it (one
    process for all, sharing the import cost): a load that stays under an earlier peak shows 0.
    """
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *map(str, paths)],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return {k: (v[0], v[1]) for k, v in json.loads(done.stdout.splitlines()[-1]).items()}


def on_disk(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*")) if path.is_dir() else path.stat().st_size


def test_loading_crafted_checkpoints_stays_within_a_small_multiple_of_their_size(files):
    """Each load grows the peak RSS by at most 32 MiB + 8 x the file's size (the largest
    crafted file is ~1 MiB; before the fix they claimed up to 2.3 GB, or 16 TiB)."""
    paths = [path for path, _ in files.values()]
    growth = peak_growth(paths)
    for name, (path, _) in files.items():
        refused, grown = growth[str(path)]
        assert refused, name
        limit = 32 * 2**20 + 8 * on_disk(path)
        assert grown <= limit, f"{name}: peak RSS grew by {grown} bytes (limit {limit})"
