"""Speed of the top-k masking run against the naive way, on a ViT-B/16-sized random CLIP.

The default masking run of ``patchsae classify``: 21 conditions per batch (unspliced, then on
and off for k in 1, 2, 5, 10, 50, 100, 500, 1000, 2000, all, latent sets ranked per class) with
a ReLU SAE (d_sae = 768 x ``--expansion``) at block 10 of a random-weight CLIP ViT-B/16
(12 blocks of width 768, 224 px, 197 tokens). The SAE's encoder bias is set so that each latent
fires on about 5% of the tokens, as a trained SAE's do.

- ours: ``Backbone.encode`` to the hook once, the SAE encode and decode once, then for each
  condition a masked reconstruction by partial decode and ``forward_from`` (the last block and
  the head) only.
- naive (the original code's design): for each condition a full forward of the vision tower with
  a hook at the layer that encodes, multiplies the codes by a dense 0/1 mask and decodes.

Both are timed interleaved on the same batch in the same run (median over rounds), after
checking that they give the same logits. Keys: ``speedup_vs_naive`` (target >= 8),
``conditions``, ``ours_s``, ``naive_s`` (seconds per batch), ``max_logit_diff``, ``d_sae``,
``batch``. The last printed line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel  # noqa: E402

from patchsae.backbones import backbone_from_hf  # noqa: E402
from patchsae.classify import (  # noqa: E402
    DEFAULT_KS,
    Condition,
    Splice,
    clip_head,
    condition_logits,
    top_latents,
)
from patchsae.sae import SAEConfig, make_sae  # noqa: E402
from timing import interleaved_times, medians  # noqa: E402

LAYER = 10
N_CLASSES = 10


def vit_b16_clip() -> CLIPModel:
    """Random-weight CLIP with a ViT-B/16 vision tower (a 1-block text tower; text is not timed)."""
    torch.manual_seed(0)
    cfg = CLIPConfig(
        vision_config={
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "image_size": 224,
            "patch_size": 16,
        },
        text_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
                     "num_attention_heads": 2},
        projection_dim=512,
    )  # fmt: skip
    return CLIPModel(cfg).eval()


def calibrated_sae(acts_btd: torch.Tensor, d_sae: int) -> torch.nn.Module:
    """ReLU SAE whose latents each fire on ~5% of the tokens of ``acts_btd``."""
    torch.manual_seed(1)
    sae = make_sae(SAEConfig(arch="relu", d_in=768, d_sae=d_sae)).eval()
    with torch.no_grad():
        pre = sae.pre_acts(acts_btd.reshape(-1, 768))
        sae.b_enc -= torch.quantile(pre[:4096], 0.95, dim=0)
    return sae


def naive(model, sae, pixels, text_cp, conds, sets, labels) -> dict[Condition, torch.Tensor]:
    """One full forward per condition with the SAE hooked in (dense masks on the codes)."""
    block = model.vision_model.encoder.layers[LAYER]
    scale = model.logit_scale.exp()
    out = {}
    for cond in conds:
        keep = torch.ones(len(labels), sae.cfg.d_sae)
        if cond.kind in ("on", "off") and cond.k:
            ids = sets[cond.selection][labels][:, : cond.k]
            chosen = torch.zeros_like(keep).scatter_(1, ids, 1.0)
            keep = chosen if cond.kind == "on" else 1 - chosen
        elif cond.kind == "off":
            keep = torch.zeros_like(keep)

        def hook(module, inputs, output, keep=keep):
            acts = output[0] if isinstance(output, tuple) else output
            new = sae.decode(sae.encode(acts) * keep[:, None, :])
            return (new, *output[1:]) if isinstance(output, tuple) else new

        handle = None if cond.kind == "unspliced" else block.register_forward_hook(hook)
        try:
            pooled = model.vision_model(pixel_values=pixels).pooler_output
        finally:
            if handle is not None:
                handle.remove()
        out[cond] = scale * F.normalize(model.visual_projection(pooled), dim=-1) @ text_cp.T
    return out


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--expansion", type=int, default=8, help="d_sae = 768 x this")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = vit_b16_clip()
    processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size=224)
    backbone = backbone_from_hf(model, processor, name="random-vit-b16-clip")
    g = torch.Generator().manual_seed(2)
    pixels = torch.randn(args.batch, 3, 224, 224, generator=g)
    labels = torch.randint(0, N_CLASSES, (args.batch,), generator=g)
    text_cp = F.normalize(torch.randn(N_CLASSES, 512, generator=g), dim=-1)
    sae = calibrated_sae(backbone.encode(pixels, LAYER), 768 * args.expansion)
    stats = torch.rand(N_CLASSES, sae.cfg.d_sae, generator=g)
    sets = {"class": top_latents(stats, max(DEFAULT_KS))}
    conds = [Condition("unspliced")]
    conds += [Condition(m, "class", k) for k in DEFAULT_KS for m in ("on", "off")]
    head = clip_head(backbone, LAYER, text_cp)
    positions = backbone.token_layout.positions("all")

    def ours() -> dict[Condition, torch.Tensor]:
        acts = backbone.encode(pixels, LAYER)
        return condition_logits(head, sae, acts, conds, positions, Splice(), sets, labels)

    fast, slow = ours(), naive(model, sae, pixels, text_cp, conds, sets, labels)
    diff = max(float((fast[c] - slow[c]).abs().max()) for c in conds)
    same = all(torch.equal(fast[c].argmax(-1), slow[c].argmax(-1)) for c in conds)
    times = medians(
        interleaved_times(
            {
                "ours": ours,
                "naive": lambda: naive(model, sae, pixels, text_cp, conds, sets, labels),
            },
            args.rounds,
            warmup=False,
        )
    )
    speedup = times["naive"] / times["ours"]
    print(f"{'':10s} {'s / batch':>10s}")
    print(f"{'ours':10s} {times['ours']:10.3f}")
    print(f"{'naive':10s} {times['naive']:10.3f}")
    print(f"conditions {len(conds)}, batch {args.batch}, d_sae {sae.cfg.d_sae}, "
          f"max |logit diff| {diff:.2e}, same predictions {same}")  # fmt: skip
    print(f"speedup_vs_naive {speedup:.2f}")
    print(
        json.dumps(
            {
                "bench": "masking",
                "speedup_vs_naive": round(speedup, 2),
                "conditions": len(conds),
                "ours_s": round(times["ours"], 4),
                "naive_s": round(times["naive"], 4),
                "max_logit_diff": diff,
                "same_predictions": same,
                "d_sae": sae.cfg.d_sae,
                "batch": args.batch,
            }
        )
    )


if __name__ == "__main__":
    main()
