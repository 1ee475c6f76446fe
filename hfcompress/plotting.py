"""The run's pictures: every evaluated model's size on disk against its quality and, when the run has a paired timing
pass, against its speed-up (one labelled point per model, in pipeline order); and a few test sentences with each
word shaded by its attribution, one line per model."""

from __future__ import annotations

import os
from pathlib import Path

# The object-oriented Figure API renders without pyplot, so importing this module never switches a global backend.
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.text import Annotation, Text
from matplotlib.transforms import Bbox

from .report import paired_timing
from .run_dir import Row

LOWER_IS_BETTER = {"perplexity"}
# Where a label may sit around its point, in points: nearest first, the eight directions at each distance.
LABEL_DIRECTIONS = [(1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1)]
LABEL_DISTANCES = [6, 16, 28, 42]
MARKER_RADIUS_PX = 5


def plot_size_vs_quality(rows: list[Row], metric: str, path: Path, comparison: dict | None = None) -> Path | None:
    """Write a PNG of size on disk (MB) against `metric` for every row that has both, beside a panel of size against
    the paired pass's batch-1 speed-up when `comparison` times any of them; None when no row has a size and `metric`."""
    figure = size_figure(rows, metric, comparison)
    if figure is None:
        return None
    save_figure(figure, Path(path))
    return Path(path)


def size_figure(rows: list[Row], metric: str, comparison: dict | None = None) -> Figure | None:
    quality = [(_short_label(row), row.metrics["size_on_disk_bytes"] / 1e6, row.metrics[metric])
               for row in rows if row.metrics.get("size_on_disk_bytes") and row.metrics.get(metric) is not None]
    if not quality:
        return None
    speed = _speed_points(rows, comparison)
    figure = Figure(figsize=(11.5, 4.4) if speed else (6.4, 4.2), dpi=100)
    FigureCanvasAgg(figure)
    quality_axes = figure.add_subplot(1, 2 if speed else 1, 1)
    better = "lower is better" if metric in LOWER_IS_BETTER else "higher is better"
    _draw_points(quality_axes, quality, title=f"Size vs {metric}, in pipeline order", ylabel=f"{metric} ({better})")
    speed_axes = None
    if speed:
        speed_axes = figure.add_subplot(1, 2, 2)
        reference = comparison["settings"]["reference"]
        _draw_points(speed_axes, [(label, size, timed["speedup"]) for label, size, timed in speed],
                     title="Size vs speed, all models timed in one pass",
                     ylabel=f"batch-1 speed-up vs {reference} (x, IQR bars)")
        speed_axes.errorbar([size for _, size, _ in speed], [timed["speedup"] for _, _, timed in speed],
                            yerr=_iqr_bars(speed), fmt="none", ecolor="tab:blue", alpha=0.5, zorder=1)
        speed_axes.axhline(1.0, color="tab:gray", linestyle="--", linewidth=1, zorder=0)
    figure.tight_layout()
    renderer = figure.canvas.get_renderer()
    place_labels(quality_axes, quality, renderer)
    if speed_axes is not None:
        place_labels(speed_axes, [(label, size, timed["speedup"]) for label, size, timed in speed], renderer)
    return figure


def _speed_points(rows: list[Row], comparison: dict | None) -> list[tuple[str, float, dict]]:
    points = []
    for row in rows:
        timed = paired_timing(comparison, row.label)
        if timed is not None and row.metrics.get("size_on_disk_bytes"):
            points.append((_short_label(row), row.metrics["size_on_disk_bytes"] / 1e6, timed))
    return points


def _short_label(row: Row) -> str:
    """A quantized variant by its own name (bnb-nf4), other models by their row's label."""
    return row.variant or row.label


def _iqr_bars(speed: list[tuple[str, float, dict]]) -> list[list[float]]:
    below = [max(timed["speedup"] - timed.get("speedup_q1", timed["speedup"]), 0.0) for _, _, timed in speed]
    above = [max(timed.get("speedup_q3", timed["speedup"]) - timed["speedup"], 0.0) for _, _, timed in speed]
    return [below, above]


def _draw_points(axes, points: list[tuple[str, float, float]], title: str, ylabel: str) -> None:
    _, sizes, values = zip(*points)
    axes.plot(sizes, values, color="tab:gray", linewidth=1, zorder=1)
    axes.scatter(sizes, values, color="tab:blue", zorder=2)
    axes.set_xlabel("size on disk (MB)")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.margins(x=0.18, y=0.18)


