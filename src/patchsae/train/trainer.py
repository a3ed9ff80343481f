"""The training loop: the PatchSAE step for one SAE, or several side by side on the same batches.

One step per SAE (``patchsae.train.step.train_step``), in the original's order
(``SAETrainer._train_step``):

1. ``normalize_decoder_()`` (unit W_dec rows at the start of the step);
2. dead mask from the steps-since-fired counters of earlier steps (``> dead_feature_window``);
3. ``loss(x, dead_mask=...)``;
4. counters += 1, reset where the latent fired (fire counts summed over DDP ranks first);
5. ``total.backward()``, gradients averaged over ranks, ``remove_parallel_grad_()``;
6. Adam step at ``lr * warmup_factor(step, warmup_steps)`` (the schedule of step ``step``).

Output folder (``cfg.out``): ``train_config.json``; per SAE (the folder itself, or ``sae-00``...
in a sweep) ``metrics.jsonl`` and, at the end, ``sae.safetensors`` + ``cfg.json``;
``checkpoint/`` (see ``patchsae.train.checkpoint``).

Batches are read ahead on a background thread (``prefetch_batches``, pinned for CUDA); the
metrics log the seconds the loop waited for input (``input_wait_s``) and ran (``elapsed_s``).

The step's values stay on the device; every ``sync_every`` steps and at every checkpoint,
evaluation and the end they are read back at once, checked and logged (``patchsae.train.sync``).

Evaluation (step 0, every ``eval_every`` steps, the end) logs ``reconstruction_metrics`` on the
held-out images (``eval_images``) and, with ``fidelity``, ``downstream_fidelity`` on labelled
images through the CLIP backbone (rank 0 only).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from patchsae import ddp
from patchsae.atomic import write_json
from patchsae.backbones.loading import check_device
from patchsae.config import ConfigError, to_dict
from patchsae.data.images import write_bad_report
from patchsae.data.prefetch import Prefetcher
from patchsae.lock import FolderLock
from patchsae.metrics.fidelity import FidelityError, FidelityScorer
from patchsae.metrics.firing import FiringWindow
from patchsae.metrics.reconstruction import reconstruction_metrics
from patchsae.sae.geometric_median import init_b_dec
from patchsae.sae.io import save
from patchsae.sae.kernels import Scratch
from patchsae.sae.registry import make_sae
from patchsae.train.checkpoint import (
    find_checkpoint,
    load_member,
    load_optimizer,
    optimizer_tensors,
    read_checkpoint,
    restore_rng,
    rng_tensors,
    write_checkpoint,
)
from patchsae.train.config import TrainConfig, check_schedule, config_differences
from patchsae.train.errors import TrainingError
from patchsae.train.log import METRICS, Logger, truncate_metrics
from patchsae.train.optim import adam
from patchsae.train.sources import BatchSource, open_source
from patchsae.train.step import Member, lr_at, train_step
from patchsae.train.sync import Pending

TRAIN_CONFIG = "train_config.json"


def plan_steps(cfg: TrainConfig, tokens_per_image: int) -> int:
    """Number of steps to reach ``total_images`` or ``total_tokens``, whichever comes first."""
    if cfg.batch_mode == "images":
        images_per_step, tokens_per_step = cfg.batch_images, cfg.batch_images * tokens_per_image
    else:
        images_per_step, tokens_per_step = cfg.batch_tokens / tokens_per_image, cfg.batch_tokens
    limits = []
    if cfg.total_images is not None:
        limits.append(math.ceil(cfg.total_images / images_per_step))
    if cfg.total_tokens is not None:
        limits.append(math.ceil(cfg.total_tokens / tokens_per_step))
    return max(1, min(limits))


def _check_compatible(cfg: TrainConfig, source: BatchSource, world_size: int) -> None:
    for i, sae_cfg in enumerate(cfg.sae_configs()):
        where = f"sweep[{i}]" if cfg.sweep else "sae"
        if sae_cfg.arch == "batchtopk" and world_size > 1:
            raise ConfigError(
                f"{where}.arch=batchtopk cannot train under DDP ({world_size} processes): it keeps "
                "the k * n largest activations of the whole batch, which no rank sees, so its "
                "steps would differ from the single-process step. Train it in one process, or "
                "use arch=topk"
            )
        if sae_cfg.d_in != source.d_model:
            raise ConfigError(
                f"{where}.d_in={sae_cfg.d_in} but the activations have width {source.d_model}: "
                f"set sae.d_in={source.d_model}"
            )
        cls_first = cfg.tokens == "all" and source.layout.cls_index == 0
        cls_weight = getattr(sae_cfg, "mse_cls_coefficient", 1.0)  # a relu option
        if cls_weight != 1.0 and not (cfg.batch_mode == "images" and cls_first):
            raise ConfigError(
                f"{where}.mse_cls_coefficient weights token 0 as CLS, which needs "
                "batch_mode=images, tokens=all and a backbone with CLS at index 0; set it to 1.0"
            )


def _build_members(cfg: TrainConfig, device: torch.device, tokens_per_step: int) -> list[Member]:
    out = Path(cfg.out)
    members = []
    scratch = Scratch()  # the SAEs step one after another: one set of work buffers serves all
    for name, sae_cfg in zip(cfg.member_names(), cfg.sae_configs(), strict=True):
        torch.manual_seed(cfg.seed)
        sae = make_sae(sae_cfg).to(device)
        sae.scratch = scratch
        opt = adam(sae.parameters(), lr=lr_at(cfg, 0), betas=cfg.adam_betas, eps=cfg.adam_eps)
        counters = torch.zeros(sae_cfg.d_sae, dtype=torch.int64, device=device)
        window = FiringWindow(sae_cfg.d_sae, max(1, cfg.dead_feature_window) * tokens_per_step)
        members.append(Member(name, sae, opt, counters, window, out / name if name else out))
    return members


@torch.no_grad()
def _init_b_dec(
    cfg: TrainConfig, members: list[Member], x_first: torch.Tensor, dist: ddp.Dist
) -> None:
    """Set every SAE's b_dec from the first global batch (computed on rank 0, broadcast)."""
    cache: dict[torch.dtype, torch.Tensor] = {}
    for member in members:
        dtype = member.sae.dtype
        if dtype not in cache:
            b_dec = torch.zeros_like(member.sae.b_dec)
            if dist.is_main:
                x = x_first.to(member.sae.b_dec.device, dtype)
                b_dec = init_b_dec(x, cfg.b_dec_init, maxiter=cfg.b_dec_init_maxiter)
            cache[dtype] = ddp.broadcast_(b_dec.contiguous(), dist)
        member.sae.b_dec.copy_(cache[dtype])


