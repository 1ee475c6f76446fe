"""recipes/quickstart-tiny.yaml over three training seeds: size and accuracy of its final model against the teacher.

The recipe's own run (`hfcompress run recipes/quickstart-tiny.yaml`, seed 42, runs/quickstart-tiny) gives the
fine-tuned teacher. Seeds 43 and 44 rerun every stage after it with that teacher (`teacher:` the finished
01-finetune folder, the recipe seed and so the data split unchanged): only the distillation seeds differ. The
compare and card stages are left out of those reruns; speed comes from one paired pass on a quiet machine:

    hfcompress compare runs/quickstart-tiny

    python benchmarks/quickstart_tiny.py [--seeds 43 44]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import yaml
from common import ROOT, save_results

import hfcompress
from hfcompress.recipe import parse_recipe

RUN_DIR = ROOT / "runs" / "quickstart-tiny"
RECIPE = ROOT / "recipes" / "quickstart-tiny.yaml"


def seeded_recipe(seed: int) -> dict:
    """The recipe after its teacher: the finished fine-tune as teacher, every distillation with `seed`."""
    recipe = yaml.safe_load(RECIPE.read_text())
    finetune = RUN_DIR / "01-finetune"
    stages = []
    for stage in recipe["stages"]:
        (name, options), = stage.items()
        if name in ("finetune", "compare", "card") or options.get("label") == "teacher":
            continue
        if name == "distill":
            options = {**options, "seed": seed, **({"teacher": "teacher"} if options.get("teacher") else {})}
        stages.append({name: options})
    return recipe | {"name": f"quickstart-tiny-seed{seed}", "teacher": str(finetune), "stages": stages,
                     "output_dir": str(ROOT / "runs" / f"quickstart-tiny-seed{seed}")}


def quantized_rows(results) -> dict:
    """Every quantized variant's metrics by variant name, and the final (carried-forward) variant's name."""
    rows = {row.variant: row.metrics for row in results.rows if row.variant}
    return {"final": results.final_row.variant, **rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[43, 44])
    args = parser.parse_args()

    shipped = hfcompress.run(hfcompress.load_recipe(RECIPE), output_dir=RUN_DIR)  # finished: nothing reruns
    teacher = shipped.row("teacher").metrics
    runs = {42: shipped} | {seed: hfcompress.run(parse_recipe(seeded_recipe(seed))) for seed in args.seeds}
    per_seed = {seed: quantized_rows(results) for seed, results in runs.items()}
    pruned = {seed: results.row("pruned").metrics for seed, results in runs.items()}

    lines = [f"teacher (01-finetune of the seed-42 run): test accuracy {100 * teacher['accuracy']:.2f}, "
             f"{teacher['size_on_disk_bytes'] / 1e6:.1f} MB, {teacher['num_parameters'] / 1e6:.2f} M parameters",
             f"{'seed':5s} {'model':24s} {'size (MB)':9s} {'accuracy':8s} {'of teacher':10s}"]
    for seed in runs:
        rows = {"pruned (fp32)": pruned[seed], **{name: metrics for name, metrics in per_seed[seed].items()
                                                   if name != "final"}}
        for name, metrics in rows.items():
            final = " <- final" if name == per_seed[seed]["final"] else ""
            lines.append(f"{seed:<5d} {name:24s} {metrics['size_on_disk_bytes'] / 1e6:<9.2f} "
                         f"{100 * metrics['accuracy']:<8.2f} {100 * metrics['accuracy'] / teacher['accuracy']:.2f}%"
                         f"{final}")
    finals = [per_seed[seed][per_seed[seed]["final"]] for seed in runs]
    mean = statistics.mean(metrics["accuracy"] for metrics in finals)
    sizes = [metrics["size_on_disk_bytes"] / 1e6 for metrics in finals]
    lines.append(f"final model, mean of {len(runs)} seeds: accuracy {100 * mean:.2f} = "
                 f"{100 * mean / teacher['accuracy']:.2f}% of the teacher (target >= 98.5%); size "
                 f"{min(sizes):.2f}-{max(sizes):.2f} MB = {teacher['size_on_disk_bytes'] / 1e6 / max(sizes):.1f}x "
                 "smaller than the teacher (target <= 6 MB)")
    report = "\n".join([f"command: python benchmarks/{Path(sys.argv[0]).name} {' '.join(sys.argv[1:])}".rstrip(),
                        *lines])
    print(report)
    save_results("quickstart_tiny", {"teacher": teacher, "pruned": pruned, "variants": per_seed,
                                     "mean_accuracy": mean}, report)


if __name__ == "__main__":
    main()
