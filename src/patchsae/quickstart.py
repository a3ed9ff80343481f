"""``patchsae quickstart``: the whole pipeline in one command, resumable.

extract (activation store of the train split) -> train (a small SAE on the store) ->
evaluate (FVU, L0 and dead latents on a store of the test split, when the source has one) ->
stats (an atlas of the SAE over the store) -> figures (the paper's plots of the atlas) ->
explore (the web app on that atlas). Each step
prints its output folder; run the same command again after an interruption and finished steps
are skipped, unfinished ones resume (each stage's own resume). Defaults: CLIP ViT-B/16 and a
small public dataset from the Hugging Face hub; ``--model`` and ``--data`` take local folders
for a fully offline run.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from patchsae.backbones import DEFAULT_BACKBONE, BackboneError
from patchsae.config import ConfigError
from patchsae.data.images import DataConfig, DataError

DEFAULT_DATA = "uoft-cs/cifar10"
OFFLINE_HINT = (
    "without internet access run it on local folders: patchsae quickstart --model MODEL_FOLDER "
    "--data IMAGE_FOLDER (e.g. ../shared/assets/dinov2-small-imgfocus and "
    "../shared/data/fashion-mnist-small)"
)


class QuickstartError(ValueError):
    """A quickstart step cannot run; the message names the step and the fix."""


@dataclass(frozen=True)
class QuickstartConfig:
    """What the quickstart runs on. ``limit``: train images extracted (None: all);
    ``expansion``: d_sae / d_model of the SAE; ``arch``: ``topk`` (``k`` active latents per
    token: sparse and readable after a few epochs) or ``relu`` (the paper's L1 recipe, which
    needs far more images to become sparse); ``epochs``: passes over the store;
    ``image_column``: the image column of a hub dataset (local folders need none);
    ``test_split`` / ``test_limit``: the held-out split evaluated after training and how many of
    its images (None: no held-out evaluation)."""

    out: str = "quickstart"
    model: str = DEFAULT_BACKBONE
    data: str = DEFAULT_DATA
    split: str = "train"
    test_split: str | None = "test"
    test_limit: int | None = 500
    image_column: str = "img"
    layer: int = -2
    limit: int | None = 2000
    expansion: int = 8
    epochs: int = 4
    arch: str = "topk"
    k: int = 32
    l1_coefficient: float = 8e-5
    batch_size: int = 32
    device: str = "cpu"

    def __post_init__(self) -> None:
        if min(self.expansion, self.epochs, self.batch_size, self.k) < 1:
            raise ConfigError("expansion, epochs, batch_size and k must be >= 1")
        if self.arch not in ("topk", "relu"):
            raise ConfigError(f"arch must be 'topk' or 'relu', got {self.arch!r}")


def _step(name: str, folder: Path) -> None:
    tqdm.write(f"\n== {name}: {folder}")


def _is_local(path: str) -> bool:
    return Path(path).expanduser().exists()


def run_pipeline(cfg: QuickstartConfig) -> Path:
    """Run (or finish) extract, train and stats under ``cfg.out``; returns the atlas folder."""
    from patchsae.data import ActivationStore
    from patchsae.stats import StatsConfig, compute_stats
    from patchsae.train.trainer import train

    out = Path(cfg.out)
    store, sae_dir, atlas = out / "store", out / "sae", out / "atlas"
    _step("extract", store)
    try:
        _extract(cfg, cfg.split, store, cfg.limit)
    except (BackboneError, DataError) as err:
        remote = not (_is_local(cfg.model) and _is_local(cfg.data))
        if remote:
            raise QuickstartError(f"{err}; {OFFLINE_HINT}") from None
        raise
    opened = ActivationStore.open(store)
    n_images, d_model = int(opened.metadata["n_images"]), opened.d_model
    _step("train", sae_dir)
    train_cfg = train_config(cfg, store, sae_dir, n_images, d_model)
    if _trained_images(sae_dir) >= train_cfg.total_images:
        tqdm.write(f"{sae_dir} is already trained ({train_cfg.total_images} images); nothing to do")
    else:
        train(train_cfg, resume=True)
    held_out(cfg, sae_dir, out / "store-test")
    _step("stats", atlas)
    compute_stats(
        StatsConfig(sae=str(sae_dir), out=str(atlas), store=str(store), device=cfg.device)
    )
    _step("figures", out / "figures")
    for path in figures(atlas, out / "figures"):
        tqdm.write(str(path))
    return atlas


def _data(cfg: QuickstartConfig, split: str) -> DataConfig:
    """The image source of ``split`` of ``cfg.data`` (a local folder reads its ``image`` files;
    a hub dataset its ``image_column``)."""
    column = "image" if Path(cfg.data).is_dir() else cfg.image_column
    return DataConfig(cfg.data, split=split, image_column=column)


def _extract(cfg: QuickstartConfig, split: str, store: Path, limit: int | None) -> None:
    """Extract (or finish) the store of ``split`` of ``cfg.data`` at ``cfg.layer``."""
    from patchsae.extract import ExtractConfig, extract

    extract(
        ExtractConfig(
            model=cfg.model,
            data=_data(cfg, split),
            layers=(cfg.layer,),
            out=str(store),
            batch_size=cfg.batch_size,
            shard_images=cfg.batch_size * 8,
            limit=limit,
            seed=0,
            num_workers=0,
            device=cfg.device,
        )
    )


def held_out(cfg: QuickstartConfig, sae_dir: Path, store: Path) -> dict | None:
    """Evaluate the SAE on a store of ``cfg.test_split`` (extracted into ``store``); writes
    ``sae_dir/eval-test.json`` and prints the table. None, with a note, when the source has no
    such split (a local folder without a ``test`` subfolder would silently be the train images).
    """
    from patchsae.atomic import write_json
    from patchsae.metrics.evaluate import evaluate, format_table

    _step("evaluate", store)
    local = Path(cfg.data).is_dir()
    if cfg.test_split is None or cfg.test_split == cfg.split:
        tqdm.write("no held-out split asked for: evaluation skipped")
        return None
    if local and not (Path(cfg.data) / cfg.test_split).is_dir():
        tqdm.write(
            f"{cfg.data} has no {cfg.test_split!r} split folder: held-out evaluation skipped"
        )
        return None
    from patchsae.data import open_images

    try:
        n_test = len(open_images(_data(cfg, cfg.test_split)))
        limit = cfg.test_limit if cfg.test_limit is not None and cfg.test_limit < n_test else None
        _extract(cfg, cfg.test_split, store, limit)
    except DataError as err:
        tqdm.write(f"held-out evaluation skipped: {err}")
        return None
    result = evaluate(sae_dir, store, device=cfg.device)
    write_json(sae_dir / "eval-test.json", result)
    tqdm.write(format_table(result))
    return result


def figures(atlas_dir: Path, folder: Path) -> list[Path]:
    """The paper's figures of the atlas's dataset: Fig. 3 scatter (PNG and offline HTML), the
    class x latent heatmap (labelled data) and reference grids of up to 8 low-entropy (else
    dense) latents. Without matplotlib/plotly, one line says how to get them."""
    from patchsae.stats import Atlas, StatsError, plot

    ds = Atlas.open(atlas_dir).dataset()
    jobs = [
        lambda: plot.scatter(ds, folder / "scatter.png"),
        lambda: plot.scatter(ds, folder / "scatter.html"),
    ]
    if ds.meta["has_labels"]:
        jobs.append(lambda: plot.heatmap(ds, folder / "heatmap.png"))
    latents = ds.low_entropy(0.0)[:8] or ds.dense(0.0)[:8]
    if latents:
        jobs.append(lambda: plot.references(ds, latents, folder / "references.png", "heat"))
    made = []
    try:
        for job in jobs:
            made.append(job())
    except StatsError as err:
        tqdm.write(f"figures skipped: {err}")
    return made


def _trained_images(sae_dir: Path) -> int:
    """Images the SAE saved in ``sae_dir`` was trained on (0 when there is none yet)."""
    from patchsae.sae.io import CheckpointError, checkpoint_info

    try:
        return int(checkpoint_info(sae_dir).get("images", 0))
    except CheckpointError:
        return 0


def train_config(cfg: QuickstartConfig, store: Path, sae_dir: Path, n_images: int, d_model: int):
    """The small SAE's ``TrainConfig``: ``cfg.epochs`` passes over the store's images."""
    from patchsae.sae import SAEConfig
    from patchsae.train.config import TrainConfig

    options = {"k": cfg.k} if cfg.arch == "topk" else {"l1_coefficient": cfg.l1_coefficient}
    sae = SAEConfig(arch=cfg.arch, d_in=d_model, d_sae=d_model * cfg.expansion, **options)
    batch_images = min(32, n_images)
    steps = -(-n_images * cfg.epochs // batch_images)
    return TrainConfig(
        store=str(store),
        out=str(sae_dir),
        sae=sae,
        batch_images=batch_images,
        total_images=n_images * cfg.epochs,
        warmup_steps=max(1, min(10, steps // 20)),
        dead_feature_window=max(1, min(64, steps // 4)),
        b_dec_init_maxiter=20,
        checkpoint_every=min(50, steps),
        eval_every=10**9,
        log_every=20,
        device=cfg.device,
    )


def config_from_args(args: argparse.Namespace) -> QuickstartConfig:
    return QuickstartConfig(
        out=args.out,
        model=args.model,
        data=args.data,
        split=args.split,
        test_split=args.test_split or None,
        test_limit=None if args.test_limit == 0 else args.test_limit,
        layer=args.layer,
        limit=None if args.limit == 0 else args.limit,
        expansion=args.expansion,
        arch=args.arch,
        k=args.k,
        epochs=args.epochs,
        device=args.device,
    )


def _run(args: argparse.Namespace) -> int:
    atlas = run_pipeline(config_from_args(args))
    if args.no_explore:
        tqdm.write(f"\ndone; browse it with: patchsae explore --atlas {atlas}")
        return 0
    from patchsae.explore.cli import serve_explorer
    from patchsae.explore.core import open_model
    from patchsae.explore.explorer import Explorer

    _step("explore", atlas)
    explorer = Explorer([open_model(atlas, device=args.device)])
    serve_explorer(explorer, host=args.host, port=args.port)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``quickstart [--model M] [--data D] [--out DIR] ...``."""
    p = subparsers.add_parser(
        "quickstart",
        help="the whole pipeline in one command: extract, train, stats, explorer",
        description="Extract activations, train a small SAE, compute its atlas and open the "
        "explorer, printing each step's folder. Run it again to resume. Offline: pass local "
        "--model and --data folders.",
    )
    p.add_argument("--out", default="quickstart", help="folder for every output")
    p.add_argument("--model", default=DEFAULT_BACKBONE, help="hub id or local model folder")
    p.add_argument("--data", default=DEFAULT_DATA, help="hub dataset or local image folder")
    p.add_argument("--split", default="train")
    p.add_argument(
        "--test-split", default="test", help="held-out split evaluated after training ('' : none)"
    )
    p.add_argument("--test-limit", type=int, default=500, help="test images extracted (0: all)")
    p.add_argument("--layer", type=int, default=-2, help="block index (default -2)")
    p.add_argument("--limit", type=int, default=2000, help="images extracted (0: all)")
    p.add_argument("--expansion", type=int, default=8, help="d_sae / d_model (default 8)")
    p.add_argument("--arch", choices=("topk", "relu"), default="topk", help="SAE (default topk)")
    p.add_argument("--k", type=int, default=32, help="active latents per token (topk)")
    p.add_argument("--epochs", type=int, default=4, help="passes over the images (default 4)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-explore", action="store_true", help="stop after the atlas")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.set_defaults(func=_run)