def _prepare_out(cfg: TrainConfig, resume: bool) -> dict[str, Any] | None:
    """Check the output folder against ``resume``; the checkpoint state to resume from, if any."""
    out = Path(cfg.out)
    ckpt = find_checkpoint(out)
    started = (out / TRAIN_CONFIG).is_file()
    if not resume:
        if ckpt is not None or started:
            raise TrainingError(
                f"{out} already holds a training run; pass --resume to continue it, or choose "
                "another out="
            )
        return None
    if ckpt is None:
        saved = json.loads((out / TRAIN_CONFIG).read_text())["config"] if started else None
        state = None
    else:
        state, tensors = read_checkpoint(ckpt)
        state["tensors"], state["path"] = tensors, ckpt
        saved = state["config"]
    if saved is not None:
        diff = config_differences(saved, to_dict(cfg))
        if diff:
            raise TrainingError(
                f"cannot resume {out}: the config differs from the saved run in {diff}; "
                "use the saved values or start a new run with another out="
            )
    return state


def _restore(state: dict[str, Any], members: list[Member]) -> None:
    tensors = state["tensors"]
    for member in members:
        n = member.ckpt_name
        member.sae.load_state_dict(load_member(state["path"], n).state_dict())
        load_optimizer(member.opt, tensors, state["members"][n]["param_groups"], n)
        member.counters.copy_(tensors[f"{n}.counters"])
        member.firing.load_state_dict(
            {"counts": tensors[f"{n}.firing.counts"], "tokens": tensors[f"{n}.firing.tokens"]}
        )
    restore_rng(tensors)


