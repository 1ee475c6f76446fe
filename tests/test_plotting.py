"""The card's picture: every label readable where points crowd, and speed beside quality when the run was timed."""

from itertools import combinations

from matplotlib.collections import PathCollection

from hfcompress.plotting import MARKER_RADIUS_PX, plot_size_vs_quality, size_figure, text_box
from hfcompress.run_dir import Row

# The quickstart's crowded corner: three quantized variants within 4 MB and 0.006 accuracy of each other.
MODELS = [("teacher", 90.9, 0.8231, 1.00), ("student-3L", 69.6, 0.8051, 1.85), ("pruned", 32.4, 0.8174, 2.24),
          ("08-quantize/bnb-nf4", 18.6, 0.8117, 1.46), ("08-quantize/quanto-int8", 20.4, 0.8174, 1.56),
          ("08-quantize/bf16", 16.2, 0.8165, 0.77), ("08-quantize/onnx-int8-unfused", 8.6, 0.8098, 6.00)]


def rows(models=MODELS) -> list[Row]:
    return [Row(label=label, stage_id=label.split("/")[0], variant=label.split("/")[1] if "/" in label else None,
                metrics={"size_on_disk_bytes": size * 1e6, "accuracy": accuracy})
            for label, size, accuracy, _ in models]


def comparison(models=MODELS) -> dict:
    return {"settings": {"reference": "teacher"},
            "models": {label: {"speedup": speedup, "speedup_q1": speedup * 0.9, "speedup_q3": speedup * 1.1}
                       for label, _, _, speedup in models}}


def boxes(figure, axes):
    renderer = figure.canvas.get_renderer()
    return {text.get_text(): text_box(text, renderer) for text in axes.texts}


def overlap(first, second) -> bool:
    return min(first.x1, second.x1) > max(first.x0, second.x0) and min(first.y1, second.y1) > max(first.y0, second.y0)


def test_no_label_covers_another_label_or_a_point_where_points_crowd():
    figure = size_figure(rows(), "accuracy", comparison())
    renderer = figure.canvas.get_renderer()
    for axes in figure.axes:
        labels = boxes(figure, axes)
        assert set(labels) == {label.rsplit("/", 1)[-1] for label, *_ in MODELS}
        assert not [(a, b) for (a, box_a), (b, box_b) in combinations(labels.items(), 2) if overlap(box_a, box_b)]
        points = axes.transData.transform(next(c for c in axes.collections if isinstance(c, PathCollection))
                                          .get_offsets())
        for name, box in labels.items():
            assert not any(box.x0 < x + MARKER_RADIUS_PX and x - MARKER_RADIUS_PX < box.x1 and
                           box.y0 < y + MARKER_RADIUS_PX and y - MARKER_RADIUS_PX < box.y1 for x, y in points), name
            assert axes.get_window_extent(renderer).contains(box.x0, box.y0), name


def test_speed_panel_plots_the_paired_speed_up_of_every_timed_model():
    timed = MODELS[:3] + MODELS[4:]  # bnb-nf4 was not timed (a failed load in the comparison pass, say)
    figure = size_figure(rows(), "accuracy", comparison(timed))
    quality_axes, speed_axes = figure.axes
    speed_points = next(c for c in speed_axes.collections if isinstance(c, PathCollection)).get_offsets()
    assert [tuple(point) for point in speed_points] == [(size, speedup) for _, size, _, speedup in timed]
    assert len(next(c for c in quality_axes.collections if isinstance(c, PathCollection)).get_offsets()) == 7
    assert "speed-up vs teacher" in speed_axes.get_ylabel()


def test_without_a_comparison_pass_the_picture_is_quality_alone(tmp_path):
    assert len(size_figure(rows(), "accuracy").axes) == 1
    assert plot_size_vs_quality(rows(), "perplexity", tmp_path / "none.png") is None
    path = plot_size_vs_quality(rows(), "accuracy", tmp_path / "plot.png", comparison())
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
