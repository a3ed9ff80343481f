"""Real data: AuxK revives dead TopK latents (DINOv2-S block 10 on Fashion-MNIST train)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from assets import DINOV2, FASHION_MNIST
from patchsae.config import from_dict
from patchsae.data.images import DataConfig
from patchsae.data.store import ActivationStore
from patchsae.ddp import Dist
from patchsae.extract import ExtractConfig, extract
from patchsae.metrics.firing import FiringWindow
from patchsae.sae import make_sae
from patchsae.sae.geometric_median import init_b_dec
from patchsae.train import TrainConfig
from patchsae.train.optim import adam
from patchsae.train.step import Member, lr_at, train_step

pytestmark = [
    pytest.mark.shared,
    pytest.mark.slow,
    pytest.mark.skipif(
        not (DINOV2.is_dir() and (FASHION_MNIST / "train").is_dir()), reason="needs ../shared"
    ),
]

N_IMAGES, D_SAE, K, BATCH, STEPS, WINDOW = 100, 768, 16, 1024, 800, 20


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> torch.Tensor:
    """(n, 384) float32: every token of 100 train images, extracted from the shared backbone."""
    out = tmp_path_factory.mktemp("store") / "train"
    cfg = ExtractConfig(
        model=str(DINOV2),
        data=DataConfig(source=str(FASHION_MNIST), split="train"),
        layers=(-2,),
        out=str(out),
        batch_size=20,
        dtype="fp32",
        seed=0,
        limit=N_IMAGES,
        shard_images=N_IMAGES,
        num_workers=0,
    )
    store = ActivationStore.open(extract(cfg))
    acts = np.stack([store.get(i) for i in range(len(store))])
    return torch.from_numpy(acts).reshape(-1, acts.shape[-1]).float()


def train_half_dead(tokens: torch.Tensor, **sae: object) -> tuple[float, float]:
    """Train TopK with the trainer's step after making half the latents unable to fire (their
    encoder columns scaled by 0.1, so they never reach a token's top k); returns the fraction
    of them that never fire in the first window and the fraction of all latents that fire on
    none of the tokens at the end."""
    cfg = from_dict(
        TrainConfig,
        {
            "store": "unused",
            "sae": {"arch": "topk", "d_in": tokens.shape[1], "d_sae": D_SAE, "k": K, **sae},
            "lr": 4e-4,
            "warmup_steps": 20,
            "dead_feature_window": WINDOW,
        },
    )
    torch.manual_seed(0)
    model = make_sae(cfg.sae)
    half = torch.arange(D_SAE) % 2 == 1
    with torch.no_grad():
        model.b_dec.copy_(init_b_dec(tokens[:4096], "geometric_median_tokens"))
        model.W_enc[:, half] *= 0.1
    opt = adam(model.parameters(), lr=lr_at(cfg, 0))
    member = Member(
        "",
        model,
        opt,
        torch.zeros(D_SAE, dtype=torch.int64),
        FiringWindow(D_SAE, WINDOW * BATCH),
        Path("unused"),
    )
    dist = Dist(rank=0, world_size=1, device=torch.device("cpu"))
    order = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(0))
    for step in range(STEPS):
        idx = order[(step * BATCH + torch.arange(BATCH)) % len(tokens)]
        train_step(cfg, member, tokens[idx], step, dist)
        if step == WINDOW - 1:  # the window holds the first WINDOW steps
            never_fired = (member.firing.counts()[half] == 0).float().mean().item()
    with torch.no_grad():
        fired = (model.encode(tokens) > 0).any(0)
    return never_fired, 1 - fired.float().mean().item()


def test_auxk_revives_half_the_latents_dead(tokens: torch.Tensor) -> None:
    torch.set_num_threads(1)
    never_fired, dead_end = train_half_dead(tokens)
    print(f"\nTopK k={K}, d_sae={D_SAE}: {never_fired:.1%} of the disabled half never fired in the")
    print(f"first {WINDOW} steps; dead after {STEPS} steps of {BATCH} tokens: {dead_end:.2%}")
    assert never_fired > 0.99  # they were dead
    assert dead_end < 0.01
