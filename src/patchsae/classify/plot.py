"""Fig. 5b of PatchSAE: accuracy against the number of latents kept (on) or removed (off)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from patchsae.atomic import write_text
from patchsae.stats.plot import _pyplot, _require, _save_png


def _series(summary: list[dict[str, Any]], d_sae: int) -> dict[str, tuple[list[int], list[float]]]:
    """``<mode> (<selection>)`` -> (k values, accuracies), ``all`` plotted at d_sae."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for row in summary:
        if row["k"] == "":
            continue
        xs, ys = out.setdefault(f"{row['condition']} ({row['selection']})", ([], []))
        xs.append(d_sae if row["k"] == "all" else int(row["k"]))
        ys.append(float(row["accuracy"]))
    return {
        name: tuple(zip(*sorted(zip(xs, ys, strict=True)), strict=True))
        for name, (xs, ys) in out.items()
    }


def accuracy_vs_k(summary: list[dict[str, Any]], d_sae: int, out: str | Path) -> Path:
    """Lines of accuracy vs k (log x) per mode and selection, with the unspliced and spliced
    accuracies as horizontal lines; ``.png`` (matplotlib) or ``.html`` (plotly, offline)."""
    out = Path(out)
    series = _series(summary, d_sae)
    baselines = {r["condition"]: float(r["accuracy"]) for r in summary if r["k"] == ""}
    title = "top-1 accuracy vs latents kept (on) / removed (off)"
    if out.suffix == ".html":
        go = _require("plotly.graph_objects")
        fig = go.Figure()
        for name, (xs, ys) in series.items():
            fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", name=name))
        for name, acc in baselines.items():
            fig.add_hline(y=acc, line_dash="dash", annotation_text=name)
        fig.update_layout(title=title, xaxis_type="log", xaxis_title="k", yaxis_title="accuracy")
        write_text(out, fig.to_html(include_plotlyjs=True, full_html=True))
        return out
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=name)
    for name, acc in baselines.items():
        ax.axhline(
            acc, linestyle="--", color="grey" if name == "unspliced" else "black", label=name
        )
    ax.set(xscale="log", xlabel="k", ylabel="accuracy", title=title)
    ax.legend(fontsize=8)
    return _save_png(fig, out)