def _checkpoint(
    cfg: TrainConfig, members: list[Member], progress: dict[str, Any], source: BatchSource
) -> None:
    tensors = rng_tensors()
    meta = {}
    for member in members:
        n = member.ckpt_name
        opt_tensors, groups = optimizer_tensors(member.opt, n)
        tensors.update(opt_tensors)
        tensors[f"{n}.counters"] = member.counters.cpu().clone()
        for key, value in member.firing.state_dict().items():
            tensors[f"{n}.firing.{key}"] = value.cpu().contiguous()
        meta[n] = {"param_groups": groups, "sae": to_dict(member.sae.cfg)}
    state = {
        **progress,
        "lr_next": lr_at(cfg, progress["step"]),
        "members": meta,
        "source": source.describe(),
        "config": to_dict(cfg),
    }
    saes = {member.ckpt_name: member.sae for member in members}
    write_checkpoint(Path(cfg.out), saes, tensors, state, {"trained_on": source.trained_on})


def _fidelity_scorer(
    cfg: TrainConfig, source: BatchSource, device: torch.device
) -> FidelityScorer | None:
    """The scorer of ``cfg.fidelity`` (None when unset), checked before the output is touched.

    A streaming run scores through its own backbone; a store run through ``model`` or the
    backbone named in the store's metadata.
    """
    if cfg.fidelity is None:
        return None
    try:
        return FidelityScorer(
            cfg.fidelity,
            source.layer_index,
            model=cfg.model,
            store=source.store,
            backbone=source.backbone,
            device=device,
        )
    except FidelityError as err:
        raise ConfigError(f"fidelity: {err}") from None


def _evaluate(
    cfg: TrainConfig,
    members: list[Member],
    source: BatchSource,
    fidelity: FidelityScorer | None,
    progress: dict,
    log: Logger,
) -> None:
    """Score every SAE on the held-out images (read once, shared) and, with ``fidelity``, on
    the labelled images; rank 0 only (nothing here is a collective)."""
    held_out = list(source.eval_batches()) if cfg.eval_images else []
    for member in members:
        record = {k: progress[k] for k in ("step", "images", "tokens")}
        if cfg.eval_images:
            metrics = reconstruction_metrics(
                member.sae,
                held_out,
                source.eval_layout,
                device=member.counters.device,
                progress=False,
            )
            record.update({f"eval/{k}": v for k, v in metrics.items()})
            diverging = progress["step"] > 0 and metrics["fvu"] > 1  # untrained SAEs may be > 1
            warning = member.watch.observe(
                "fvu", diverging, progress["step"], member.label, Path(cfg.out)
            )
            if warning:
                record["warning"] = warning
        if fidelity is not None:
            record.update({f"eval/fidelity/{k}": v for k, v in fidelity(member.sae).items()})
        log.log(member, record)


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    """Train the SAE(s) of ``cfg``; returns the output folder.

    ``resume=True`` continues from the latest checkpoint in ``cfg.out`` (from scratch when there
    is none), refusing a config that differs from the saved one. Under ``torchrun`` each process
    trains on its slice of every global batch; only rank 0 writes.
    """
    check_device(cfg.device)
    dist = ddp.setup(cfg.device)
    clean = False
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if cfg.tf32 else "highest")
    try:
        with contextlib.ExitStack() as held:
            out = _train(cfg, resume, dist, held)
        clean = True
        return out
    finally:
        torch.set_float32_matmul_precision(precision)
        ddp.teardown(dist, clean)


def _lock_run(out: Path, dist: ddp.Dist, held: contextlib.ExitStack) -> None:
    """Rank 0 locks the run folder for the whole run (``held``); every rank learns whether it
    could, so a refused lock stops all ranks with one line instead of leaving them waiting."""
    refused = None
    if dist.is_main:
        try:
            held.enter_context(_lock_out(out))
        except TrainingError as err:
            refused = err
    locked = ddp.broadcast_(torch.tensor([refused is None], device=dist.device), dist)
    if refused is not None:
        raise refused
    if not bool(locked.item()):
        raise TrainingError(f"rank 0 could not lock the run folder {out}: see its error")


def _lock_out(out: Path) -> FolderLock:
    """Create the run folder ``out`` and lock it for this process (rank 0) for the whole run."""
    if out.exists() and not out.is_dir():
        raise TrainingError(f"out={out} is a file, not a folder: choose a folder for the run")
    out.mkdir(parents=True, exist_ok=True)
    busy = TrainingError(
        f"another train process is writing to {out}; wait for it to finish, or choose another out="
    )
    return FolderLock(out, busy)


