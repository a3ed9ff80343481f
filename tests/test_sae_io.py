"""Checkpoint I/O: our format, SAELens interop, original PatchSAE pickles, safety, atomicity."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import gzip
import io
import json
import os
import pickle
import subprocess
import sys
import textwrap
import tracemalloc
import types
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from assets import GOLDEN_CHECKPOINT
from patchsae.sae.config import SAEConfig
from patchsae.sae.io import (
    CFG,
    WEIGHTS,
    CheckpointError,
    checkpoint_info,
    export_saelens,
    load,
    save,
)
from patchsae.sae.registry import available_archs, make_sae
from patchsae.sae.unpickle import (
    LEGACY_MAGIC,
    LEGACY_PROTOCOL,
    PickleRefused,
    read_pickled_checkpoint,
)

ORIGINAL_MODULE = "src.sae_training.config"


def random_sae(arch: str, d_in: int = 8, d_sae: int = 32, dtype: str = "float32", seed: int = 0):
    """A small SAE whose every tensor (buffers included) holds non-trivial values."""
    torch.manual_seed(seed)
    k_options = {"k": 4, "aux_k": 8} if arch in ("topk", "batchtopk") else {}
    sae = make_sae(SAEConfig(arch=arch, d_in=d_in, d_sae=d_sae, dtype=dtype, **k_options))
    with torch.no_grad():
        for name, tensor in sae.state_dict().items():
            if name == "threshold":
                tensor.fill_(0.05)
            elif name == "threshold_steps":
                tensor.fill_(7)
            elif name == "log_threshold":
                tensor.copy_(torch.empty_like(tensor).uniform_(-4, -1))
            else:
                tensor.add_(0.1 * torch.randn_like(tensor))
    return sae


def outputs(sae, x):
    with torch.no_grad():
        codes = sae.encode(x)
        return codes, sae.decode(codes)


@pytest.mark.parametrize("arch", available_archs())
def test_round_trip_every_arch(tmp_path, arch):
    sae = random_sae(arch)
    save(sae, tmp_path / "ckpt", extra={"step": 12, "layer": -2})
    loaded = load(tmp_path / "ckpt")
    assert type(loaded) is type(sae) and loaded.cfg == sae.cfg
    expected, found = sae.state_dict(), loaded.state_dict()
    assert list(found) == list(expected)
    for key in expected:
        assert found[key].dtype == expected[key].dtype and torch.equal(found[key], expected[key])
    x = torch.randn(3, 5, 8)
    for ours, theirs in zip(outputs(sae, x), outputs(loaded, x), strict=True):
        assert torch.equal(ours, theirs)
    info = checkpoint_info(tmp_path / "ckpt" / WEIGHTS)
    assert (info["format"], info["format_version"], info["step"], info["layer"]) == (
        "patchsae-sae",
        1,
        12,
        -2,
    )
    assert info["sae"]["arch"] == arch


def test_round_trip_bfloat16(tmp_path):
    sae = random_sae("relu", dtype="bfloat16")
    loaded = load(save(sae, tmp_path / "bf16"))
    assert loaded.W_dec.dtype == torch.bfloat16
    assert torch.equal(loaded.W_dec, sae.W_dec) and torch.equal(loaded.b_enc, sae.b_enc)


def test_save_refuses_bad_extra_and_mixed_folders(tmp_path):
    sae = random_sae("relu")
    with pytest.raises(CheckpointError, match="reserved"):
        save(sae, tmp_path / "a", extra={"sae": {}})
    with pytest.raises(CheckpointError, match="JSON"):
        save(sae, tmp_path / "b", extra={"tensor": torch.zeros(1)})
    assert not (tmp_path / "b" / CFG).exists()
    saelens = export_saelens(sae, tmp_path / "saelens")
    with pytest.raises(CheckpointError, match="not a patchsae-sae checkpoint"):
        save(sae, saelens)
    ours = save(sae, tmp_path / "ours")
    with pytest.raises(CheckpointError, match="holds a patchsae-sae checkpoint"):
        export_saelens(sae, ours)


def test_newer_format_version_is_refused(tmp_path):
    folder = save(random_sae("relu"), tmp_path / "ckpt")
    info = json.loads((folder / CFG).read_text())
    info["format_version"] = 2
    (folder / CFG).write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="format_version 2.*upgrade"):
        load(folder)


@pytest.mark.parametrize("failing_call", [1, 2])
def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch, failing_call):
    folder = tmp_path / "ckpt"
    old, new = random_sae("relu", seed=1), random_sae("relu", seed=2)
    save(old, folder)
    real_replace = os.replace
    calls = []

    def flaky_replace(src, dst):
        calls.append(dst)
        if len(calls) == failing_call:
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", flaky_replace)
    with pytest.raises(OSError, match="disk full"):
        save(new, folder)
    monkeypatch.setattr(os, "replace", real_replace)
    assert len(calls) == failing_call
    with warnings_if(failing_call == 2):
        loaded = load(folder)
    assert torch.equal(loaded.W_enc, old.W_enc) and torch.equal(loaded.W_dec, old.W_dec)
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    save(new, folder)
    assert torch.equal(load(folder).W_enc, new.W_enc)
    assert sorted(p.name for p in folder.iterdir()) == sorted([CFG, WEIGHTS])


def warnings_if(expected: bool):
    return pytest.warns(UserWarning, match="interrupted") if expected else contextlib.nullcontext()


def test_weights_from_another_save_are_refused(tmp_path):
    first = save(random_sae("relu", seed=1), tmp_path / "first")
    second = save(random_sae("relu", seed=2), tmp_path / "second")
    os.replace(second / WEIGHTS, first / WEIGHTS)
    with pytest.raises(CheckpointError, match="different saves"):
        load(first)


def test_wrong_shape_names_expected_and_found(tmp_path):
    folder = save(random_sae("relu", d_in=16, d_sae=64), tmp_path / "ckpt")
    with safe_open(str(folder / WEIGHTS), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(folder / WEIGHTS)
    tensors["W_dec"] = tensors["W_dec"].t().contiguous()
    del tensors["b_enc"]
    save_file(tensors, folder / WEIGHTS, metadata=metadata)
    with pytest.raises(CheckpointError, match="has changed since it was written"):
        load(folder)
    info = json.loads((folder / CFG).read_text())
    del info["weights_checksum"]  # as saved before checksums: the shapes are checked
    (folder / CFG).write_text(json.dumps(info))
    with pytest.raises(CheckpointError) as err:
        load(folder)
    assert "W_dec: expected (64, 16), found (16, 64)" in str(err.value)
    assert "missing keys ['b_enc']" in str(err.value)


def test_unknown_and_missing_layouts_are_explained(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load(tmp_path / "nothing")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="unknown format.*SAELens.*PatchSAE"):
        load(text)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "weights.bin").write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="no checkpoint.*weights.bin.*SAELens"):
        load(empty)
    folder = save(random_sae("relu"), tmp_path / "ckpt")
    (folder / CFG).unlink()
    with pytest.raises(CheckpointError, match="no cfg.json; both cfg.json and sae.safetensors"):
        load(folder)
    other = tmp_path / "other"
    other.mkdir()
    (other / CFG).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CheckpointError, match="neither"):
        load(other)


# SAELens --------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["relu", "topk", "jumprelu", "batchtopk"])
def test_saelens_export_and_load_round_trip(tmp_path, arch):
    sae = random_sae(arch)
    folder = export_saelens(sae, tmp_path / "saelens")
    info = json.loads((folder / CFG).read_text())
    tensors = load_file(folder / "sae_weights.safetensors")
    expected_arch = {"relu": "standard", "topk": "topk"}.get(arch, "jumprelu")
    assert info["architecture"] == expected_arch
    assert tuple(tensors["W_enc"].shape) == (8, 32) and tuple(tensors["W_dec"].shape) == (32, 8)
    if arch == "batchtopk":
        assert torch.equal(tensors["threshold"], torch.full((32,), 0.05))
    if arch == "jumprelu":
        assert torch.allclose(tensors["threshold"], sae.log_threshold.exp())
    loaded = load(folder)
    x = torch.randn(4, 3, 8)
    for ours, theirs in zip(outputs(sae, x), outputs(loaded, x), strict=True):
        torch.testing.assert_close(theirs, ours, rtol=1e-6, atol=1e-6)
    assert (outputs(sae, x)[0] > 0).any()


@pytest.mark.parametrize("arch", ["relu", "topk", "jumprelu", "batchtopk"])
def test_saelens_library_reads_export_identically(tmp_path, arch):
    sae_lens = pytest.importorskip("sae_lens")
    sae = random_sae(arch)
    export_saelens(sae, tmp_path / "saelens")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "saelens"))
    x = torch.randn(4, 3, 8)
    codes, x_hat = outputs(sae, x)
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), codes, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(theirs(x), x_hat, rtol=1e-6, atol=1e-6)
    assert (codes > 0).any() and (codes == 0).any()


def _randomize(module, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(0.3 * torch.randn_like(param))


def test_saelens_library_checkpoints_load(tmp_path):
    pytest.importorskip("sae_lens")
    from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    theirs = {
        "standard": StandardSAE(StandardSAEConfig(d_in=8, d_sae=32, apply_b_dec_to_input=False)),
        "topk": TopKSAE(TopKSAEConfig(d_in=8, d_sae=32, k=5, rescale_acts_by_decoder_norm=True)),
        "jumprelu": JumpReLUSAE(JumpReLUSAEConfig(d_in=8, d_sae=32)),
    }
    x = torch.randn(6, 8)
    for i, (name, model) in enumerate(theirs.items()):
        _randomize(model, i)
        if name == "jumprelu":
            with torch.no_grad():
                model.threshold.copy_(torch.rand(32) * 0.5)
        model.save_model(tmp_path / name)
        ours = load(tmp_path / name)
        assert ours.cfg.arch == {"standard": "relu"}.get(name, name)
        with torch.no_grad():
            torch.testing.assert_close(ours.encode(x), model.encode(x), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ours(x), model(x), rtol=1e-5, atol=1e-5)


def _write_saelens(folder: Path, info: dict, tensors: dict) -> Path:
    folder.mkdir()
    (folder / CFG).write_text(json.dumps(info))
    save_file(tensors, folder / "sae_weights.safetensors")
    return folder


def test_saelens_batchtopk_training_layout(tmp_path):
    torch.manual_seed(0)
    tensors = {
        "W_enc": torch.randn(8, 32),
        "b_enc": torch.randn(32) * 0.1,
        "W_dec": torch.randn(32, 8),
        "b_dec": torch.randn(8) * 0.1,
        "topk_threshold": torch.tensor(0.7, dtype=torch.float64),
    }
    info = {"architecture": "batchtopk", "d_in": 8, "d_sae": 32, "k": 4.0, "dtype": "float32"}
    ours = load(_write_saelens(tmp_path / "btk", info, tensors))
    assert ours.cfg.arch == "batchtopk" and ours.cfg.k == 4
    x = torch.randn(5, 8)
    pre = (x - tensors["b_dec"]) @ tensors["W_enc"] + tensors["b_enc"]
    brute = torch.relu(pre) * (pre > 0.7)
    torch.testing.assert_close(ours.encode(x), brute, rtol=1e-6, atol=1e-6)


def test_saelens_pre_v6_topk_config(tmp_path):
    torch.manual_seed(0)
    tensors = {"W_enc": torch.randn(8, 32), "b_enc": torch.randn(32)}
    tensors.update(W_dec=torch.randn(32, 8), b_dec=torch.randn(8))
    info = {
        "d_in": 8,
        "d_sae": 32,
        "dtype": "torch.float32",
        "activation_fn": "topk",
        "activation_fn_kwargs": {"k": 3},
        "normalize_activations": False,
    }
    ours = load(_write_saelens(tmp_path / "old", info, tensors))
    assert (ours.cfg.arch, ours.cfg.k, ours.cfg.dtype) == ("topk", 3, "float32")
    assert torch.equal((ours.encode(torch.randn(5, 8)) > 0).sum(-1) <= 3, torch.ones(5).bool())


def test_saelens_unsupported_configs_are_refused(tmp_path):
    tensors = {"W_enc": torch.zeros(8, 32), "b_enc": torch.zeros(32)}
    tensors.update(W_dec=torch.zeros(32, 8), b_dec=torch.zeros(8))
    base = {"d_in": 8, "d_sae": 32}
    with pytest.raises(CheckpointError, match="gated.*not supported"):
        load(_write_saelens(tmp_path / "g", {**base, "architecture": "gated"}, tensors))
    with pytest.raises(CheckpointError, match="'matryoshka'.*supported: \\['standard', 'topk'"):
        load(_write_saelens(tmp_path / "m", {**base, "architecture": "matryoshka"}, tensors))
    norm = {**base, "architecture": "standard", "normalize_activations": "layer_norm"}
    with pytest.raises(CheckpointError, match="normalize_activations='layer_norm'"):
        load(_write_saelens(tmp_path / "n", norm, tensors))
    wrong = {**tensors, "W_dec": torch.zeros(8, 32)}
    with pytest.raises(CheckpointError, match=r"W_dec: expected \(32, 8\), found \(8, 32\)"):
        load(_write_saelens(tmp_path / "w", {**base, "architecture": "standard"}, wrong))


# Original PatchSAE checkpoints ------------------------------------------------------------


@contextlib.contextmanager
def original_config_module():
    """A stand-in ``src.sae_training.config`` importable only inside the block, for writing."""

    @dataclasses.dataclass
    class ViTSAERunnerConfig:
        d_in: int = 16
        expansion_factor: int = 4
        d_sae: int | None = 64
        l1_coefficient: float = 3e-4
        use_ghost_grads: bool | None = None
        mse_cls_coefficient: float = 1.0
        gated_sae: bool | None = None
        device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
        dtype: torch.dtype = torch.float32

    ViTSAERunnerConfig.__module__ = ORIGINAL_MODULE
    ViTSAERunnerConfig.__qualname__ = "ViTSAERunnerConfig"
    names = ("src", "src.sae_training", ORIGINAL_MODULE)
    for name in names:
        sys.modules[name] = types.ModuleType(name)
    sys.modules[ORIGINAL_MODULE].ViTSAERunnerConfig = ViTSAERunnerConfig
    try:
        yield ViTSAERunnerConfig
    finally:
        for name in names:
            del sys.modules[name]


def write_pickle(path: Path, obj, fmt: str) -> Path:
    """``obj`` as torch.save zip ("zip"), legacy torch.save ("legacy") or gzip pickle ("gz")."""
    if fmt == "zip":
        torch.save(obj, path)
    elif fmt == "legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:
        with gzip.open(path, "wb") as handle:
            pickle.dump(obj, handle)
    return path


def write_original(path: Path, state: dict, fmt: str, cfg_key: str = "cfg", **fields) -> Path:
    with original_config_module() as config_class:
        return write_pickle(path, {cfg_key: config_class(**fields), "state_dict": state}, fmt)


@pytest.mark.parametrize("fmt", ["zip", "legacy", "gz"])
@pytest.mark.parametrize("cfg_key", ["cfg", "config"])
def test_original_format_round_trip(tmp_path, fmt, cfg_key):
    sae = random_sae("relu", d_in=16, d_sae=64, dtype="float64")
    state = {k: v.clone() for k, v in sae.state_dict().items()}
    path = write_original(
        tmp_path / "sae.ckpt", state, fmt, cfg_key, use_ghost_grads=True, dtype=torch.float64
    )
    loaded = load(path)
    assert ORIGINAL_MODULE not in sys.modules
    assert loaded.cfg == SAEConfig(
        arch="relu", d_in=16, d_sae=64, dtype="float64", l1_coefficient=3e-4, use_ghost_grads=True
    )
    for key, value in state.items():
        assert torch.equal(loaded.state_dict()[key], value)


def test_original_d_sae_from_expansion_factor_and_wrong_shape(tmp_path):
    sae = random_sae("relu", d_in=16, d_sae=64)
    state = {k: v.clone() for k, v in sae.state_dict().items()}
    path = write_original(tmp_path / "a.pt", state, "zip", d_sae=None, expansion_factor=4)
    assert load(path).cfg.d_sae == 64
    state["W_dec"] = state["W_dec"].t()
    path = write_original(tmp_path / "b.pt", state, "zip")
    with pytest.raises(CheckpointError, match=r"W_dec: expected \(64, 16\), found \(16, 64\)"):
        load(path)
    path = write_original(tmp_path / "c.pt", state, "zip", gated_sae=True)
    with pytest.raises(CheckpointError, match="gated"):
        load(path)


def test_unpickler_rebuilds_views_and_dtypes_like_torch(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    obj = {
        "view": base[1:, 2:],
        "transposed": base.t(),
        "same": base,
        "bf16": torch.randn(3, dtype=torch.bfloat16),
        "long": torch.arange(5),
        "flags": torch.tensor([True, False]),
        "nested": [(1, 2.5, "a", None), {"b": {3, 4}}],
    }
    for fmt in ("zip", "legacy", "gz"):
        found = read_pickled_checkpoint(write_pickle(tmp_path / f"obj.{fmt}", obj, fmt))
        for key in ("view", "transposed", "same", "bf16", "long", "flags"):
            assert found[key].dtype == obj[key].dtype and torch.equal(found[key], obj[key])
            assert found[key].stride() == obj[key].stride()
        assert found["nested"] == obj["nested"]


def test_malformed_pickles_get_a_clear_error(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x80\x04garbage")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load(garbage)
    bad_call = tmp_path / "bad_call.pkl"
    bad_call.write_bytes(b"ctorch\ndevice\n(S'nonsense'\ntR.")
    with pytest.raises(CheckpointError, match="not a readable checkpoint: RuntimeError"):
        load(bad_call)
    not_a_dict = write_pickle(tmp_path / "list.pt", [torch.zeros(2)], "zip")
    with pytest.raises(CheckpointError, match="'cfg' \\(or 'config'\\) and 'state_dict'"):
        load(not_a_dict)


def test_truncated_storage_is_refused(tmp_path):
    path = write_pickle(tmp_path / "t.pt", {"w": torch.randn(10)}, "zip")
    broken = tmp_path / "broken.pt"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(broken, "w") as dst:
        for name in src.namelist():
            data = src.read(name)
            dst.writestr(name, data[:8] if name.endswith("data/0") else data)
    with pytest.raises(PickleRefused, match="expected 40 bytes"):
        read_pickled_checkpoint(broken)


@pytest.mark.skipif(
    not GOLDEN_CHECKPOINT.is_dir(), reason="needs ../shared/golden/patchsae_checkpoint"
)
@pytest.mark.parametrize("name", ["sae.pt", "sae.pkl.gz"])
def test_golden_patchsae_checkpoints(name):
    expected = load_file(GOLDEN_CHECKPOINT / "expected.safetensors")
    sae = load(GOLDEN_CHECKPOINT / name)
    assert ORIGINAL_MODULE not in sys.modules
    cfg = sae.cfg
    assert (cfg.arch, cfg.d_in, cfg.d_sae, cfg.dtype) == ("relu", 16, 64, "float32")
    assert (cfg.l1_coefficient, cfg.use_ghost_grads, cfg.mse_cls_coefficient) == (8e-5, True, 1.0)
    for key in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(sae.state_dict()[key], expected[f"state_dict.{key}"])
    codes, x_hat = outputs(sae, expected["x"])
    torch.testing.assert_close(codes, expected["feature_acts"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(x_hat, expected["sae_out"], rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(
    not GOLDEN_CHECKPOINT.is_dir(), reason="needs ../shared/golden/patchsae_checkpoint"
)
def test_golden_needs_the_restricted_unpickler():
    with pytest.raises(pickle.UnpicklingError):
        torch.load(GOLDEN_CHECKPOINT / "sae.pt", weights_only=True)


# Malicious pickles ----------------------------------------------------------------------------


class Payload:
    """Pickles as a call of ``func(*args)``."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def payloads(marker: Path) -> dict[str, object]:
    command = f"touch {marker}"
    return {
        "posix.system": Payload(os.system, (command,)),
        "builtins.eval": Payload(eval, (f"open({str(marker)!r}, 'w')",)),
        "builtins.exec": Payload(exec, (f"open({str(marker)!r}, 'w')",)),
        "subprocess.call": Payload(subprocess.call, (["touch", str(marker)],)),
        "functools.partial": Payload(functools.partial(os.system, command), ()),
    }


