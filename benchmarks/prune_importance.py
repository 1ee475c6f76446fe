"""Pruning benchmark: measured importance vs the same budget chosen at random, before and after recovery.

On a (distilled) student from the quickstart: prune a third of the attention heads and a quarter of the FFN
neurons, evaluate right away, recover with a short distillation from the unpruned student, evaluate again.
The random arm runs over several seeds (random choice is the noisy one).

    python benchmarks/prune_importance.py --student runs/quickstart/03-distill [--recovery-steps 120]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from common import ROOT, paired_speed_lines, quickstart_recipe, save_results

import hfcompress
from hfcompress.recipe import parse_recipe
from hfcompress.tasks import make_task

FAST_EVALUATE = {"timing_iterations": 30}


def prune_arm(args, selection: str, seed: int) -> dict:
    prune = {"heads": {"sparsity": args.heads}, "ffn": {"sparsity": args.ffn}, "selection": selection, "seed": seed}
    recovery = {"teacher": "teacher", "max_steps": args.recovery_steps, "learning_rate": 5e-5, "seed": seed}
    stages = [{"prune": prune}, {"evaluate": {**FAST_EVALUATE, "label": "pruned"}},
              {"distill": recovery}, {"evaluate": {**FAST_EVALUATE, "label": "recovered"}}]
    run_dir = args.work_dir / f"{selection}-{seed}"
    # The recipe seed stays the quickstart's: it fixes the split, so the test reviews are the ones the student
    # never trained on. Only the random choice and the recovery's training order vary with `seed`.
    results = hfcompress.run(parse_recipe(quickstart_recipe(args.student, run_dir, stages, name="prune-bench")))
    pruned, recovered = (row.metrics for row in results.rows)
    return {"pruned": pruned["accuracy"], "recovered": recovered["accuracy"],
            "parameters": recovered["num_parameters"], "model_dir": str(run_dir / results.final_model_dir)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", type=Path, default=ROOT / "runs" / "quickstart" / "03-distill")
    parser.add_argument("--heads", type=float, default=0.33)
    parser.add_argument("--ffn", type=float, default=0.25)
    parser.add_argument("--recovery-steps", type=int, default=120)
    parser.add_argument("--random-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "prune-bench")
    args = parser.parse_args()

    baseline_recipe = parse_recipe(quickstart_recipe(
        args.student, args.work_dir / "unpruned", [{"evaluate": {**FAST_EVALUATE, "label": "unpruned"}}]))
    baseline = hfcompress.run(baseline_recipe)
    before = baseline.rows[0].metrics
    arms = {"importance": [prune_arm(args, "importance", 42)],
            "random": [prune_arm(args, "random", seed) for seed in args.random_seeds]}

    lines = [f"unpruned student: accuracy {100 * before['accuracy']:.2f}, {before['num_parameters'] / 1e6:.2f} M "
             f"parameters; budget: {args.heads:.0%} of heads, {args.ffn:.0%} of FFN neurons; recovery "
             f"{args.recovery_steps} distillation steps",
             f"{'selection':12s} {'runs':4s} {'acc. pruned':14s} {'acc. recovered':15s} {'vs unpruned':12s} "
             f"{'params (M)':10s}"]
    for name, runs in arms.items():
        mean = {key: statistics.mean(run[key] for run in runs) for key in ("pruned", "recovered", "parameters")}
        lines.append(f"{name:12s} {len(runs):<4d} {100 * mean['pruned']:<14.2f} {100 * mean['recovered']:<15.2f} "
                     f"{100 * (mean['recovered'] - before['accuracy']):+.2f} pts   {mean['parameters'] / 1e6:<10.2f}")
    # Both selections keep the same number of heads and neurons: one pruned model of each stands for its arm.
    models = {"unpruned": hfcompress.from_pretrained(args.student),
              **{f"{name} (recovered)": hfcompress.from_pretrained(runs[0]["model_dir"]) for name, runs in arms.items()}}
    task = make_task(baseline_recipe.task)
    comparison, speed_lines = paired_speed_lines(models, task, baseline_recipe.task.max_length)
    report = "\n".join(lines + speed_lines)
    print(report)
    save_results("prune_importance", {"unpruned": before, "arms": arms, "speed": comparison,
                                      "settings": vars(args)}, report)


if __name__ == "__main__":
    main()
