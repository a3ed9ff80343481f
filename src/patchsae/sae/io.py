"""SAE checkpoints: our versioned folder format, SAELens folders, original PatchSAE pickles.

``save(sae, dir)`` writes ``dir/sae.safetensors`` (the module's state dict) and ``dir/cfg.json``
(``{"format": "patchsae-sae", "format_version": 1, "save_id", "sae": SAEConfig,
"weights_checksum", **extra}``; ``load`` refuses weights whose checksum differs), each
through a temporary file and ``os.replace``, weights first and cfg last. Both carry the same
``save_id``; until the new cfg is in place the previous weights stay readable as
``sae.previous.safetensors``, so an interrupted save leaves the previous checkpoint loadable.

``load(path)`` detects the layout (see ``SUPPORTED``) and returns our ``SAE``, in eval mode.
``export_saelens(sae, dir)`` writes the SAELens v6 layout (``cfg.json`` +
``sae_weights.safetensors``).
The layouts are documented in docs/checkpoint.md.
"""

from __future__ import annotations

import json
import os
import reprlib
import shutil
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from patchsae.atomic import write_json, write_with
from patchsae.checksum import file_checksum, file_problem
from patchsae.config import ConfigError, from_dict, to_dict
from patchsae.sae.base import SAE
from patchsae.sae.config import SAEConfig
from patchsae.sae.registry import make_sae
from patchsae.sae.unpickle import PickleRefused, Placeholder, read_pickled_checkpoint

FORMAT = "patchsae-sae"
FORMAT_VERSION = 1
WEIGHTS = "sae.safetensors"
PREVIOUS = "sae.previous.safetensors"
CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_VERSION = "6.0.0"
ORIGINAL_CONFIG_MODULE = "src.sae_training.config"
RESERVED_KEYS = ("format", "format_version", "save_id", "sae", "weights_checksum")

SUPPORTED = (
    "a patchsae folder (cfg.json + sae.safetensors, or the sae.safetensors path), "
    "a SAELens folder (cfg.json + sae_weights.safetensors; architectures standard, topk, "
    "jumprelu, batchtopk), or an original PatchSAE checkpoint (torch.save zip file, or "
    "pickle.dump into gzip such as sae.pkl.gz)"
)


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed, unsafe, or does not match its config."""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is not readable JSON: {err}") from None
    except RecursionError:
        raise CheckpointError(f"{path} nests lists or objects too deeply to be a config") from None
    except ValueError as err:  # an integer of more digits than Python converts
        raise CheckpointError(f"{path} is not a config: {err}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors on CPU, header metadata) of a safetensors file."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
            return tensors, dict(handle.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from None


def _state_tensors(sae: SAE) -> dict[str, torch.Tensor]:
    return {key: value.detach().cpu().contiguous() for key, value in sae.state_dict().items()}


def _check_tensors(
    found: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]], source: str
) -> None:
    """CheckpointError listing missing/unexpected keys and every shape mismatch."""
    problems = []
    missing = [key for key in expected if key not in found]
    unexpected = sorted(key for key in found if key not in expected)
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    for key, shape in expected.items():
        if key in found and tuple(found[key].shape) != tuple(shape):
            problems.append(f"{key}: expected {_shape_str(shape)}, found {tuple(found[key].shape)}")
    if problems:
        raise CheckpointError(
            f"{source} does not match its config: "
            + "; ".join(problems)
            + f" (expected keys {list(expected)})"
        )


def _make_config(fields: dict[str, Any], source: str) -> SAEConfig:
    try:
        return from_dict(SAEConfig, fields)
    except ConfigError as err:
        raise CheckpointError(f"{source}: invalid SAE config: {err}") from None


def _expected_shapes(cfg: SAEConfig, source: str) -> dict[str, tuple[int, ...]]:
    """The state-dict shapes of ``make_sae(cfg)``, found on the meta device (nothing allocated),
    so sizes a config declares are checked against the tensors a file holds before any
    allocation."""
    try:
        with torch.device("meta"):
            state = make_sae(cfg).state_dict()
    except (RuntimeError, OverflowError, MemoryError, TypeError) as err:
        raise CheckpointError(
            f"{source}: the config declares sizes no SAE can have (d_in={_short(cfg.d_in)}, "
            f"d_sae={_short(cfg.d_sae)}): {type(err).__name__}"
        ) from None
    return {key: tuple(value.shape) for key, value in state.items()}


def _short(value: Any) -> str:
    """``repr(value)`` cut to a line: crafted files hold deep lists and huge integers."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    return reprlib.repr(value)