@pytest.mark.parametrize("fmt", ["zip", "gz", "legacy"])
@pytest.mark.parametrize(
    "refused",
    ["posix.system", "builtins.eval", "builtins.exec", "subprocess.call", "functools.partial"],
)
def test_malicious_pickles_are_refused(tmp_path, fmt, refused):
    marker = tmp_path / "pwned"
    payload = payloads(marker)[refused]
    state = {"W_enc": torch.zeros(2, 3)}
    evil = {"cfg": {"d_in": 2, "d_sae": 3}, "state_dict": state, "hook": payload}
    path = write_pickle(tmp_path / "evil", evil, fmt)
    with pytest.raises(CheckpointError, match=f"refused global {refused}"):
        load(path)
    assert not marker.exists()


def test_malicious_payload_is_live(tmp_path):
    """The payload really runs under a plain unpickler, so the refusal above is meaningful."""
    marker = tmp_path / "pwned"
    data = pickle.dumps(payloads(marker)["builtins.eval"])
    pickle.loads(data)
    assert marker.exists()


def test_malicious_config_state_and_getattr_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    with original_config_module() as config_class:
        cfg = config_class(l1_coefficient=Payload(os.system, (f"touch {marker}",)))
        path = write_pickle(tmp_path / "evil.pt", {"cfg": cfg, "state_dict": {}}, "zip")
    with pytest.raises(CheckpointError, match="refused global posix.system"):
        load(path)
    getattr_pickle = b"cbuiltins\ngetattr\n(cbuiltins\nstr\nS'join'\ntR."
    hand = tmp_path / "getattr.pkl"
    hand.write_bytes(getattr_pickle)
    with pytest.raises(CheckpointError, match="refused global builtins.getattr"):
        load(hand)
    with pytest.raises(PickleRefused, match="refused global builtins.getattr"):
        read_pickled_checkpoint(hand)
    assert not marker.exists()


