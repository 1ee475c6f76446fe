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
    unit = reference.get("throughput_unit", "/s")
    header = ["model", "params (M)", "size (MB)", "memory (MB)", *quality, "p50 ms", "p95 ms", f"thru ({unit})",
              "smaller x", "faster x", *(f"{name} vs ref" for name in quality[:1])]
    body = []
    for row in rows:
        m = row["metrics"]
        cells = [
            row["label"],
            _number(m.get("num_parameters"), 1e6, 2),
            _number(m.get("size_on_disk_bytes"), 1e6, 1),
            _number(m.get("memory_footprint_bytes"), 1e6, 1),
            *(_number(m.get(name), 1, 4 if name != "perplexity" else 2) for name in quality),
            _number(m.get("latency_ms_p50"), 1, 1),
            _number(m.get("latency_ms_p95"), 1, 1),
            _number(m.get("throughput_per_s"), 1, 1),
            _ratio(reference.get("size_on_disk_bytes"), m.get("size_on_disk_bytes")),
            _ratio(reference.get("latency_ms_p50"), m.get("latency_ms_p50")),
            *(_ratio(m.get(name), reference.get(name), percent=True) for name in quality[:1]),
        ]
        body.append(cells)
    return header, body


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
    timing = results["rows"][0]["metrics"]
    note = (f"ratios are against the first row; latency: batch 1, throughput: batch "
            f"{timing.get('throughput_batch_size', '?')}, {timing.get('timing_sequence_length', '?')} tokens per "
            f"input, on {timing.get('timing_device', '?')} with {timing.get('timing_threads', '?')} threads")
    return "\n".join([f"{results.get('name', 'run')}: {len(body)} evaluated model(s)", *lines, note])


def _number(value, scale: float, digits: int) -> str:
    return "-" if value is None else f"{value / scale:.{digits}f}"


def _ratio(numerator, denominator, percent: bool = False) -> str:
    if not numerator or not denominator:
        return "-"
    return f"{100 * numerator / denominator:.1f}%" if percent else f"{numerator / denominator:.2f}"
