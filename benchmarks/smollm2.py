"""Causal LM benchmark: SmolLM2-135M through recipes/smollm2-135m.yaml, plus the teacher itself in NF4 and int8.

    python benchmarks/smollm2.py            # runs (or resumes) runs/smollm2-135m, then quantizes its 00-teacher

Prints perplexity on the Hamlet test blocks, size and generation speed for: the teacher, the layer-pruned model
before healing, the healed model, its NF4 and int8 variants, and the teacher's own NF4 and int8 variants; then the
two targets: teacher NF4 within +5% of the teacher's perplexity, and healing recovering at least half of the
perplexity lost by dropping layers.

The teacher's Linear weights come from a Q4_1 GGUF file (16 evenly spaced levels per block of 32 inputs), so a
second 4-bit rounding is measured against an already 4-bit model. To show how much of NF4's loss the block size
explains, the teacher is also rounded through bitsandbytes' NF4 at block sizes 32 (the GGUF block) and 64
(what Linear4bit uses) and dequantized back to float (same rounding, computed in fp32).
"""

from __future__ import annotations

import torch
from common import ROOT, save_results

import hfcompress
from hfcompress.data import load_task_data
from hfcompress.sources import load_tokenizer
from hfcompress.recipe import load_recipe, parse_recipe
from hfcompress.report import format_table
from hfcompress.tasks import make_task

RUN_DIR = ROOT / "runs" / "smollm2-135m"
NF4_BLOCK_SIZES = (32, 64)


def nf4_rounding_perplexities(recipe, teacher_dir) -> dict[int, float]:
    """Test perplexity of the teacher with every body Linear weight rounded through NF4 at each block size."""
    import bitsandbytes.functional as bnb_functional

    data = load_task_data(recipe.task, load_tokenizer(str(teacher_dir)), recipe.seed)
    task = make_task(recipe.task)
    perplexities = {}
    for block_size in NF4_BLOCK_SIZES:
        model = hfcompress.from_pretrained(teacher_dir)
        with torch.no_grad():
            for name, module in model.named_modules():
                if isinstance(module, torch.nn.Linear) and name != "lm_head":
                    packed, state = bnb_functional.quantize_4bit(module.weight.data, blocksize=block_size,
                                                                 quant_type="nf4")
                    module.weight.data = bnb_functional.dequantize_4bit(packed, state).float()
            perplexities[block_size] = task.evaluate(model, data.dataloader("test", 4))["perplexity"]
    return perplexities


def main() -> None:
    recipe = load_recipe(ROOT / "recipes" / "smollm2-135m.yaml")
    compressed = hfcompress.run(recipe, output_dir=RUN_DIR)
    rows = {row.label: row.metrics for row in compressed.rows}

    teacher_recipe = recipe.to_dict() | {
        "name": "smollm2-135m-teacher-quantized",
        "teacher": str(RUN_DIR / "00-teacher"),
        "stages": [next(stage for stage in recipe.to_dict()["stages"] if name in stage) for name in ("quantize", "compare")],
    }
    quantized_teacher = hfcompress.run(parse_recipe(teacher_recipe), output_dir=ROOT / "runs" / "smollm2-teacher-quantized")
    teacher_rows = {f"teacher {row.variant}": row.metrics for row in quantized_teacher.rows if row.variant}

    teacher, pruned, healed = (rows[name]["perplexity"] for name in ("teacher", "layer-pruned", "healed"))
    nf4 = teacher_rows["teacher bnb-nf4"]["perplexity"]
    int4_g32 = teacher_rows["teacher quanto-int4-g32"]["perplexity"]
    rounded = nf4_rounding_perplexities(recipe, RUN_DIR / "00-teacher")
    recovered = (pruned - healed) / (pruned - teacher) if pruned > teacher else float("nan")
    lines = [format_table(compressed), "", format_table(quantized_teacher), "",
             f"teacher NF4 perplexity {nf4:.2f} vs teacher {teacher:.2f}: {100 * (nf4 / teacher - 1):+.1f}% "
             f"(target: within +5%)",
             "teacher rounded through NF4 by block size: " + ", ".join(
                 f"{size}: {value:.2f} ({100 * (value / teacher - 1):+.1f}%)" for size, value in rounded.items()),
             f"teacher quanto int4, groups of 32 (the GGUF Q4_1 block): perplexity {int4_g32:.2f} "
             f"({100 * (int4_g32 / teacher - 1):+.1f}%)",
             f"layer dropping: {teacher:.2f} -> {pruned:.2f}; healing -> {healed:.2f}: recovers "
             f"{100 * recovered:.0f}% of the loss (target: at least 50%)"]
    for label, metrics in {**rows, **teacher_rows}.items():
        if "generation" in metrics:
            lines.append(f"{label} greedy completion: {metrics['generation']!r}")
    report = "\n".join(lines)
    print(report)
    save_results("smollm2", {"rows": rows, "teacher_quantized": teacher_rows, "teacher_nf4_rounded": rounded}, report)


if __name__ == "__main__":
    main()
