"""The budget search on the quickstart, against the shipped hand-written recipe.

    python benchmarks/search.py [--max-size-mb 9.1] [--min-quality 0.99] [--min-speedup 6] [--budget-minutes 45]
                                [--quickstart runs/quickstart]   # a finished `make demo` run: the hand-written point

1. `hfcompress search recipes/quickstart.yaml` with the budgets above (the recipe's finetune stage makes the teacher;
   the default search space): what it tried and chose, on the validation split (search.json, pareto.png).
2. The hand-written recipe's final checkpoint scored on the same validation split, so both sit on one plot.
3. Teacher, the chosen model and the hand-written final model timed together, round-robin in this process.
4. Against the issue's target: at most 9.1 MB, at least 99% of the teacher's test accuracy (mean of the chosen
   candidate's seeds), at least 6x faster than the teacher at batch 1.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import ROOT, paired_speed_lines, save_results

from hfcompress.card import load_run
from hfcompress.data import load_task_data
from hfcompress.errors import HfCompressError
from hfcompress.modeling import load_model
from hfcompress.sources import load_tokenizer
from hfcompress.recipe import load_recipe
from hfcompress.run_dir import RunDir
from hfcompress.search import PLOT_FILE, format_search, load_search, plot_front, search
from hfcompress.tasks import make_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-size-mb", type=float, default=9.1)
    parser.add_argument("--min-quality", type=float, default=0.99)
    parser.add_argument("--min-speedup", type=float, default=6.0, help="0: no speed budget in the search")
    parser.add_argument("--budget-minutes", type=float, default=45)
    parser.add_argument("--quickstart", type=Path, default=ROOT / "runs" / "quickstart")
    parser.add_argument("--output-dir", type=Path, default=ROOT / "runs" / "search-bench")
    args = parser.parse_args()

    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml")
    outcome = "every budget met"
    try:
        state = search(recipe, args.output_dir, max_size_mb=args.max_size_mb, min_quality=args.min_quality,
                       min_speedup=args.min_speedup or None, budget_minutes=args.budget_minutes)
    except HfCompressError as error:
        state, outcome = load_search(args.output_dir), str(error)
    task = make_task(recipe.task)
    metric = state["teacher"]["metric"]

    quickstart = RunDir(args.quickstart).load_results()
    hand_dir = args.quickstart / quickstart.final_model_dir
    hand_model = load_model(str(hand_dir), task.model_class, "hand-written")
    data = load_task_data(recipe.task, load_tokenizer(str(hand_dir)), recipe.seed)
    hand_validation = task.evaluate(hand_model, data.dataloader("validation", 64))[metric]
    hand_row = load_run(args.quickstart).final_row
    hand = {"size_mb": hand_row.metrics["size_on_disk_bytes"] / 1e6, "validation": hand_validation,
            "test": hand_row.metrics[metric]}
    plot_front(state["points"], state, args.output_dir / PLOT_FILE,
               extra={"hand-written quickstart": (hand["size_mb"], hand_validation / state["teacher"]["validation"])})

    models = {"teacher": load_model(state["teacher"]["model"], task.model_class), "hand-written quickstart": hand_model}
    chosen = state.get("chosen")
    if chosen:
        models[f"search: {chosen['name']}"] = load_model(str(Path(chosen["run_dir"]) / chosen["model_dir"]),
                                                         task.model_class, chosen["name"])
    comparison, speed_lines = paired_speed_lines(models, task, recipe.task.max_length, reference="teacher")

    teacher = state["teacher"]
    lines = [format_search(state), f"outcome: {outcome}", "",
             f"hand-written recipes/quickstart.yaml ({args.quickstart}, final {quickstart['final_model_dir']}): "
             f"{hand['size_mb']:.1f} MB, validation {metric} {hand_validation:.4f} "
             f"({100 * hand_validation / teacher['validation']:.1f}% of the teacher), test {hand['test']:.4f} "
             f"({100 * hand['test'] / teacher['test']:.1f}%)", "", *speed_lines, ""]
    if chosen and "test_mean" in chosen:
        speedup, target_speedup = comparison["models"][f"search: {chosen['name']}"]["speedup"], args.min_speedup
        checks = {f"size {chosen['size_mb']:.2f} MB <= {args.max_size_mb}": chosen["size_mb"] <= args.max_size_mb,
                  f"test {metric} {chosen['test_mean']:.4f} (mean of {len(chosen['test_by_seed'])} seeds) >= "
                  f"{args.min_quality:.0%} of the teacher's {teacher['test']:.4f}":
                      chosen["test_mean"] >= args.min_quality * teacher["test"],
                  f"{speedup:.2f}x faster than the teacher at batch 1 (paired) >= {target_speedup}x":
                      speedup >= target_speedup}
        lines.append("against the target:")
        lines += [f"  {'meets ' if ok else 'misses'}  {check}" for check, ok in checks.items()]
    lines.append(f"search directory: {args.output_dir} (search.json, {PLOT_FILE}, recipe.yaml); CPU, "
                 f"{comparison['settings']['threads']} threads")
    report = "\n".join(lines)
    save_results("search", {"search": state, "hand_written": hand, "comparison": comparison}, report)
    print(report)


if __name__ == "__main__":
    main()