def place_labels(axes, points: list[tuple[str, float, float]], renderer) -> list[Annotation]:
    """Label each point where its text overlaps no other label, no point and stays inside the axes: the nearest free
    spot around it, joined to it by a thin line when it had to move away; the least crowded spot when none is free."""
    centres = axes.transData.transform([(size, value) for _, size, value in points])
    markers = [Bbox.from_extents(x - MARKER_RADIUS_PX, y - MARKER_RADIUS_PX, x + MARKER_RADIUS_PX, y + MARKER_RADIUS_PX)
               for x, y in centres]
    frame = axes.get_window_extent(renderer)
    placed: list[Annotation] = []
    for label, size, value in points:
        taken = [text_box(text, renderer) for text in placed] + markers
        best, best_cost = None, None
        for distance in LABEL_DISTANCES:
            for dx, dy in LABEL_DIRECTIONS:
                text = _annotation(axes, label, (size, value), (dx * distance, dy * distance), distance > 6)
                box = text_box(text, renderer)
                cost = sum(_overlap(box, other) for other in taken) + _outside(box, frame)
                if best_cost is None or cost < best_cost:
                    if best is not None:
                        best.remove()
                    best, best_cost = text, cost
                else:
                    text.remove()
                if best_cost == 0:
                    break
            if best_cost == 0:
                break
        placed.append(best)
    return placed


def _annotation(axes, text: str, xy: tuple[float, float], offset: tuple[float, float], leader: bool) -> Annotation:
    dx, dy = offset
    return axes.annotate(
        text, xy, textcoords="offset points", xytext=offset, fontsize=9, annotation_clip=False,
        ha="left" if dx > 0 else "right" if dx < 0 else "center",
        va="bottom" if dy > 0 else "top" if dy < 0 else "center",
        arrowprops={"arrowstyle": "-", "color": "tab:gray", "linewidth": 0.6, "shrinkA": 1, "shrinkB": 4}
        if leader else None)


def _overlap(first: Bbox, second: Bbox) -> float:
    width = min(first.x1, second.x1) - max(first.x0, second.x0)
    height = min(first.y1, second.y1) - max(first.y0, second.y0)
    return width * height if width > 0 and height > 0 else 0.0


def _outside(box: Bbox, frame: Bbox) -> float:
    inside = _overlap(box, frame)
    return box.width * box.height - inside


def text_box(annotation: Annotation, renderer) -> Bbox:
    """Where an annotation's text lies on the canvas (its leader line left out)."""
    annotation.update_positions(renderer)
    return Text.get_window_extent(annotation, renderer)


def save_figure(figure: Figure, path: Path) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    figure.savefig(temporary, format="png")
    temporary.replace(path)


def plot_word_attributions(examples: list[dict], path: Path, width_inches: float = 10.0) -> Path | None:
    """Sentences with each word shaded by its attribution, one line per model (e.g. teacher above the final model).

    Each example: {"title": str, "words": [str], "models": [(label, values)]}; red words support the class named in
    the title, blue ones speak against it, and the shade is scaled per example over all its models."""
    if not examples:
        return None
    figure = Figure(figsize=(width_inches, 1), dpi=110)
    font = FontProperties(size=11)
    layout, height_px = _word_layout(examples, FigureCanvasAgg(figure).get_renderer(), font, width_inches * figure.dpi)
    figure.set_size_inches(width_inches, height_px / figure.dpi)
    colours = colormaps["coolwarm"]
    left = 0.02 * width_inches * figure.dpi
    for kind, text, x, y, *value in layout:
        position = ((left + x) / (width_inches * figure.dpi), 1 - y / height_px)
        if kind == "title":
            figure.text(*position, text, fontproperties=FontProperties(size=10, style="italic"), va="center")
        elif kind == "label":
            figure.text(*position, text, fontproperties=FontProperties(size=10, weight="bold"), va="center")
        else:
            figure.text(*position, text, fontproperties=font, va="center",
                        color="white" if abs(value[0]) > 0.6 else "black",
                        bbox={"facecolor": colours(0.5 + 0.5 * value[0]), "edgecolor": "none", "pad": 1.5})
    save_figure(figure, Path(path))
    return Path(path)


def _word_layout(examples: list[dict], renderer, font: FontProperties, width_px: float) -> tuple[list[tuple], float]:
    """Where each title, model label and word goes (pixels from the top left; words wrap under their model's label),
    with each word's attribution scaled to [-1, 1] per example; and the height all of it needs."""
    measure = lambda text: renderer.get_text_width_height_descent(text, font, ismath=False)[0]
    space = measure("n ") * 0.6
    line_px = 2.0 * font.get_size_in_points() * renderer.dpi / 72
    usable = 0.96 * width_px
    label_px = max(measure(label) for example in examples for label, _ in example["models"]) + 2 * space
    layout, y = [], 0.5 * line_px
    for example in examples:
        layout.append(("title", example["title"], 0.0, y))
        y += line_px
        scale = max((abs(v) for _, values in example["models"] for v in values), default=0.0) or 1.0
        for label, values in example["models"]:
            layout.append(("label", label, 0.0, y))
            x = label_px
            for word, value in zip(example["words"], values):
                width = measure(word)
                if x + width > usable and x > label_px:
                    x, y = label_px, y + line_px
                layout.append(("word", word, x, y, value / scale))
                x += width + space
            y += line_px
        y += 0.4 * line_px
    return layout, y + 0.2 * line_px