def _shape_str(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(_short(n) for n in shape) + ("," if len(shape) == 1 else "") + ")"


def _build(cfg: SAEConfig, tensors: Mapping[str, torch.Tensor], source: str, device: Any) -> SAE:
    """A ``make_sae(cfg)`` module holding ``tensors`` (checked key by key before the module is
    allocated), on ``device``."""
    _check_tensors(tensors, _expected_shapes(cfg, source), source)
    sae = make_sae(cfg)
    state = sae.state_dict()
    sae.load_state_dict({key: tensors[key].to(state[key].dtype) for key in state})
    return sae.to(device).eval()


def save(sae: SAE, dir: str | Path, extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``sae`` to the folder ``dir`` (created if needed) in our format; returns the folder.

    ``extra``: JSON-serialisable entries added to cfg.json (not the reserved keys
    ``format``, ``format_version``, ``save_id``, ``sae``).
    """
    folder = Path(dir)
    extra = dict(extra or {})
    clashes = [key for key in RESERVED_KEYS if key in extra]
    if clashes:
        raise CheckpointError(f"extra may not set the reserved cfg.json keys {clashes}")
    save_id = uuid.uuid4().hex
    info = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "save_id": save_id,
        "sae": to_dict(sae.cfg),
        **extra,
    }
    try:
        json.dumps(info)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"extra must be JSON-serialisable: {err}") from None
    tensors = _state_tensors(sae)
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "save_id": save_id}
    folder.mkdir(parents=True, exist_ok=True)
    _keep_previous(folder)
    write_with(folder / WEIGHTS, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    write_json(folder / CFG, {**info, "weights_checksum": file_checksum(folder / WEIGHTS)})
    (folder / PREVIOUS).unlink(missing_ok=True)
    return folder


def _keep_previous(folder: Path) -> None:
    """Refuse a folder whose cfg.json is not ours; keep the current weights as PREVIOUS while a
    save replaces them, unless they do not match cfg.json (an earlier save was interrupted and
    PREVIOUS already holds the weights cfg.json names)."""
    weights, cfg = folder / WEIGHTS, folder / CFG
    if not cfg.is_file():
        return
    info = _read_json(cfg)
    if info.get("format") != FORMAT:
        raise CheckpointError(
            f"{folder} holds a cfg.json that is not a {FORMAT} checkpoint; save to another folder"
        )
    if not weights.is_file() or _save_id(weights) != info.get("save_id"):
        return
    (folder / PREVIOUS).unlink(missing_ok=True)
    try:
        os.link(weights, folder / PREVIOUS)
    except OSError:
        shutil.copyfile(weights, folder / PREVIOUS)


def _save_id(path: Path) -> str | None:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return (handle.metadata() or {}).get("save_id")
    except (SafetensorError, OSError):
        return None


def checkpoint_info(path: str | Path) -> dict[str, Any]:
    """cfg.json of our checkpoint folder ``path`` (or of the folder of its sae.safetensors)."""
    path = Path(path)
    folder = path.parent if path.name == WEIGHTS else path
    info = _read_json(folder / CFG) if (folder / CFG).is_file() else None
    if info is None or info.get("format") != FORMAT:
        raise CheckpointError(
            f"{folder} is not a {FORMAT} checkpoint folder (cfg.json + {WEIGHTS})"
        )
    return info


def load(path: str | Path, device: str | torch.device = "cpu") -> SAE:
    """The SAE stored at ``path``, in eval mode on ``device``; the layout is detected from the
    files (see ``SUPPORTED``)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; expected {SUPPORTED}")
    try:
        return _load(path, device)
    except CheckpointError:
        raise
    except (RecursionError, OverflowError, MemoryError, ValueError, RuntimeError) as err:
        raise CheckpointError(
            f"{path} is not a usable checkpoint ({type(err).__name__}: {_short(str(err))})"
        ) from None


def _load(path: Path, device: Any) -> SAE:
    if path.is_file():
        if path.name in (WEIGHTS, SAELENS_WEIGHTS, CFG):
            path = path.parent
        elif _looks_pickled(path):
            return _load_original(path, device)
        else:
            raise CheckpointError(f"{path} is in an unknown format; expected {SUPPORTED}")
    cfg_path = path / CFG
    if not cfg_path.is_file():
        present = sorted(p.name for p in path.iterdir())
        for weights in (WEIGHTS, SAELENS_WEIGHTS):
            if weights in present:
                raise CheckpointError(
                    f"{path} has {weights} but no {CFG}; both {CFG} and {weights} are expected"
                )
        raise CheckpointError(f"{path} holds no checkpoint (found {present}); expected {SUPPORTED}")
    info = _read_json(cfg_path)
    if info.get("format") == FORMAT:
        return _load_ours(path, info, device)
    if "d_in" in info and "d_sae" in info and "format" not in info:
        return _load_saelens(path, info, device)
    raise CheckpointError(
        f"{cfg_path} is neither a {FORMAT} nor a SAELens config; expected {SUPPORTED}"
    )


def _looks_pickled(path: Path) -> bool:
    """A zip, gzip or protocol >= 2 pickle by its first bytes, or a pickle file by its suffix."""
    with open(path, "rb") as handle:
        head = handle.read(4)
    magic = head.startswith((b"PK\x03\x04", b"\x1f\x8b", b"\x80"))
    return magic or path.suffix in (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin")


def _load_ours(folder: Path, info: dict[str, Any], device: Any) -> SAE:
    version = info.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise CheckpointError(
            f"{folder / CFG}: format_version {version!r} is not supported (this version reads "
            f"1..{FORMAT_VERSION}); upgrade patchsae to read newer checkpoints"
        )
    if not isinstance(info.get("sae"), dict):
        raise CheckpointError(f"{folder / CFG} has no 'sae' config object")
    cfg = _make_config(info["sae"], str(folder / CFG))
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{folder} has {CFG} but no {WEIGHTS}; both files are expected")
    expected = info.get("weights_checksum")
    if expected is not None:  # saved with a checksum: it alone decides which file is cfg.json's
        problem = file_problem(weights, expected)
        if problem is not None and file_problem(folder / PREVIOUS, expected) is None:
            _warn_interrupted(folder)
            weights = folder / PREVIOUS
        elif problem is not None and _save_id(weights) != info.get("save_id"):
            raise _different_saves(folder)
        elif problem is not None:
            raise CheckpointError(
                f"{weights} {problem}: it was damaged after it was saved; use another copy or "
                "save the SAE again"
            )
        return _build(cfg, _read_safetensors(weights)[0], str(weights), device)
    tensors, metadata = _read_safetensors(weights)
    if metadata.get("save_id") != info.get("save_id"):
        previous = folder / PREVIOUS
        if not (previous.is_file() and _save_id(previous) == info.get("save_id")):
            raise _different_saves(folder)
        _warn_interrupted(folder)
        weights = previous
        tensors, _ = _read_safetensors(previous)
    return _build(cfg, tensors, str(weights), device)


def _different_saves(folder: Path) -> CheckpointError:
    return CheckpointError(
        f"{folder}: {WEIGHTS} and {CFG} come from different saves (an interrupted "
        "save without the previous weights); save the SAE again"
    )


def _warn_interrupted(folder: Path) -> None:
    warnings.warn(
        f"{folder}: the last save was interrupted; loading the previous checkpoint", stacklevel=4
    )


def _load_original(path: Path, device: Any) -> SAE:
    """An original PatchSAE ``{"cfg" | "config": ViTSAERunnerConfig, "state_dict": ...}``."""
    try:
        obj = read_pickled_checkpoint(path, placeholder_modules=[ORIGINAL_CONFIG_MODULE])
    except PickleRefused as err:
        raise CheckpointError(f"{path}: {err}") from None
    if not isinstance(obj, dict) or "state_dict" not in obj:
        found = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(
            f"{path}: expected a PatchSAE checkpoint dict with 'cfg' (or 'config') and "
            f"'state_dict', found {found}"
        )
    raw_cfg = obj.get("cfg", obj.get("config"))
    if isinstance(raw_cfg, Placeholder):
        fields = raw_cfg.state
    elif isinstance(raw_cfg, dict):
        fields = raw_cfg
    else:
        raise CheckpointError(f"{path}: expected a 'cfg' (or 'config') entry with the SAE config")
    state = obj["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: 'state_dict' must map names to tensors")
    cfg = _config_from_original(fields, str(path))
    return _build(cfg, state, str(path), device)


def _config_from_original(fields: dict[str, Any], source: str) -> SAEConfig:
    """Our relu SAEConfig from the fields of a ViTSAERunnerConfig."""
    if fields.get("gated_sae"):
        raise CheckpointError(f"{source}: gated PatchSAE checkpoints are not supported")
    d_in = fields.get("d_in")
    d_sae = fields.get("d_sae")
    if d_sae is None and isinstance(fields.get("expansion_factor"), int) and isinstance(d_in, int):
        d_sae = d_in * fields["expansion_factor"]
    dtype = fields.get("dtype", "float32")
    dtype = str(dtype).removeprefix("torch.")
    ours = {
        "arch": "relu",
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": dtype,
        "l1_coefficient": fields.get("l1_coefficient", SAEConfig.l1_coefficient),
        "use_ghost_grads": bool(fields.get("use_ghost_grads")),
        "mse_cls_coefficient": fields.get("mse_cls_coefficient", SAEConfig.mse_cls_coefficient),
    }
    if not isinstance(d_in, int) or not isinstance(d_sae, int):
        raise CheckpointError(
            f"{source}: the config has no integer d_in / d_sae ({_short(d_in)}, {_short(d_sae)})"
        )
    return _make_config(ours, source)


SAELENS_TO_OURS = {
    "standard": "relu",
    "topk": "topk",
    "jumprelu": "jumprelu",
    "batchtopk": "batchtopk",
}
SAELENS_ARCHS = tuple(SAELENS_TO_OURS)


def _load_saelens(folder: Path, info: dict[str, Any], device: Any) -> SAE:
    source = str(folder / SAELENS_WEIGHTS)
    arch = info.get("architecture", "standard")
    if info.get("activation_fn") == "topk" and "architecture" not in info:
        arch, info = "topk", {**info, "k": (info.get("activation_fn_kwargs") or {}).get("k")}
    if arch == "gated":
        raise CheckpointError(
            f"{folder}: gated SAELens SAEs are not supported (no gated architecture here); "
            f"supported architectures: {list(SAELENS_ARCHS)}"
        )
    if arch not in SAELENS_ARCHS:
        raise CheckpointError(
            f"{folder}: SAELens architecture {arch!r} is not supported; "
            f"supported: {list(SAELENS_ARCHS)}"
        )
    normalize = info.get("normalize_activations", "none")
    if normalize not in ("none", None, False):
        raise CheckpointError(
            f"{folder}: normalize_activations={normalize!r} changes the input at run time and "
            "has no equivalent here; fold the normalisation into the weights and set it to 'none'"
        )
    weights = folder / SAELENS_WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{folder} has {CFG} but no {SAELENS_WEIGHTS}; both are expected")
    tensors, _ = _read_safetensors(weights)
    d_in, d_sae = info["d_in"], info["d_sae"]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (d_in, d_sae)):
        raise CheckpointError(
            f"{folder / CFG}: d_in and d_sae must be integers ({_short(d_in)}, {_short(d_sae)})"
        )
    expected = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if arch == "jumprelu":
        if "log_threshold" in tensors and "threshold" not in tensors:
            tensors["threshold"] = tensors.pop("log_threshold").exp()
        expected["threshold"] = (d_sae,)
    if arch == "batchtopk":
        expected["topk_threshold"] = ()
    _check_tensors(tensors, expected, source)
    fields: dict[str, Any] = {
        "arch": SAELENS_TO_OURS[arch],
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": str(info.get("dtype", "float32")).removeprefix("torch."),
    }
    if arch in ("topk", "batchtopk"):
        k = info.get("k")
        if not isinstance(k, (int, float)) or isinstance(k, bool) or k != int(k):
            raise CheckpointError(f"{folder}: {arch} needs an integer k in {CFG}, found {k!r}")
        fields["k"] = int(k)
    cfg = _make_config(fields, str(folder / CFG))
    state = _fold_saelens(tensors, info, arch)
    return _build(cfg, state, source, device)


def _fold_saelens(
    tensors: dict[str, torch.Tensor], info: dict[str, Any], arch: str
) -> dict[str, torch.Tensor]:
    """Our state dict from SAELens tensors, folding the options our SAEs do not have."""
    W_enc, b_enc, W_dec, b_dec = (tensors[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec"))
    if not info.get("apply_b_dec_to_input", True):
        b_enc = b_enc + b_dec @ W_enc
    if arch in ("topk", "batchtopk") and info.get("rescale_acts_by_decoder_norm", False):
        norms = W_dec.norm(dim=-1)
        W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms[:, None]
    state = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    if arch == "jumprelu":
        state["log_threshold"] = tensors["threshold"].clamp_min(0).log()
    if arch == "batchtopk":
        state["threshold"] = tensors["topk_threshold"]
        state["threshold_steps"] = torch.ones((), dtype=torch.int64)
    return state


def export_saelens(sae: SAE, dir: str | Path) -> Path:
    """Write ``sae`` as a SAELens v6 folder (cfg.json + sae_weights.safetensors); returns it.

    relu -> "standard"; topk -> "topk"; jumprelu -> "jumprelu" with ``threshold`` =
    exp(log_threshold); batchtopk -> "jumprelu" with its inference threshold on every latent,
    as SAELens saves its own BatchTopK SAEs.
    """
    cfg = sae.cfg
    state = _state_tensors(sae)
    tensors = {key: state[key] for key in ("W_enc", "b_enc", "W_dec", "b_dec")}
    info: dict[str, Any] = {
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": cfg.dtype,
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"sae_lens_version": SAELENS_VERSION, "exported_by": "patchsae"},
    }
    if cfg.arch == "relu":
        info["architecture"] = "standard"
    elif cfg.arch == "topk":
        info.update(architecture="topk", k=cfg.k, rescale_acts_by_decoder_norm=False)
    elif cfg.arch == "jumprelu":
        info["architecture"] = "jumprelu"
        tensors["threshold"] = state["log_threshold"].exp()
    elif cfg.arch == "batchtopk":
        info["architecture"] = "jumprelu"
        tensors["threshold"] = state["threshold"].reshape(1).expand(cfg.d_sae).contiguous()
    else:
        raise CheckpointError(
            f"arch {cfg.arch!r} has no SAELens equivalent; exportable: relu, topk, jumprelu, "
            "batchtopk"
        )
    folder = Path(dir)
    if (folder / CFG).is_file() and "format" in _read_json(folder / CFG):
        raise CheckpointError(
            f"{folder} holds a {FORMAT} checkpoint; export the SAELens copy to another folder"
        )
    folder.mkdir(parents=True, exist_ok=True)
    write_with(folder / SAELENS_WEIGHTS, lambda tmp: save_file(tensors, str(tmp)))
    write_json(folder / CFG, info)
    return folder
