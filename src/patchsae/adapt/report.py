"""The remapping report: JSON and CSV numbers, Markdown and a self-contained HTML page, figures.

Files in ``OUT/`` (format_version 1): ``compare.json`` (config, definitions, summaries, one row
per class), ``per_latent.csv``, ``per_class.csv``, ``report.md`` (tables, figure links),
``report.html`` (the same with the figures embedded), ``freq_scatter.png``, ``jaccard_hist.png``
(figures need matplotlib, ``pip install 'patchsae[plot]'``; without it the report says so).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
from pathlib import Path
from typing import Any

import numpy as np

from patchsae.atomic import atomic_file, json_ready, write_json, write_text
from patchsae.config import to_dict
from patchsae.stats.accumulate import StatsError

FORMAT = "patchsae-compare"
FORMAT_VERSION = 1
LATENT_COLUMNS = (
    "image_freq_base",
    "image_freq_adapted",
    "freq_shift",
    "mean_act_base",
    "mean_act_adapted",
    "mean_act_shift",
    "appears",
    "vanishes",
)
CLASS_COLUMNS = (
    "jaccard",
    "adapted_evidence_on_base_top",
    "adapted_evidence_on_adapted_top",
    "base_evidence_on_base_top",
)
DEFINITIONS = {
    "image_freq": "share of the images whose image-level activation (mean over CLS + patch "
    "tokens, prompt tokens excluded) is > 0",
    "mean_act": "mean image-level activation over all images",
    "appear / vanish": "latents firing on no image of the base model but on some of the "
    "adapted model / the reverse",
    "spearman_image_freq, spearman_mean_act": "Spearman rank correlation between the models, "
    "over the latents that fire in either",
    "top_k(model, c)": "the first k latents of the atlas's class ranking of class c (by the "
    "statistic `by`) with a positive value",
    "jaccard": "|top_k(base, c) & top_k(adapted, c)| / |top_k(base, c) | top_k(adapted, c)|",
    "adapted_evidence_on_base_top": "sum over top_k(base, c) of the adapted model's `by` "
    "values for class c / their sum over all latents",
    "adapted_evidence_on_adapted_top": "the same over top_k(adapted, c)",
    "base_evidence_on_base_top": "the base model's values on its own top_k(base, c)",
    "adaptation_gain": "accuracy of the adapted model minus the base model's zero-shot accuracy",
    "gain_kept_base_latents": "(accuracy of the adapted model with only the top-k base-model "
    "class latents of each image's class kept - base zero-shot accuracy) / adaptation_gain",
}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _figures(result: dict[str, Any], out: Path) -> dict[str, Path] | str:
    """The two PNGs, or why they are missing."""
    try:
        from patchsae.stats.plot import _pyplot, _save_png

        plt = _pyplot()
    except StatsError as err:
        return str(err)
    lat = result["latents"]
    both = (lat["image_freq_base"] > 0) & (lat["image_freq_adapted"] > 0)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(lat["image_freq_base"][both], lat["image_freq_adapted"][both], s=4, alpha=0.5)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="image frequency, base",
        ylabel="image frequency, adapted",
        title="latents firing in both models",
    )
    lo = max(min(lat["image_freq_base"][both].min(initial=1), 1e-6), 1e-6)
    ax.plot([lo, 1], [lo, 1], color="gray", lw=1)
    paths = {"freq_scatter": _save_png(fig, out / "freq_scatter.png")}
    fig, ax = plt.subplots(figsize=(5, 3.5))
    jac = [r["jaccard"] for r in result["classes"] if not math.isnan(r["jaccard"])]
    ax.hist(jac, bins=np.linspace(0, 1, 11))
    ax.set(xlabel="Jaccard of the top-k class latents", ylabel="classes")
    paths["jaccard_hist"] = _save_png(fig, out / "jaccard_hist.png")
    return paths


def _sections(result: dict[str, Any], cfg: Any) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, paragraphs, table rows with a header row) of the report, in order."""
    summary, means = result["latent_summary"], result["class_means"]
    sections = [
        (
            "Setup",
            [
                f"SAE `{cfg.sae}` at layer {cfg.layer}; base `{cfg.base}`; adapted "
                f"`{cfg.adapted}`; images `{cfg.data.source}` (split `{cfg.data.split}`); "
                f"top-k class latents with k = {cfg.k}, ranked by `{cfg.by}`."
            ],
            [],
        ),
        (
            "Latents",
            ["How the SAE's latents fire on the two models' activations."],
            [["measure", "value"]] + [[k, _fmt(v)] for k, v in summary.items()],
        ),
        (
            "Class latents (mean over classes)",
            ["Does the adapted model rely on the latents the base model already used per class?"],
            [["measure", "mean"]] + [[k, _fmt(v)] for k, v in means.items()],
        ),
        (
            "Per class",
            [],
            [["class", "name", *CLASS_COLUMNS]]
            + [
                [str(r["class"]), r["class_name"], *(_fmt(r[c]) for c in CLASS_COLUMNS)]
                for r in result["classes"]
            ],
        ),
        *_masking_section(result.get("masking")),
        (
            "Definitions",
            [],
            [["name", "definition"]] + [[k, v] for k, v in DEFINITIONS.items()],
        ),
    ]
    return sections


