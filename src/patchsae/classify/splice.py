"""The SAE spliced into a CLIP at one layer, and the classification conditions run from it.

Per batch the hook activations, the SAE codes and the reconstruction are computed once; each
condition replaces the activations at the chosen token positions and reruns only the tail after
the hook (``ClassifierHead``). The head is pluggable: any callable ``acts_btd -> image embedding``
and any text embeddings, so an adapted model (MaPLe / CoOp) classifies through the same code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from patchsae.classify.masking import masked_reconstruction

# PatchSAE's classification adds this to every element of the reconstruction (it subtracts
# SAE_BIAS = -0.105131256516992 after the SAE forward). Reproduced only with ``offset=``.
PATCHSAE_OFFSET = 0.105131256516992
KINDS = ("unspliced", "spliced", "on", "off")


@dataclass(frozen=True)
class Splice:
    """Where and how the reconstruction replaces the activations.

    ``tokens``: ``all`` (every token but adapter prompt tokens), ``cls`` or ``patches``;
    ``error``: add back the reconstruction error ``acts - decode(codes)`` (the spliced model then
    equals the original up to rounding); ``offset``: a constant added to every element of the
    reconstruction (0; ``PATCHSAE_OFFSET`` reproduces the original code).
    """

    tokens: str = "all"
    error: bool = False
    offset: float = 0.0


@dataclass(frozen=True)
class Condition:
    """One classification condition: ``unspliced``, ``spliced``, or ``on`` / ``off`` with the
    latent set of ``selection`` of size ``k`` (0: every latent)."""

    kind: str
    selection: str = ""
    k: int = 0

    @property
    def name(self) -> str:
        if self.kind in ("unspliced", "spliced"):
            return self.kind
        return f"{self.kind}_{self.selection}_{self.k or 'all'}"


class ClassifierHead:
    """Zero-shot logits from activations at the hook layer.

    tail: acts_btd (B, T, d) -> image embeddings (B, P), L2-normalised (``forward_from``);
    text_cp: (n_classes, P) class embeddings; logits = logit_scale * image @ text.T, float32.
    """

    def __init__(self, tail: Callable[[Tensor], Tensor], text_cp: Tensor, logit_scale: float):
        self.tail, self.text_cp, self.logit_scale = tail, text_cp.float(), float(logit_scale)

    def __call__(self, acts_btd: Tensor) -> Tensor:
        image_bp = self.tail(acts_btd).float()
        return self.logit_scale * image_bp @ self.text_cp.to(image_bp.device).T


def clip_head(backbone: object, layer: int, text_cp: Tensor) -> ClassifierHead:
    """The head of a CLIP ``Backbone`` (or an adapted one) resumed after block ``layer``."""
    return ClassifierHead(
        lambda acts: backbone.forward_from(acts, layer), text_cp, backbone.logit_scale
    )


def spliced_acts(acts_btd: Tensor, recon_btd: Tensor, positions: slice, splice: Splice) -> Tensor:
    """acts_btd with ``positions`` replaced by recon_btd (+ offset, + error when asked)."""
    part = recon_btd[:, positions] + splice.offset
    if splice.error:
        part = part + (acts_btd[:, positions] - recon_btd[:, positions])
    out = acts_btd.clone()
    out[:, positions] = part.to(acts_btd.dtype)
    return out


@torch.no_grad()
def condition_logits(
    head: ClassifierHead,
    sae: torch.nn.Module,
    acts_btd: Tensor,
    conditions: Sequence[Condition],
    positions: slice,
    splice: Splice,
    latent_sets: Mapping[str, Tensor],
    targets_b: Tensor | None = None,
) -> dict[Condition, Tensor]:
    """(B, n_classes) logits of every condition for one batch of hook activations.

    acts_btd: (B, T, d) at the hook layer; latent_sets: selection -> (n_classes or 1, k_max)
    latent ids, best first; targets_b: (B,) class whose latent set masks each image (None: the
    class the unspliced model predicts). The SAE encodes and decodes once per batch; the error
    term ``acts - decode(codes)`` is the full reconstruction's in every condition.
    """
    logits = {Condition("unspliced"): head(acts_btd)}
    if targets_b is None:
        targets_b = logits[Condition("unspliced")].argmax(-1)
    spliced = [c for c in conditions if c.kind != "unspliced"]
    if not spliced:
        return {c: logits[c] for c in conditions}
    codes_btm = sae.encode(acts_btd.to(sae.dtype))
    recon_btd = sae.decode(codes_btm)
    W_dec, b_dec = sae.W_dec, sae.b_dec
    for cond in spliced:
        if cond.kind == "spliced":
            x_hat = recon_btd
        else:
            ids = None
            if cond.k and cond.k < W_dec.shape[0]:
                sets = latent_sets[cond.selection]
                rows = sets[targets_b.to(sets.device)] if sets.shape[0] > 1 else sets
                ids = rows[:, : cond.k].to(codes_btm.device).expand(acts_btd.shape[0], -1)
            x_hat = masked_reconstruction(codes_btm, recon_btd, W_dec, b_dec, ids, cond.kind)
        logits[cond] = head(spliced_acts(acts_btd, x_hat, positions, splice))
    return {c: logits[c] for c in conditions}