def _train(cfg: TrainConfig, resume: bool, dist: ddp.Dist, held: contextlib.ExitStack) -> Path:
    """The run; ``held`` keeps the run folder's lock (rank 0) until the caller's exit."""
    out = Path(cfg.out)
    source = open_source(cfg, dist.device)
    _check_compatible(cfg, source, dist.world_size)
    fidelity = _fidelity_scorer(cfg, source, dist.device)
    evaluating = bool(cfg.eval_images) or fidelity is not None
    tpi = source.tokens_per_image
    if cfg.batch_mode == "images":
        dist.slice(cfg.batch_images)
        tokens_per_step = cfg.batch_images * tpi
    else:
        dist.slice(cfg.batch_tokens)
        tokens_per_step = cfg.batch_tokens
    n_steps = plan_steps(cfg, tpi)
    members = _build_members(cfg, dist.device, tokens_per_step)
    _lock_run(out, dist, held)
    state = _prepare_out(cfg, resume)
    for warning in check_schedule(cfg, n_steps) if dist.is_main else []:
        tqdm.write(f"warning: {warning}", file=sys.stderr)
    ddp.barrier(dist)
    if dist.is_main:
        for member in members:
            member.out_dir.mkdir(parents=True, exist_ok=True)
            truncate_metrics(member.out_dir / METRICS, state["step"] if state else None)
        if not (out / TRAIN_CONFIG).is_file():
            write_json(out / TRAIN_CONFIG, {"format_version": 1, "config": to_dict(cfg)})
    log = Logger(cfg, dist.is_main)
    if state is None:
        progress = {"step": 0, "images": 0, "tokens": 0, "data_position": source.start_position()}
    else:
        _restore(state, members)
        source.restore(state["source"])
        progress = {k: state[k] for k in ("step", "images", "tokens", "data_position")}
    batches = source.batches(progress["data_position"])
    if progress["step"] == 0:
        first = next(batches)
        _init_b_dec(cfg, members, first[0], dist)
        batches = itertools.chain([first], batches)
        if evaluating and dist.is_main:
            _evaluate(cfg, members, source, fidelity, progress, log)
    if cfg.prefetch_batches:
        batches = Prefetcher(batches, cfg.prefetch_batches, pin=dist.device.type == "cuda")
    bar = tqdm(
        total=n_steps, initial=progress["step"], unit="step", disable=not dist.is_main, desc="train"
    )
    t0, tokens0, waited = time.perf_counter(), progress["tokens"], 0.0
    pending, loss = Pending(log, dist.world_size, out), float("nan")
    try:
        while progress["step"] < n_steps:
            start = time.perf_counter()
            x_global, position = next(batches)
            waited += time.perf_counter() - start
            x = x_global[dist.slice(x_global.shape[0])].to(dist.device, non_blocking=True)
            values = [train_step(cfg, member, x, progress["step"], dist) for member in members]
            n_tokens = x_global.numel() // x_global.shape[-1]
            progress["step"] += 1
            progress["tokens"] += n_tokens
            progress["images"] += (
                x_global.shape[0] if cfg.batch_mode == "images" else n_tokens / tpi
            )
            progress["data_position"] = position
            elapsed = max(time.perf_counter() - t0, 1e-9)
            rate = (progress["tokens"] - tokens0) / elapsed
            done = progress["step"] == n_steps
            logging = progress["step"] % cfg.log_every == 0 or done
            saving = progress["step"] % cfg.checkpoint_every == 0 or done
            scoring = evaluating and (progress["step"] % cfg.eval_every == 0 or done)
            line = {k: progress[k] for k in ("step", "images", "tokens")}
            line |= {"tokens_per_s": rate, "input_wait_s": waited, "elapsed_s": elapsed}
            checking = logging or saving
            pending.add(members, values, progress["step"], line if logging else None, checking)
            if saving or scoring or progress["step"] % cfg.sync_every == 0:
                loss = pending.sync()
            bar.update(1)
            bar.set_postfix(tok_s=f"{rate:.3g}", loss=f"{loss:.4g}", refresh=False)
            if scoring and dist.is_main:
                _evaluate(cfg, members, source, fidelity, progress, log)
            if dist.is_main and saving:
                _checkpoint(cfg, members, progress, source)
    finally:
        if isinstance(batches, Prefetcher):
            batches.close()
        bar.close()
        log.close()
    if dist.is_main:
        for member in members:
            counts = {k: progress[k] for k in ("step", "images", "tokens")}
            save(member.sae, member.out_dir, extra={**counts, "trained_on": source.trained_on})
        if source.bad:
            write_bad_report(list(source.bad), out / "bad_images.json")
    return out