def _masking_section(m: dict[str, Any] | None) -> list[tuple[str, list[str], list[list[str]]]]:
    if m is None:
        return []
    text = (
        f"`patchsae classify` on split `{m['split']}` ({m['protocol']}): zero-shot base "
        f"{_fmt(m['zero_shot_base'])}, adapted {_fmt(m['adapted'])} (spliced "
        f"{_fmt(m['adapted_spliced'])}), adaptation gain {_fmt(m['adaptation_gain'])}. "
        '"on": only the top-k class latents of the image\'s class are kept.'
    )
    columns = [
        "k",
        "on_base_latents",
        "on_adapted_latents",
        "gain_kept_base_latents",
        "gain_kept_adapted_latents",
    ]
    table = [columns] + [[_fmt(row[c]) for c in columns] for row in m["by_k"]]
    return [("Masking on the adapted model", [text], table)]


def _markdown(sections: list, figures: dict[str, Path] | str) -> str:
    lines = ["# Remapping report", ""]
    for title, paragraphs, table in sections:
        lines += [f"## {title}", "", *(p + "\n" for p in paragraphs)]
        if table:
            cells = [[c.replace("|", "\\|") for c in row] for row in table]
            lines.append("| " + " | ".join(cells[0]) + " |")
            lines.append("|" + " --- |" * len(cells[0]))
            lines += ["| " + " | ".join(row) + " |" for row in cells[1:]]
            lines.append("")
    lines += ["## Figures", ""]
    if isinstance(figures, str):
        lines.append(f"No figures: {figures}")
    else:
        lines += [f"![{name}]({path.name})" for name, path in figures.items()]
    return "\n".join(lines) + "\n"


def _html(sections: list, figures: dict[str, Path] | str) -> str:
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Remapping report</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:auto}table{border-collapse:"
        "collapse}td,th{border:1px solid #ccc;padding:2px 6px}</style></head><body>",
        "<h1>Remapping report</h1>",
    ]
    for title, paragraphs, table in sections:
        parts.append(f"<h2>{html.escape(title)}</h2>")
        parts += [f"<p>{html.escape(p)}</p>" for p in paragraphs]
        if table:
            head = "".join(f"<th>{html.escape(c)}</th>" for c in table[0])
            body = "".join(
                "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                for row in table[1:]
            )
            parts.append(f"<table><tr>{head}</tr>{body}</table>")
    parts.append("<h2>Figures</h2>")
    if isinstance(figures, str):
        parts.append(f"<p>No figures: {html.escape(figures)}</p>")
    else:
        for name, path in figures.items():
            data = base64.b64encode(path.read_bytes()).decode()
            parts.append(f"<img alt='{name}' src='data:image/png;base64,{data}'>")
    return "\n".join(parts) + "\n</body></html>\n"


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    with atomic_file(path, "w") as f:
        f.write(buffer.getvalue())


def write_report(result: dict[str, Any], cfg: Any, out: Path) -> Path:
    """Write every file of the module docstring into ``out``; returns ``report.md``'s path."""
    out.mkdir(parents=True, exist_ok=True)
    lat = result["latents"]
    _write_csv(
        out / "per_latent.csv",
        ["latent", *LATENT_COLUMNS],
        [[j, *(lat[c][j].item() for c in LATENT_COLUMNS)] for j in range(len(lat["freq_shift"]))],
    )
    _write_csv(
        out / "per_class.csv",
        ["class", "class_name", *CLASS_COLUMNS, "top_base", "top_adapted"],
        [
            [
                r["class"],
                r["class_name"],
                *(r[c] for c in CLASS_COLUMNS),
                " ".join(map(str, r["top_base"])),
                " ".join(map(str, r["top_adapted"])),
            ]
            for r in result["classes"]
        ],
    )
    figures = _figures(result, out)
    sections = _sections(result, cfg)
    write_text(out / "report.html", _html(sections, figures))
    write_text(out / "report.md", _markdown(sections, figures))
    write_json(
        out / "compare.json",
        json_ready(
            {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "config": to_dict(cfg),
                "definitions": DEFINITIONS,
                "latent_summary": result["latent_summary"],
                "class_means": result["class_means"],
                "classes": result["classes"],
                "masking": result.get("masking"),
            }
        ),
    )
    return out / "report.md"
