"""What the benchmark scripts share: the quickstart's task on another model, and where results go."""

from __future__ import annotations

from pathlib import Path

import yaml

from hfcompress.fileio import write_json

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def quickstart_recipe(teacher: Path, run_dir: Path, stages: list, seed: int = 42, name: str = "bench") -> dict:
    """A recipe with the quickstart's task and data (same split), another teacher and other stages."""
    quickstart = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())
    return {"name": name, "seed": seed, "teacher": str(teacher), "task": quickstart["task"],
            "output_dir": str(run_dir), "stages": stages}


def paired_speed_lines(models: dict, task, sequence_length: int, reference: str | None = None) -> tuple[dict, list[str]]:
    """Time `models` together, round-robin in this process (hfcompress.timing), and describe the result per model."""
    from hfcompress.comparison import compare_models

    comparison = compare_models(models, task, sequence_length=sequence_length, reference=reference)
    settings = comparison["settings"]
    lines = [f"paired timing (all models in one process, round-robin: {settings['rounds']} rounds x "
             f"{settings['block_calls']} batch-1 calls, {sequence_length} tokens, {settings['threads']} threads; "
             f"median of block medians, speed-up = median of per-round ratios to {settings['reference']} with its IQR):"]
    for name, timed in comparison["models"].items():
        lines.append(f"  {name:28s} {timed['latency_ms']:6.1f} ms  {timed['speedup']:5.2f}x "
                     f"({timed['speedup_q1']:.2f}-{timed['speedup_q3']:.2f})  batch {settings['throughput_batch_size']}:"
                     f" {timed['throughput_per_s']:7.1f} {settings['throughput_unit']}")
    return comparison, lines


def save_results(name: str, results: dict, report: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    write_json(path, {**results, "report": report})
    (RESULTS / f"{name}.txt").write_text(report + "\n")
    return path
