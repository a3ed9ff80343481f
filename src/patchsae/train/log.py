"""Logging of a training run: ``metrics.jsonl`` per SAE, and W&B when ``wandb_project`` is set."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tqdm import tqdm

from patchsae.atomic import json_ready, write_text
from patchsae.config import ConfigError, to_dict
from patchsae.train.config import TrainConfig, check_schedule
from patchsae.train.step import Member

METRICS = "metrics.jsonl"


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append ``record`` as one line of strict JSON (NaN and infinities become null)."""
    with open(path, "a") as f:
        f.write(json.dumps(json_ready(record), allow_nan=False) + "\n")


def truncate_metrics(path: Path, keep_until: int | None) -> None:
    """Drop metrics lines of steps after ``keep_until`` (all lines when None), atomically.

    A run killed while appending leaves a partial last line; it is dropped too.
    """
    if not path.is_file():
        return
    kept = []
    if keep_until is not None:
        for line in path.read_text().splitlines():
            try:
                step = json.loads(line)["step"]
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
            if step <= keep_until:
                kept.append(line)
    write_text(path, "".join(line + "\n" for line in kept))


class Logger:
    """metrics.jsonl per SAE, and W&B when ``wandb_project`` is set (rank 0 only)."""

    def __init__(self, cfg: TrainConfig, enabled: bool) -> None:
        self.enabled, self.run = enabled, None
        if enabled and cfg.wandb_project:
            try:
                import wandb
            except ImportError:
                raise ConfigError(
                    "wandb_project is set but wandb is not installed: pip install wandb, "
                    "or unset wandb_project"
                ) from None
            self.run = wandb.init(project=cfg.wandb_project, config=to_dict(cfg), dir=cfg.out)

    def log(self, member: Member, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        append_jsonl(member.out_dir / METRICS, record)
        if "warning" in record:
            tqdm.write(f"warning: {record['warning']}")
        if self.run is not None:
            prefix = f"{member.name}/" if member.name else ""
            values = {prefix + k: v for k, v in record.items() if k != "warning"}
            self.run.log(values, step=record["step"])

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()


def _records(path: Path) -> list[dict[str, Any]]:
    """The readable lines of a metrics.jsonl (none when it is absent)."""
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _percent(value: Any) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def run_summary(cfg: TrainConfig, out: Path) -> str:
    """The screen ``patchsae train`` ends with: the schedule's warnings again, then per SAE its
    last held-out metrics (or a note that nothing was held out), its dead fraction, where it was
    saved and how to evaluate it."""
    lines = [f"trained {len(cfg.member_names())} SAE(s) in {out}"]
    folders = {name: out / name if name else out for name in cfg.member_names()}
    records_of = {name: _records(folder / METRICS) for name, folder in folders.items()}
    steps = [r["step"] for r in next(iter(records_of.values())) if isinstance(r.get("step"), int)]
    if steps and steps[-1] > 0:
        lines += [f"warning: {w}" for w in check_schedule(cfg, steps[-1])]
    for name, folder in folders.items():
        records = records_of[name]
        last = records[-1] if records else {}
        held_out = next((r for r in reversed(records) if "eval/fvu" in r), None)
        lines.append(
            f"{name or 'sae'}: step {last.get('step', '?')}, {last.get('tokens', '?')} tokens"
        )
        if held_out is not None:
            lines.append(
                f"  held-out ({cfg.eval_images} images): fvu {held_out['eval/fvu']:.4f}, "
                f"l0 {held_out['eval/l0']:.1f}, dead {_percent(held_out.get('eval/frac_dead'))}"
            )
        else:
            lines.append("  no held-out images (eval_images=0): no held-out metrics")
        lines.append(f"  dead over the last window: {_percent(last.get('frac_dead'))}")
        lines.append(f"  saved: {folder} (sae.safetensors + cfg.json)")
        source = f"--store {cfg.store}" if cfg.store else "--store TEST_STORE"
        held = f" --images {cfg.eval_images}" if cfg.store and cfg.eval_images else ""
        lines.append(f"  evaluate: patchsae evaluate --sae {folder} {source}{held}")
    return "\n".join(lines)
