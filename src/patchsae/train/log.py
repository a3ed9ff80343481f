"""Logging of a training run: ``metrics.jsonl`` per SAE, and W&B when ``wandb_project`` is set."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tqdm import tqdm

from patchsae.atomic import json_ready, write_text
from patchsae.config import ConfigError, to_dict
from patchsae.train.config import TrainConfig
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