def test_storage_type_markers_take_no_state(tmp_path):
    for name, state in [("dict", b"}"), ("slots", b"(N}")]:
        close = b"t" if name == "slots" else b""
        hand = tmp_path / f"{name}.pkl"
        dtype_entry = b"S'dtype'\nctorch\nint64\ns"
        hand.write_bytes(b"ctorch\nFloatStorage\n" + state + dtype_entry + close + b"b.")
        with pytest.raises(PickleRefused, match="torch.FloatStorage takes no pickled state"):
            read_pickled_checkpoint(hand)


def test_torch_names_are_looked_up_without_torch_getattr(tmp_path, monkeypatch):
    asked = []

    def spy(name):
        asked.append(name)
        raise AttributeError(name)

    monkeypatch.setattr(torch, "__getattr__", spy)
    hand = tmp_path / "lazy.pkl"
    hand.write_bytes(b"ctorch\nno_such_name\n.")
    with pytest.raises(PickleRefused, match="refused global torch.no_such_name"):
        read_pickled_checkpoint(hand)
    hand.write_bytes(b"ctorch\nhalf\n.")
    assert read_pickled_checkpoint(hand) is torch.float16
    assert asked == []


class StorageRef:
    """Pickles as the persistent id of a float32 storage of ``numel`` elements."""

    def __init__(self, key: str, numel: int):
        self.key, self.numel = key, numel


class StoragePickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, StorageRef):
            return ("storage", torch.float32, obj.key, "cpu", obj.numel, None)
        return None


def write_legacy_storage_ids(path: Path, n_ids: int, pad_bytes: int) -> Path:
    """A legacy stream padded to ``pad_bytes`` whose object names ``n_ids`` storages, each
    claiming the whole padding; no storage data follows."""
    with open(path, "wb") as handle:
        for part in (
            LEGACY_MAGIC,
            LEGACY_PROTOCOL,
            {"little_endian": True, "pad": bytes(pad_bytes)},
        ):
            pickle.dump(part, handle, protocol=2)
        refs = [StorageRef(str(i), pad_bytes // 4) for i in range(n_ids)]
        StoragePickler(handle, protocol=2).dump(refs)
        pickle.dump([ref.key for ref in refs], handle, protocol=2)
    return path


def test_legacy_storage_ids_cannot_claim_the_file_many_times(tmp_path):
    path = write_legacy_storage_ids(tmp_path / "ids.pt", n_ids=1000, pad_bytes=2**19)
    with pytest.raises(PickleRefused, match="storage 1 .*more than the checkpoint holds"):
        read_pickled_checkpoint(path)
    probe = textwrap.dedent(
        """
        import resource, sys
        from patchsae.sae.unpickle import PickleRefused, read_pickled_checkpoint
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            read_pickled_checkpoint(sys.argv[1])
        except PickleRefused:
            print("refused")
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, str(path)], capture_output=True, text=True, check=True
    )
    refused, grown_kib = result.stdout.split()
    assert refused == "refused"
    assert int(grown_kib) < 64 * 1024, f"peak RSS grew by {grown_kib} KiB"


def test_repeated_load_from_bytes_is_refused(tmp_path):
    blob = io.BytesIO()
    torch.save(torch.arange(2**14, dtype=torch.float32), blob, _use_new_zipfile_serialization=False)
    once = Payload(torch.storage._load_from_bytes, (blob.getvalue(),))
    path = write_pickle(tmp_path / "once.pkl.gz", [once], "gz")
    assert torch.equal(read_pickled_checkpoint(path)[0], torch.arange(2**14, dtype=torch.float32))
    calls = [Payload(torch.storage._load_from_bytes, (blob.getvalue(),)) for _ in range(20)]
    path = write_pickle(tmp_path / "many.pkl.gz", calls, "gz")
    with pytest.raises(PickleRefused, match="more than the checkpoint holds"):
        read_pickled_checkpoint(path)


def traced_peak(func) -> int:
    """Peak bytes Python allocated while ``func()`` ran (tracemalloc)."""
    tracemalloc.start()
    try:
        func()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def test_repeated_latin1_encode_shares_one_result(tmp_path):
    import codecs

    text = "x" * 2**20
    path = tmp_path / "encode.pkl"
    path.write_bytes(pickle.dumps([Payload(codecs.encode, (text, "latin1")) for _ in range(64)]))
    found = []
    peak = traced_peak(lambda: found.extend(read_pickled_checkpoint(path)))
    assert len(found) == 64 and found[0] == text.encode("latin1")
    assert all(item is found[0] for item in found)
    assert peak < 16 * 2**20, f"peak {peak} bytes"


def test_gzip_bomb_is_refused_without_decompressing_it(tmp_path):
    bomb = tmp_path / "bomb.pkl.gz"
    with gzip.open(bomb, "wb", compresslevel=1) as handle:
        for _ in range(64):
            handle.write(bytes(2**20))
    assert bomb.stat().st_size < 2**20

    def refused():
        with pytest.raises(PickleRefused, match="decompressed.*larger than max_bytes=1048576"):
            read_pickled_checkpoint(bomb, max_bytes=2**20)

    peak = traced_peak(refused)
    assert peak < 8 * 2**20, f"peak {peak} bytes"
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps(list(range(2**10))))
    assert read_pickled_checkpoint(plain) == list(range(2**10))
    with pytest.raises(PickleRefused, match="plain.pkl is larger than max_bytes=1024"):
        read_pickled_checkpoint(plain, max_bytes=2**10)


def test_zip_members_past_max_bytes_are_refused_before_reading(tmp_path):
    saved = write_pickle(tmp_path / "big.pt", {"w": torch.zeros(2**22)}, "zip")
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(saved) as src, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as dst:
        for name in src.namelist():
            dst.writestr(name, src.read(name))
    assert bomb.stat().st_size < 2**20
    trusted = read_pickled_checkpoint(bomb, max_inflation=float("inf"))
    assert torch.equal(trusted["w"], torch.zeros(2**22))

    def refused():
        with pytest.raises(PickleRefused, match=r"zip member .*data/0 \(16777216 bytes\)"):
            read_pickled_checkpoint(bomb, max_bytes=2**20, max_inflation=float("inf"))

    peak = traced_peak(refused)
    assert peak < 4 * 2**20, f"peak {peak} bytes"


def copy_bomb(global_line: bytes, n_items: int, n_calls: int, pairs: bool, spread: bool) -> bytes:
    """A protocol-2 pickle of the list ``[(7, 7), big, result, ...]``: ``big`` (memo 1) is a
    tuple of ``n_items`` items (``7``, or the memoised pair when ``pairs``), each result a REDUCE
    call of the ``global_line`` callable on it: ``callable(*big)`` when ``spread``, else
    ``callable(big)``."""
    item = b"h\x00" if pairs else b"K\x07"
    big = b"K\x07K\x07\x86q\x00(" + item * n_items + b"tq\x01"
    call = global_line + b"h\x01" + (b"" if spread else b"\x85") + b"R"
    return b"\x80\x02](" + big + call * n_calls + b"e."


@pytest.mark.parametrize(
    "global_line, pairs, spread, expected",
    [
        (b"cbuiltins\nset\n", False, False, {7}),
        (b"c__builtin__\nfrozenset\n", False, False, frozenset({7})),
        (b"ccollections\nOrderedDict\n", True, False, {7: 7}),
        (b"ctorch\nSize\n", False, False, torch.Size([7] * 1000)),
        (b"csrc.sae_training.config\nViTSAERunnerConfig\n", False, True, (7,) * 1000),
    ],
)
def test_copying_one_memoised_container_many_times_is_refused(
    tmp_path, global_line, pairs, spread, expected
):
    module, name = global_line[1:].decode().split()
    name = f"{module.replace('__builtin__', 'builtins')}.{name}"
    placeholders = (ORIGINAL_MODULE,) if spread else ()
    once = tmp_path / "once.pkl"
    once.write_bytes(copy_bomb(global_line, 1000, 1, pairs, spread))
    found = read_pickled_checkpoint(once, placeholder_modules=placeholders)[2]
    assert (found.args if spread else found) == expected
    bomb = tmp_path / "bomb.pkl"
    bomb.write_bytes(copy_bomb(global_line, 100_000, 128, pairs, spread))
    assert bomb.stat().st_size < 2**18

    def refused():
        with pytest.raises(PickleRefused, match=f"{name}.*copy budget"):
            read_pickled_checkpoint(bomb, placeholder_modules=placeholders)

    peak = traced_peak(refused)
    assert peak < 16 * 2**20, f"peak {peak} bytes"


def test_pickled_state_is_refused_outside_placeholders_and_ordered_dicts(tmp_path):
    hand = tmp_path / "defaults.pkl"
    hand.write_bytes(b"ctorch._utils\n_rebuild_tensor\n(N}S'__defaults__'\n(I1\ntstb.")
    with pytest.raises(PickleRefused, match="takes no pickled state"):
        read_pickled_checkpoint(hand)
    metadata = b"}q\x00(" + b"".join(b"J" + i.to_bytes(4, "little") + b"N" for i in range(2**14))
    one = b"ccollections\nOrderedDict\n)Rh\x00b"
    hand.write_bytes(b"\x80\x02](" + metadata + b"u" + one + b"e.")
    assert read_pickled_checkpoint(hand)[1].__dict__ == {i: None for i in range(2**14)}
    hand.write_bytes(b"\x80\x02](" + metadata + b"u" + one * 64 + b"e.")
    with pytest.raises(PickleRefused, match="OrderedDict attributes.*copy budget"):
        read_pickled_checkpoint(hand)


def test_defaultdict_of_dict_becomes_a_plain_dict_and_other_factories_are_refused(tmp_path):
    """Pickled optimiser state (``Optimizer.state``) is a ``defaultdict(dict)``."""
    state = collections.defaultdict(dict, {0: {"momentum_buffer": torch.ones(3)}})
    found = read_pickled_checkpoint(write_pickle(tmp_path / "opt.pt", {"state": state}, "zip"))
    assert type(found["state"]) is dict and torch.equal(
        found["state"][0]["momentum_buffer"], torch.ones(3)
    )
    path = write_pickle(tmp_path / "list.pt", collections.defaultdict(list), "zip")
    with pytest.raises(PickleRefused, match="refused global builtins.list"):
        read_pickled_checkpoint(path)
    hand = tmp_path / "call.pkl"
    hand.write_bytes(b"c__builtin__\ndict\n)R.")
    with pytest.raises(PickleRefused, match="not a readable checkpoint"):
        read_pickled_checkpoint(hand)


def test_load_ours_reads_only_our_folder(tmp_path):
    """Resume's loader: our folder loads; a SAELens folder or an original pickle is refused
    without reaching another format's reader."""
    from patchsae.sae.formats.ours import load_ours

    sae = random_sae("topk")
    loaded = load_ours(save(sae, tmp_path / "ours"))
    for key, value in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    saelens = export_saelens(sae, tmp_path / "saelens")
    with pytest.raises(CheckpointError, match="is not a patchsae-sae checkpoint"):
        load_ours(saelens)
    state = {k: v.clone() for k, v in random_sae("relu", 16, 64).state_dict().items()}
    (tmp_path / "orig").mkdir()
    original = write_original(tmp_path / "orig" / "sae.pt", state, "zip", d_in=16, d_sae=64)
    assert load(original).cfg.d_sae == 64
    with pytest.raises(CheckpointError, match="is not a patchsae-sae checkpoint"):
        load_ours(original.parent)


def test_run_folder_and_its_checkpoint_load_the_latest_sae(tmp_path):
    run = tmp_path / "run"
    sae = random_sae("relu")
    save(sae, run / "checkpoint" / "sae")
    x = torch.randn(5, 8)
    for where in (run, run / "checkpoint"):
        for got, want in zip(outputs(load(where), x), outputs(sae, x), strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    final = random_sae("relu", seed=1)
    save(final, run)
    torch.testing.assert_close(outputs(load(run), x)[1], outputs(final, x)[1], rtol=0, atol=0)


def test_a_sweep_checkpoint_names_its_saes_instead_of_guessing(tmp_path):
    checkpoint = tmp_path / "run" / "checkpoint"
    save(random_sae("relu"), checkpoint / "sae-00")
    save(random_sae("relu", seed=1), checkpoint / "sae-01")
    with pytest.raises(CheckpointError, match=r"2 SAEs \(sae-00, sae-01\); pass one of them"):
        load(tmp_path / "run")
    load(checkpoint / "sae-01")
