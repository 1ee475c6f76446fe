"""The plan's numbers (`hfcompress validate`) against what real runs recorded (benchmarks/results/*.json).

Reads no weights: the plan builds each stage's model on the meta device from the configs, so this takes seconds
(plus ~20 s of CPU to parse the SmolLM2 GGUF header). Run: `.venv/bin/python benchmarks/plan_estimates.py`.
Writes benchmarks/results/plan_estimates.txt.
"""

from __future__ import annotations

import json
from pathlib import Path

from hfcompress.plan import plan_recipe
from hfcompress.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# The variants benchmarks/quantize_variants.py measured on the quickstart's 3-layer student.
STUDENT_VARIANTS = [{"backend": "half"}, {"backend": "bitsandbytes", "bits": 8},
                    {"backend": "bitsandbytes", "bits": 8, "quantize_embeddings": True},
                    {"backend": "bitsandbytes", "bits": 4},
                    {"backend": "bitsandbytes", "bits": 4, "quantize_embeddings": True},
                    {"backend": "quanto", "weights": "int8"}, {"backend": "quanto", "weights": "int4"}]


def compare(lines: list[str], what: str, recorded: int, planned: int) -> None:
    change = 100 * (planned / recorded - 1)
    lines.append(f"{what:34s} recorded {recorded:>12,}  planned {planned:>12,}  ({change:+.2f}%)")


def main() -> None:
    lines = ["plan vs recorded: parameters (exact expected) and size on disk of quantized variants (estimates)"]
    smollm2 = json.loads((RESULTS / "smollm2.json").read_text())["rows"]
    planned = {step.stage_id: step.shape for step in plan_recipe(load_recipe(ROOT / "recipes" / "smollm2-135m.yaml"))}
    for label, stage_id in (("teacher", "01-evaluate"), ("layer-pruned", "03-evaluate"), ("healed", "05-evaluate")):
        recorded = smollm2[label]["num_parameters"]
        compare(lines, f"smollm2 {label} parameters", recorded, planned[stage_id].num_parameters)
    for name, size in planned["06-quantize"].variant_sizes.items():
        compare(lines, f"smollm2 {name} bytes", smollm2[f"06-quantize/{name}"]["size_on_disk_bytes"], size)

    rows = json.loads((RESULTS / "quantize_variants.json").read_text())["rows"]
    measured = {row.label: row.metrics for row in rows}
    stages = [{"distill": {"student": {"num_layers": 3, "strategy": "every_other"}}},
              {"quantize": {"variants": STUDENT_VARIANTS}}]
    student = plan_recipe(load_recipe(ROOT / "recipes" / "quickstart.yaml", [f"stages={json.dumps(stages)}"]))[-1].shape
    compare(lines, "minilm 3L student parameters", measured["fp32"]["num_parameters"], student.num_parameters)
    for name, size in student.variant_sizes.items():
        compare(lines, f"minilm 3L {name} bytes", measured[f"02-quantize/{name}"]["size_on_disk_bytes"], size)
    text = "\n".join(lines)
    print(text)
    (RESULTS / "plan_estimates.txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
