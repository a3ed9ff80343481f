"""The paper's figures from an atlas: PNG with matplotlib, interactive HTML with plotly.

Both are optional (``pip install patchsae[plot]``); the HTML files embed plotly.js, so they open
offline. Every function reads only the arrays it draws (memory-mapped).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import numpy as np

from patchsae.atomic import atomic_file, write_text
from patchsae.stats.accumulate import StatsError
from patchsae.stats.atlas import AtlasDataset


def _require(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise StatsError(
            f"this figure needs {package}: pip install 'patchsae[plot]' (or pip install {package})"
        ) from None


def _pyplot() -> Any:
    _require("matplotlib").use("Agg")
    return _require("matplotlib.pyplot")


def _save_png(fig: Any, path: Path) -> Path:
    with atomic_file(path) as f:
        fig.savefig(f, format="png", dpi=120, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def scatter_points(ds: AtlasDataset) -> dict[str, np.ndarray]:
    """Fig. 3's points, one per latent that fires: ``latent``, ``log_freq`` (log10 image
    frequency), ``log_act`` (log10 mean activation where it fires), ``entropy`` (label entropy,
    -1 undefined) and ``top_class`` (label with most class counts, -1 without labels)."""
    freq = np.asarray(ds.array("image_freq"))
    act = np.asarray(ds.array("mean_act_fired"))
    latent = np.flatnonzero((freq > 0) & (act > 0))
    if ds.meta["has_labels"]:
        counts = np.asarray(ds.array("class_counts"))[:, latent]
        top_class = np.where(counts.max(0) > 0, counts.argmax(0), -1)
    else:
        top_class = np.full(len(latent), -1)
    return {
        "latent": latent,
        "log_freq": np.log10(freq[latent]),
        "log_act": np.log10(act[latent]),
        "entropy": np.asarray(ds.array("label_entropy"))[latent],
        "top_class": top_class,
    }


def _hover(ds: AtlasDataset, pts: dict[str, np.ndarray]) -> list[str]:
    return [
        f"latent {j}<br>top class: {ds.class_name(int(c)) or '-'}<br>entropy {e:.3f}"
        f"<br>log10 freq {f:.3f}, log10 act {a:.3f}"
        for j, c, e, f, a in zip(
            pts["latent"],
            pts["top_class"],
            pts["entropy"],
            pts["log_freq"],
            pts["log_act"],
            strict=True,
        )
    ]


def scatter(ds: AtlasDataset, out: str | Path) -> Path:
    """Fig. 3: log10 frequency vs log10 mean activation, coloured by label entropy, with
    marginal histograms; ``.png`` (matplotlib) or ``.html`` (plotly, hover: latent, top class)."""
    out = Path(out)
    pts = scatter_points(ds)
    if len(pts["latent"]) == 0:
        raise StatsError(f"no latent of {ds.name!r} fires: nothing to plot")
    defined = pts["entropy"] >= 0
    if out.suffix == ".html":
        go = _require("plotly.graph_objects")
        subplots = _require("plotly.subplots")
        fig = subplots.make_subplots(
            rows=2,
            cols=2,
            column_widths=[0.8, 0.2],
            row_heights=[0.2, 0.8],
            shared_xaxes=True,
            shared_yaxes=True,
            horizontal_spacing=0.02,
            vertical_spacing=0.02,
        )
        text = np.asarray(_hover(ds, pts), dtype=object)
        fig.add_trace(
            go.Scatter(
                x=pts["log_freq"][~defined],
                y=pts["log_act"][~defined],
                mode="markers",
                marker={"color": "lightgrey", "size": 4},
                name="entropy undefined",
                text=text[~defined],
                hoverinfo="text",
            ),
            row=2,
            col=1,
        )
        fig.add_trace(
            go.Scatter(
                x=pts["log_freq"][defined],
                y=pts["log_act"][defined],
                mode="markers",
                marker={
                    "color": pts["entropy"][defined],
                    "colorscale": "Viridis",
                    "size": 4,
                    "colorbar": {"title": "label entropy"},
                },
                name="latents",
                text=text[defined],
                hoverinfo="text",
            ),
            row=2,
            col=1,
        )
        fig.add_trace(go.Histogram(x=pts["log_freq"], showlegend=False), row=1, col=1)
        fig.add_trace(go.Histogram(y=pts["log_act"], showlegend=False), row=2, col=2)
        fig.update_xaxes(title_text="log10 activation frequency", row=2, col=1)
        fig.update_yaxes(title_text="log10 mean activation", row=2, col=1)
        fig.update_layout(title=f"{ds.name}: {len(pts['latent'])} latents that fire")
        write_text(out, fig.to_html(include_plotlyjs=True, full_html=True))
        return out
    plt = _pyplot()
    fig = plt.figure(figsize=(7, 6))
    grid = fig.add_gridspec(
        2, 2, width_ratios=(4, 1), height_ratios=(1, 4), wspace=0.05, hspace=0.05
    )
    ax = fig.add_subplot(grid[1, 0])
    ax.scatter(pts["log_freq"][~defined], pts["log_act"][~defined], s=4, c="lightgrey")
    points = ax.scatter(
        pts["log_freq"][defined],
        pts["log_act"][defined],
        s=4,
        c=pts["entropy"][defined],
        cmap="viridis",
    )
    ax.set_xlabel("log10 activation frequency")
    ax.set_ylabel("log10 mean activation")
    fig.add_subplot(grid[0, 0], sharex=ax).hist(pts["log_freq"], bins=50)
    fig.add_subplot(grid[1, 1], sharey=ax).hist(pts["log_act"], bins=50, orientation="horizontal")
    fig.colorbar(points, ax=ax, label="label entropy", location="bottom", pad=0.12)
    fig.suptitle(f"{ds.name}: {len(pts['latent'])} latents that fire")
    return _save_png(fig, out)


def references(
    ds: AtlasDataset, latents: list[int], out: str | Path, mask: str | None = None
) -> Path:
    """PNG grid: one row per latent, its reference thumbnails with label, class name and
    activation; with ``mask`` ("heat" or "darken") drawn on them."""
    if not latents:
        raise StatsError("name at least one latent (--latents 3 17 ...)")
    plt = _pyplot()
    k = ds.meta["options"]["top_k"]
    fig, axes = plt.subplots(len(latents), k, figsize=(1.6 * k, 1.9 * len(latents)), squeeze=False)
    for row, j in enumerate(latents):
        refs = {r["slot"]: r for r in ds.latent(j)["references"]}
        for s in range(k):
            ax = axes[row, s]
            ax.axis("off")
            if s not in refs:
                continue
            ax.imshow(ds.thumbnail(j, s, mask=mask))
            r = refs[s]
            name = r["class_name"] if r["class_name"] is not None else "-"
            ax.set_title(f"{r['label']} {name}\n{r['value']:.3f}", fontsize=7)
        axes[row, 0].text(
            -0.1,
            0.5,
            f"latent {j}",
            transform=axes[row, 0].transAxes,
            rotation=90,
            va="center",
            ha="right",
            fontsize=8,
        )
    return _save_png(fig, Path(out))


def heatmap_matrix(ds: AtlasDataset, per_class: int = 3) -> tuple[np.ndarray, list[int]]:
    """(n_classes, n_latents) share of each latent's threshold count that falls in each class,
    for the ``per_class`` top latents of every class (by class counts, ties to the lower id),
    columns grouped by class; and the latent ids of the columns."""
    if not ds.meta["has_labels"]:
        raise StatsError(f"dataset {ds.name!r} has no labels: no class heatmap")
    columns: list[int] = []
    for c in range(len(ds.class_names)):
        columns += [j for j, _ in ds.class_latents(c, per_class) if j not in columns]
    counts = np.asarray(ds.array("class_counts"))[:, columns].astype(np.float64)
    return counts / np.maximum(counts.sum(0, keepdims=True), 1), columns


def heatmap(ds: AtlasDataset, out: str | Path, per_class: int = 3) -> Path:
    """Class x latent heatmap of every class's top latents (``.png`` or ``.html``)."""
    out = Path(out)
    share, columns = heatmap_matrix(ds, per_class)
    labels = [str(j) for j in columns]
    if out.suffix == ".html":
        go = _require("plotly.graph_objects")
        fig = go.Figure(
            go.Heatmap(
                z=share,
                x=labels,
                y=ds.class_names,
                colorscale="Viridis",
                colorbar={"title": "share of counts"},
            )
        )
        fig.update_xaxes(title_text="latent", type="category")
        fig.update_layout(title=f"{ds.name}: top {per_class} latents per class")
        write_text(out, fig.to_html(include_plotlyjs=True, full_html=True))
        return out
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4, 0.25 * len(columns)), max(3, 0.3 * len(ds.class_names))))
    image = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(columns)), labels, rotation=90, fontsize=6)
    ax.set_yticks(range(len(ds.class_names)), ds.class_names, fontsize=7)
    ax.set_xlabel("latent")
    fig.colorbar(image, ax=ax, label="share of the latent's counts")
    ax.set_title(f"{ds.name}: top {per_class} latents per class")
    return _save_png(fig, out)
