"""Hidden-size pruning on the quickstart student: which channel importance works, and what the norm correction buys.

The 3-layer student of recipes/quickstart-tiny.yaml (its 03-distill) has its hidden size cut 384 -> 256 (nothing
else, so the arms differ only in the hidden channels and the norms) with the channels chosen by
- activation: Minitron's mean |LayerNorm output| on training batches,
- gradient:   |d loss / d gate| of a gate per channel on every LayerNorm output,
- random:     the same budget chosen blindly,
each with the LayerNorms rescaled (the measured change of their statistics folded into weight and bias) or kept as
they are. Every arm is scored on the VALIDATION split right after pruning and after a short recovery distillation
from the fine-tuned teacher (the choice is made on validation; the recipe's test numbers come from its own run).

    python benchmarks/width_importance.py [--run-dir runs/quickstart-tiny] [--recovery-steps 120]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common import ROOT, quickstart_recipe, save_results

import hfcompress
from hfcompress.recipe import parse_recipe

VALIDATION = {"split": "validation", "measure_speed": False}
ARMS = [("activation", "rescale"), ("activation", "keep"), ("gradient", "rescale"), ("gradient", "keep"),
        ("random", "rescale"), ("random", "keep")]


def prune_options(method: str, norms: str) -> dict:
    selection = "random" if method == "random" else "importance"
    hidden = {"size": 256, "norms": norms, **({"method": method} if selection == "importance" else {})}
    return {"hidden": hidden, "selection": selection}


def run_arm(args, method: str, norms: str) -> dict:
    stages = [{"prune": prune_options(method, norms)}, {"evaluate": {**VALIDATION, "label": "pruned"}},
              {"distill": {"teacher": str(args.run_dir / "01-finetune"), "loss": {"weights": {"kl": 0.5, "ce": 0.5},
                                                                                   "temperature": 2.0},
                           "learning_rate": 1e-4, "max_steps": args.recovery_steps, "cache_teacher_outputs": False}},
              {"evaluate": {**VALIDATION, "label": "recovered"}}]
    recipe = quickstart_recipe(args.run_dir / "03-distill", args.work_dir / f"{method}-{norms}", stages,
                               name="width-importance")
    results = hfcompress.run(parse_recipe(recipe))
    pruned, recovered = (row.metrics for row in results.rows)
    return {"method": method, "norms": norms, "pruned": pruned["accuracy"], "recovered": recovered["accuracy"],
            "parameters": recovered["num_parameters"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "quickstart-tiny")
    parser.add_argument("--recovery-steps", type=int, default=120)
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "width-importance")
    args = parser.parse_args()

    unpruned = hfcompress.run(parse_recipe(quickstart_recipe(
        args.run_dir / "03-distill", args.work_dir / "unpruned", [{"evaluate": {**VALIDATION, "label": "student"}}],
        name="width-importance"))).rows[0].metrics
    arms = [run_arm(args, method, norms) for method, norms in ARMS]
    lines = [f"3-layer student (validation): accuracy {100 * unpruned['accuracy']:.2f}, "
             f"{unpruned['num_parameters'] / 1e6:.2f} M parameters; hidden size 384 -> 256 (nothing else pruned); "
             f"recovery {args.recovery_steps} distillation steps from the fine-tuned teacher (one seed per arm)",
             f"{'hidden channels':16s} {'LayerNorms':10s} {'acc. pruned':12s} {'acc. recovered':14s} {'params (M)':10s}"]
    for arm in arms:
        lines.append(f"{arm['method']:16s} {arm['norms']:10s} {100 * arm['pruned']:<12.2f} "
                     f"{100 * arm['recovered']:<14.2f} {arm['parameters'] / 1e6:<10.2f}")
    report = "\n".join([f"command: python benchmarks/{Path(sys.argv[0]).name} {' '.join(sys.argv[1:])}".rstrip(),
                        *lines])
    print(report)
    save_results("width_importance", {"unpruned": unpruned, "arms": arms, "settings": {
        key: str(value) for key, value in vars(args).items()}}, report)


if __name__ == "__main__":
    main()
