"""What the benchmark scripts share: the quickstart's task on another model, and where results go."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def quickstart_recipe(teacher: Path, run_dir: Path, stages: list, seed: int = 42, name: str = "bench") -> dict:
    """A recipe with the quickstart's task and data (same split), another teacher and other stages."""
    quickstart = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())
    return {"name": name, "seed": seed, "teacher": str(teacher), "task": quickstart["task"],
            "output_dir": str(run_dir), "stages": stages}


def save_results(name: str, results: dict, report: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({**results, "report": report}, indent=2, default=str))
    (RESULTS / f"{name}.txt").write_text(report + "\n")
    return path
