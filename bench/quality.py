"""SAE quality out of the box: ours vs SAELens on the same activations, batches and budget.

Activations: the DINOv2-S asset (``../shared/assets/dinov2-small-imgfocus``, width 384) after
block ``--layer`` (default -2, block 10 of 12), every token (CLS + 256 patches), extracted with
``patchsae.extract`` from fashion-mnist-small ``train`` (1,000 images) and ``test`` (300 images,
held out). Every SAE trains on the same shuffled 1,024-token batches of the train store (the
trainer's own ``StoreSource``, ``batch_mode=tokens``) for ``--epochs`` passes, and is scored on
the test store by ``patchsae.metrics.reconstruction_metrics`` (SAELens SAEs are read back through
``patchsae.sae.load``, the importer): held-out FVU, L0 and dead fraction (no firing on the test
tokens).

- Ours: ``patchsae.train.train`` with each architecture's defaults (``topk`` / ``batchtopk``:
  tied init, AuxK; ``jumprelu``: tied init, its L0 coefficient; ``relu``: the PatchSAE recipe,
  ghost grads) at lr 4e-4, warm-up 5% of the run, ``b_dec`` from
  the geometric median of the first batch's tokens, dead window 64 steps.
- SAELens (installed version): ``TopKTrainingSAE``, ``BatchTopKTrainingSAE``,
  ``JumpReLUTrainingSAE`` and ``StandardTrainingSAE`` with their default configs and loss
  coefficients, Adam at SAELens's default lr 3e-4, ``b_dec`` zero, trained by the loop of SAELens's
  ``SAETrainer`` (forward, backward, step; dead-neuron mask = no firing for more than the same 64
  steps as ours, since SAELens's default window of 1,000 steps is longer than this run).

Keys of the last line: ``topk_fvu_vs_saelens`` (ours / theirs at k=32; target <= 1.0),
``topk_dead_frac`` (ours, held out; target <= 0.01), ``relu_fvu_at_saelens_l0`` (ours at
SAELens's L0, interpolated in log L0 between our L1 sweep's points, / theirs; target <= 1.0),
plus ``topk_l0``, ``saelens_topk_fvu``, ``saelens_relu_l0``, ``relu_l0_bracketed`` (whether
SAELens's L0 lies inside our sweep, i.e. interpolated rather than extrapolated), ``steps``,
``tokens``, and for ``batchtopk`` (k=32) and ``jumprelu`` (each side's defaults)
``<arch>_fvu_vs_saelens``, ``<arch>_l0`` and ``saelens_<arch>_l0`` (JumpReLU's L0 is whatever
each side's default sparsity coefficient gives, so its FVU ratio is not at matched L0), and
``saes``: side, arch, setting, held-out FVU, L0 and dead fraction of every SAE trained. The frontier
(FVU vs L0 of every SAE trained) is printed as a table and drawn to ``--plot`` (PNG).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from patchsae.data import DataConfig
from patchsae.data.loaders import image_batches_from_store
from patchsae.data.store import ActivationStore
from patchsae.extract import ExtractConfig, extract
from patchsae.metrics.reconstruction import reconstruction_metrics
from patchsae.sae import SAEConfig, load
from patchsae.train import TrainConfig, train
from patchsae.train.sources import open_source

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MODEL = SHARED / "assets" / "dinov2-small-imgfocus"
DATA = SHARED / "data" / "fashion-mnist-small"
D_IN = 384
BATCH_TOKENS = 1024
DEAD_WINDOW = 64


def stores(work: Path, layer: int) -> tuple[Path, Path]:
    """Train and test stores of the DINOv2 asset (extracted once; reruns resume or skip)."""
    out = []
    for split in ("train", "test"):
        folder = work / f"store-{split}"
        extract(
            ExtractConfig(
                model=str(MODEL),
                data=DataConfig(str(DATA), split=split),
                layers=(layer,),
                out=str(folder),
                batch_size=32,
                dtype="fp32",
                num_workers=0,
            )
        )
        out.append(folder)
    return out[0], out[1]


def held_out(sae_dir: Path, test_store: Path) -> dict[str, float]:
    """FVU, L0 and dead fraction of the SAE at ``sae_dir`` over every test token."""
    sae = load(sae_dir)
    store = ActivationStore.open(test_store)
    batches = image_batches_from_store(store, 32)
    metrics = reconstruction_metrics(sae, batches, store.token_layout, progress=False)
    return {k: float(metrics[k]) for k in ("fvu", "l0", "frac_dead")}


def train_ours(work: Path, store: Path, sae: dict, total_tokens: int) -> Path:
    steps = total_tokens // BATCH_TOKENS
    out = work / ("ours-" + "-".join(f"{k}{v}" for k, v in sorted(sae.items())))
    cfg = TrainConfig(
        store=str(store),
        out=str(out),
        sae=SAEConfig(d_in=D_IN, **sae),
        batch_mode="tokens",
        batch_tokens=BATCH_TOKENS,
        total_tokens=total_tokens,
        total_images=None,
        warmup_steps=max(1, steps // 20),
        b_dec_init="geometric_median_tokens",
        dead_feature_window=DEAD_WINDOW,
        checkpoint_every=steps,
        eval_every=steps,
        log_every=max(1, steps // 10),
        seed=0,
    )
    return train(cfg, resume=True)


SAELENS = {
    "topk": ("topk_sae", "TopKTrainingSAE"),
    "batchtopk": ("batchtopk_sae", "BatchTopKTrainingSAE"),
    "jumprelu": ("jumprelu_sae", "JumpReLUTrainingSAE"),
    "relu": ("standard_sae", "StandardTrainingSAE"),
}


def train_saelens(work: Path, store: Path, arch: str, option: dict, total_tokens: int) -> Path:
    """Train SAELens's training SAE of ``arch`` (``option``: its config fields) on the trainer's
    batches with SAELens's own loss coefficients; returns its saved folder."""
    import importlib

    from sae_lens.saes.sae import TrainStepInput

    out = work / (f"saelens-{arch}-" + "-".join(f"{k}{v}" for k, v in sorted(option.items())))
    if (out / "cfg.json").is_file():
        return out
    module, name = SAELENS[arch]
    classes = importlib.import_module(f"sae_lens.saes.{module}")
    torch.manual_seed(0)
    sae = getattr(classes, name)(getattr(classes, f"{name}Config")(d_in=D_IN, **option))
    coefficients = {key: c.value for key, c in sae.get_coefficients().items()}
    opt = torch.optim.Adam(sae.parameters(), lr=3e-4)
    source = open_source(
        TrainConfig(
            store=str(store),
            sae=SAEConfig(d_in=D_IN),
            batch_mode="tokens",
            batch_tokens=BATCH_TOKENS,
            total_tokens=total_tokens,
            total_images=None,
            b_dec_init="zeros",
            seed=0,
        ),
        torch.device("cpu"),
    )
    since_fired = torch.zeros(option["d_sae"], dtype=torch.int64)
    batches = source.batches(source.start_position())
    for step in range(total_tokens // BATCH_TOKENS):
        x, _ = next(batches)
        opt.zero_grad(set_to_none=True)
        output = sae.training_forward_pass(
            TrainStepInput(
                sae_in=x,
                coefficients=coefficients,
                dead_neuron_mask=since_fired > DEAD_WINDOW,
                n_training_steps=step,
                is_logging_step=False,
            )
        )
        output.loss.backward()
        opt.step()
        fired = (output.feature_acts > 0).any(0)
        since_fired = torch.where(fired, 0, since_fired + 1)
    sae.save_model(str(out))
    return out


def interpolate_fvu(points: list[tuple[float, float]], l0: float) -> float:
    """FVU at ``l0`` on the piecewise-linear (log L0, FVU) curve of ``points`` (extrapolated
    from the nearest segment outside their range)."""
    pts = sorted(points)
    xs = [math.log(p[0]) for p in pts]
    x = math.log(l0)
    i = int(np.clip(np.searchsorted(xs, x) - 1, 0, len(pts) - 2))
    (x0, y0), (x1, y1) = (xs[i], pts[i][1]), (xs[i + 1], pts[i + 1][1])
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    archs = ("topk", "batchtopk", "jumprelu", "relu")
    for (side, arch), marker in zip(
        [(side, arch) for side in ("ours", "saelens") for arch in archs],
        ["o", "D", "P", "s", "^", "d", "X", "v"],
        strict=True,
    ):
        sel = [r for r in rows if r["side"] == side and r["arch"] == arch]
        if sel:
            ax.plot(
                [r["l0"] for r in sel],
                [r["fvu"] for r in sel],
                marker,
                ls="-" if len(sel) > 1 else "",
                label=f"{side} {arch}",
            )
    ax.set_xscale("log")
    ax.set_xlabel("L0 (held-out, per token)")
    ax.set_ylabel("FVU (held-out)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "patchsae-quality"))
    parser.add_argument("--layer", type=int, default=-2)
    parser.add_argument("--d-sae", type=int, default=3072)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--ks", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument(
        "--l1s", type=float, nargs="+", default=[4e-5, 8e-5, 1.6e-4, 3.2e-4, 6.4e-4]
    )
    parser.add_argument("--saelens-l1", type=float, default=5.0)
    parser.add_argument("--plot", default="quality_frontier.png")
    args = parser.parse_args()
    if not MODEL.is_dir() or not DATA.is_dir():
        sys.exit(f"needs {MODEL} and {DATA} (../shared beside the repository)")
    os.environ.setdefault("TQDM_DISABLE", "1")
    torch.set_num_threads(os.cpu_count() or 1)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    train_store, test_store = stores(work, args.layer)
    n_tokens = len(ActivationStore.open(train_store)) * ActivationStore.open(train_store).n_tokens
    total = int(args.epochs * n_tokens) // BATCH_TOKENS * BATCH_TOKENS
    rows = []
    for k in args.ks:
        folder = train_ours(work, train_store, {"arch": "topk", "d_sae": args.d_sae, "k": k}, total)
        rows.append(
            {"side": "ours", "arch": "topk", "setting": f"k={k}", **held_out(folder, test_store)}
        )
    for l1 in args.l1s:
        sae = {"arch": "relu", "d_sae": args.d_sae, "l1_coefficient": l1}
        folder = train_ours(work, train_store, sae, total)
        rows.append(
            {
                "side": "ours",
                "arch": "relu",
                "setting": f"l1={l1:g}",
                **held_out(folder, test_store),
            }
        )
    for arch in ("batchtopk", "jumprelu"):
        option = {"arch": arch, "d_sae": args.d_sae, **({"k": 32} if arch == "batchtopk" else {})}
        folder = train_ours(work, train_store, option, total)
        setting = "k=32" if arch == "batchtopk" else "defaults"
        rows.append(
            {"side": "ours", "arch": arch, "setting": setting, **held_out(folder, test_store)}
        )
    theirs = [
        ("topk", {"d_sae": args.d_sae, "k": 32}, "k=32"),
        ("batchtopk", {"d_sae": args.d_sae, "k": 32}, "k=32"),
        ("jumprelu", {"d_sae": args.d_sae}, "defaults"),
        (
            "relu",
            {"d_sae": args.d_sae, "l1_coefficient": args.saelens_l1},
            f"l1={args.saelens_l1:g}",
        ),
    ]
    for arch, option, setting in theirs:
        folder = train_saelens(work, train_store, arch, option, total)
        rows.append(
            {"side": "saelens", "arch": arch, "setting": setting, **held_out(folder, test_store)}
        )

    print(f"{'side':8} {'arch':9} {'setting':12} {'FVU':>8} {'L0':>8} {'dead':>7}")
    for r in rows:
        name = f"{r['side']:8} {r['arch']:9} {r['setting']:12}"
        print(f"{name} {r['fvu']:8.4f} {r['l0']:8.1f} {r['frac_dead']:7.3%}")
    plot(rows, Path(args.plot))
    print(f"frontier plot: {args.plot}")
    ours_topk = next(r for r in rows if r["side"] == "ours" and r["setting"] == "k=32")
    theirs_topk = next(r for r in rows if r["side"] == "saelens" and r["arch"] == "topk")
    theirs_relu = next(r for r in rows if r["side"] == "saelens" and r["arch"] == "relu")
    relu_points = [(r["l0"], r["fvu"]) for r in rows if r["side"] == "ours" and r["arch"] == "relu"]
    ours_at_l0 = interpolate_fvu(relu_points, theirs_relu["l0"])
    extra = {}
    for arch in ("batchtopk", "jumprelu"):
        mine = next(r for r in rows if r["side"] == "ours" and r["arch"] == arch)
        other = next(r for r in rows if r["side"] == "saelens" and r["arch"] == arch)
        extra[f"{arch}_fvu_vs_saelens"] = round(mine["fvu"] / other["fvu"], 4)
        extra[f"{arch}_l0"] = round(mine["l0"], 1)
        extra[f"saelens_{arch}_l0"] = round(other["l0"], 1)
    result = {
        "bench": "quality",
        "topk_fvu_vs_saelens": round(ours_topk["fvu"] / theirs_topk["fvu"], 4),
        "topk_dead_frac": round(ours_topk["frac_dead"], 4),
        "relu_fvu_at_saelens_l0": round(ours_at_l0 / theirs_relu["fvu"], 4),
        "topk_l0": round(ours_topk["l0"], 1),
        "saelens_topk_fvu": round(theirs_topk["fvu"], 4),
        "saelens_relu_l0": round(theirs_relu["l0"], 1),
        "relu_l0_bracketed": min(p[0] for p in relu_points)
        <= theirs_relu["l0"]
        <= max(p[0] for p in relu_points),
        **extra,
        "saes": [{k: r[k] if isinstance(r[k], str) else round(r[k], 4) for k in r} for r in rows],
        "steps": total // BATCH_TOKENS,
        "tokens": total,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
