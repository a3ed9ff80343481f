"""SAELens v6 folders (``cfg.json`` + ``sae_weights.safetensors``): reading and exporting."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from patchsae.atomic import write_json, write_with
from patchsae.sae.base import SAE
from patchsae.sae.formats.common import (
    CheckpointError,
    _build,
    _check_tensors,
    _make_config,
    _read_json,
    _read_safetensors,
    _short,
    _state_tensors,
)
from patchsae.sae.formats.ours import CFG, FORMAT

SAELENS_WEIGHTS = "sae_weights.safetensors"

SAELENS_VERSION = "6.0.0"


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
