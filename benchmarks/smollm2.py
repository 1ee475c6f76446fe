"""Causal LM benchmark: SmolLM2-135M through recipes/smollm2-135m.yaml, plus the teacher itself in NF4 and int8.

    python benchmarks/smollm2.py            # runs (or resumes) runs/smollm2-135m, then quantizes its 00-teacher

Prints perplexity on the Hamlet test blocks, size and generation speed for: the teacher, the layer-pruned model
before healing, the healed model, its NF4 and int8 variants, and the teacher's own NF4 and int8 variants; then the
two targets: teacher NF4 within +5% of the teacher's perplexity, and healing recovering at least half of the
perplexity lost by dropping layers.
"""

from __future__ import annotations

from common import ROOT, save_results

import hfcompress
from hfcompress.recipe import load_recipe, parse_recipe
from hfcompress.report import format_table

RUN_DIR = ROOT / "runs" / "smollm2-135m"


def main() -> None:
    recipe = load_recipe(ROOT / "recipes" / "smollm2-135m.yaml")
    compressed = hfcompress.run(recipe, output_dir=RUN_DIR)
    rows = {row["label"]: row["metrics"] for row in compressed["rows"]}

    teacher_recipe = recipe.to_dict() | {
        "name": "smollm2-135m-teacher-quantized",
        "teacher": str(RUN_DIR / "00-teacher"),
        "stages": [next(stage for stage in recipe.to_dict()["stages"] if "quantize" in stage)],
    }
    quantized_teacher = hfcompress.run(parse_recipe(teacher_recipe), output_dir=ROOT / "runs" / "smollm2-teacher-quantized")
    teacher_rows = {f"teacher {row['label'].split('/')[-1]}": row["metrics"] for row in quantized_teacher["rows"]}

    teacher, pruned, healed = (rows[name]["perplexity"] for name in ("teacher", "layer-pruned", "healed"))
    nf4 = teacher_rows["teacher bnb-nf4"]["perplexity"]
    recovered = (pruned - healed) / (pruned - teacher) if pruned > teacher else float("nan")
    lines = [format_table(compressed), "", format_table(quantized_teacher), "",
             f"teacher NF4 perplexity {nf4:.2f} vs teacher {teacher:.2f}: {100 * (nf4 / teacher - 1):+.1f}% "
             f"(target: within +5%)",
             f"layer dropping: {teacher:.2f} -> {pruned:.2f}; healing -> {healed:.2f}: recovers "
             f"{100 * recovered:.0f}% of the loss (target: at least 50%)"]
    for label, metrics in {**rows, **teacher_rows}.items():
        if "generation" in metrics:
            lines.append(f"{label} greedy completion: {metrics['generation']!r}")
    report = "\n".join(lines)
    print(report)
    save_results("smollm2", {"rows": rows, "teacher_quantized": teacher_rows}, report)


if __name__ == "__main__":
    main()
