"""The size-versus-quality plot of a run: one labelled point per evaluated model, in pipeline order."""

from __future__ import annotations

import os
from pathlib import Path

# The object-oriented Figure API renders without pyplot, so importing this module never switches a global backend.
from matplotlib.figure import Figure

LOWER_IS_BETTER = {"perplexity"}


def plot_size_vs_quality(rows: list, metric: str, path: Path) -> Path | None:
    """Write a PNG of size on disk (MB) against `metric` for every row (`run_dir.Row`) that has both; None when no
    row has."""
    points = [
        (row.variant or row.label, row.metrics["size_on_disk_bytes"] / 1e6, row.metrics[metric])
        for row in rows
        if row.metrics.get("size_on_disk_bytes") and row.metrics.get(metric) is not None
    ]
    if not points:
        return None
    figure = Figure(figsize=(6.4, 4.2), dpi=100)
    axes = figure.add_subplot()
    labels, sizes, values = zip(*points)
    axes.plot(sizes, values, color="tab:gray", linewidth=1, zorder=1)
    axes.scatter(sizes, values, color="tab:blue", zorder=2)
    for index, (label, size, value) in enumerate(points):
        offset = (6, 6) if index % 2 == 0 else (6, -12)  # alternate above/below: neighbours often sit close
        axes.annotate(label, (size, value), textcoords="offset points", xytext=offset, fontsize=9)
    better = "lower is better" if metric in LOWER_IS_BETTER else "higher is better"
    axes.set_xlabel("size on disk (MB)")
    axes.set_ylabel(f"{metric} ({better})")
    axes.set_title(f"Size vs {metric}, in pipeline order")
    axes.grid(alpha=0.3)
    axes.margins(x=0.15, y=0.15)
    figure.tight_layout()
    save_figure(figure, Path(path))
    return Path(path)


def save_figure(figure: Figure, path: Path) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    figure.savefig(temporary, format="png")
    temporary.replace(path)
