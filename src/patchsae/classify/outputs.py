"""Tidy CSV, summary table and the Fig. 5b-style plot of a finished classify run."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from patchsae.atomic import write_text
from patchsae.classify.tally import Tally

RESULT_COLUMNS = (
    "condition",
    "selection",
    "source_atlas",
    "k",
    "mask_by",
    "protocol",
    "class_id",
    "class_name",
    "n",
    "correct",
    "accuracy",
    "correct_top5",
    "top5_accuracy",
)
SUMMARY_COLUMNS = (
    "condition",
    "selection",
    "k",
    "n",
    "accuracy",
    "top5_accuracy",
    "mean_class_accuracy",
)


def _ratio(a: int, b: int) -> float | str:
    return a / b if b else ""


def _csv(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def result_rows(run: dict[str, Any], tally: Tally) -> list[dict[str, Any]]:
    """One row per condition and class (k empty for unspliced / spliced, ``all`` for every
    latent; selection, atlas, mask_by empty where they do not apply)."""
    atlas = run.get("atlas") or {}
    source = f"{atlas['path']}#{atlas['dataset']}" if atlas else ""
    rows = []
    for cond in tally.conditions:
        masked = cond.kind in ("on", "off")
        counts = tally.counts[cond.name]
        for c, name in enumerate(run["class_names"]):
            n, hit, hit5 = (int(counts[f][c]) for f in Tally.FIELDS)
            rows.append(
                {
                    "condition": cond.kind,
                    "selection": cond.selection,
                    "source_atlas": source if cond.selection in ("class", "dataset") else "",
                    "k": (cond.k or "all") if masked else "",
                    "mask_by": run["config"]["mask_by"] if masked else "",
                    "protocol": run["protocol"] if cond.selection in ("class", "dataset") else "",
                    "class_id": c,
                    "class_name": name,
                    "n": n,
                    "correct": hit,
                    "accuracy": _ratio(hit, n),
                    "correct_top5": hit5,
                    "top5_accuracy": _ratio(hit5, n),
                }
            )
    return rows


def summary_rows(tally: Tally) -> list[dict[str, Any]]:
    """One row per condition: accuracy over images and mean per-class accuracy."""
    rows = []
    for cond in tally.conditions:
        counts = tally.counts[cond.name]
        n, hit, hit5 = (int(counts[f].sum()) for f in Tally.FIELDS)
        seen = counts["n"] > 0
        per_class = (counts["correct"][seen] / counts["n"][seen]).double()
        rows.append(
            {
                "condition": cond.kind,
                "selection": cond.selection,
                "k": (cond.k or "all") if cond.kind in ("on", "off") else "",
                "n": n,
                "accuracy": _ratio(hit, n),
                "top5_accuracy": _ratio(hit5, n),
                "mean_class_accuracy": float(per_class.mean()) if seen.any() else "",
            }
        )
    return rows


def write_outputs(root: Path, run: dict[str, Any], tally: Tally, plot: bool = True) -> None:
    """``results.csv``, ``summary.csv`` and (masking runs, ``plot``) ``accuracy_vs_k.png`` and
    ``.html``."""
    write_text(root / "results.csv", _csv(result_rows(run, tally), RESULT_COLUMNS))
    summary = summary_rows(tally)
    write_text(root / "summary.csv", _csv(summary, SUMMARY_COLUMNS))
    if plot and any(r["k"] != "" for r in summary):
        from patchsae.classify.plot import accuracy_vs_k

        d_sae = run.get("d_sae") or 1
        accuracy_vs_k(summary, d_sae, root / "accuracy_vs_k.png")
        accuracy_vs_k(summary, d_sae, root / "accuracy_vs_k.html")
