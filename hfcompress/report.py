"""The stage-by-stage table: every evaluated model side by side, with ratios to the first (reference) row."""

from __future__ import annotations

from pathlib import Path

from .errors import HfCompressError
from .fileio import read_json

QUALITY_METRICS = ("accuracy", "f1", "perplexity")


def load_results(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise HfCompressError(f"{run_dir}: no results.json (is this a run directory written by `hfcompress run`?)")
    return read_json(path)


def table_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    rows = results.get("rows", [])
    if not rows:
        return [], []
    quality = [name for name in QUALITY_METRICS if any(name in row["metrics"] for row in rows)]
    reference = rows[0]["metrics"]
    comparison = latest_comparison(results)
    speed_header, speed_cells = (_paired_header, _paired_cells) if comparison else (_per_stage_header, _per_stage_cells)
    header = ["model", "params (M)", "size (MB)", "memory (MB)", *quality, *speed_header(results),
              "smaller x", *(f"{name} vs ref" for name in quality[:1])]
    body = []
    for row in rows:
        m = row["metrics"]
        cells = [
            row["label"],
            _number(m.get("num_parameters"), 1e6, 2),
            _number(m.get("size_on_disk_bytes"), 1e6, 1),
            _number(m.get("memory_footprint_bytes"), 1e6, 1),
            *(_number(m.get(name), 1, 4 if name != "perplexity" else 2) for name in quality),
            *speed_cells(row, reference, comparison),
            _ratio(reference.get("size_on_disk_bytes"), m.get("size_on_disk_bytes")),
            *(_ratio(m.get(name), reference.get(name), percent=True) for name in quality[:1]),
        ]
        body.append(cells)
    return header, body


def _per_stage_header(results: dict) -> list[str]:
    unit = results["rows"][0]["metrics"].get("throughput_unit", "/s")
    return ["p50 ms", "p95 ms", f"thru ({unit})", "faster x"]


def _per_stage_cells(row: dict, reference: dict, comparison) -> list[str]:
    m = row["metrics"]
    return [_number(m.get("latency_ms_p50"), 1, 1), _number(m.get("latency_ms_p95"), 1, 1),
            _number(m.get("throughput_per_s"), 1, 1), _ratio(reference.get("latency_ms_p50"), m.get("latency_ms_p50"))]


def _paired_header(results: dict) -> list[str]:
    unit = latest_comparison(results)["settings"].get("throughput_unit", "/s")
    return ["ms (IQR)", "faster x (IQR)", f"thru ({unit})", "thru x"]


def _paired_cells(row: dict, reference: dict, comparison: dict) -> list[str]:
    timed = paired_timing(comparison, row["label"])
    if timed is None:
        return ["-"] * 4
    return [f"{timed['latency_ms']:.1f} ({timed['latency_ms_q1']:.1f}-{timed['latency_ms_q3']:.1f})",
            f"{timed['speedup']:.2f} ({timed['speedup_q1']:.2f}-{timed['speedup_q3']:.2f})",
            f"{timed['throughput_per_s']:.1f}", f"{timed['throughput_speedup']:.2f}"]


def latest_comparison(results: dict) -> dict | None:
    """The run's newest comparison pass: one `hfcompress compare` added after the run (a rerun drops it), else the
    one of its last `compare` stage."""
    if results.get("comparison"):
        return results["comparison"]
    for stage in reversed(results.get("stages", [])):
        if stage.get("stage") == "compare":
            return stage.get("metrics", {}).get("comparison")
    return None


def paired_timing(comparison: dict | None, label: str) -> dict | None:
    """The comparison pass's timing of a row (rows that evaluated the same checkpoint share one)."""
    if not comparison:
        return None
    models = comparison["models"]
    return models.get(label) or models.get(comparison.get("aliases", {}).get(label))


def format_table(results: dict) -> str:
    header, body = table_rows(results)
    if not header:
        return f"{results.get('name', 'run')}: no evaluated models yet (add an `evaluate` stage)"
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *body)]
    lines = [
        "  ".join(str(cell).ljust(width) for cell, width in zip(header, widths)),
        "  ".join("-" * width for width in widths),
        *("  ".join(str(cell).ljust(width) for cell, width in zip(cells, widths)) for cells in body),
    ]
    return "\n".join([f"{results.get('name', 'run')}: {len(body)} evaluated model(s)", *lines, timing_note(results)])


def timing_note(results: dict) -> str:
    """How the speed columns were measured."""
    comparison = latest_comparison(results)
    if comparison:
        s = comparison["settings"]
        return (f"ratios are against {s['reference']}; speed: all models timed in one pass, round-robin: {s['rounds']} "
                f"rounds of {s['block_calls']} batch-1 calls per model ({s['warmup_calls']} warm-up calls before each "
                f"block), {s['throughput_rounds']} rounds of {s['throughput_block_calls']} batch-"
                f"{s['throughput_batch_size']} calls, {s['sequence_length']} tokens per input, on "
                f"{', '.join(s['devices'])} with {s['threads']} threads; ms = median of block medians, "
                f"IQR = interquartile range over rounds (of the per-round ratio, for x)")
    timing = results["rows"][0]["metrics"]
    return (f"ratios are against the first row; latency: batch 1, throughput: batch "
            f"{timing.get('throughput_batch_size', '?')}, {timing.get('timing_sequence_length', '?')} tokens per "
            f"input, on {timing.get('timing_device', '?')} with {timing.get('timing_threads', '?')} threads; each "
            f"model timed in its own stage (ratios of numbers taken minutes apart: add a `compare` stage)")


def _number(value, scale: float, digits: int) -> str:
    return "-" if value is None else f"{value / scale:.{digits}f}"


def _ratio(numerator, denominator, percent: bool = False) -> str:
    if not numerator or not denominator:
        return "-"
    return f"{100 * numerator / denominator:.1f}%" if percent else f"{numerator / denominator:.2f}"
