"""`hfcompress run | search | validate | report | compare | card | push | export` (and `python -m hfcompress`,
`accelerate launch -m hfcompress`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .card import write_model_card
from .comparison import CompareOptions, run_comparison
from .errors import HfCompressError
from .hub import push_run
from .pipeline import check_sources, run
from .plan import format_plan, plan_recipe
from .quantization import export_checkpoint
from .recipe import load_recipe
from .report import format_fidelity_table, format_table
from .run_dir import RunDir
from .search import search
from .tasks import make_task
from .verbosity import library_output

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hfcompress", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run (or resume) a recipe")
    run.add_argument("recipe")
    run.add_argument("--output-dir", help="run directory (default: the recipe's output_dir, or runs/<name>)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                     help="override a recipe value, e.g. --set stages.0.finetune.max_steps=20")

    validate = commands.add_parser("validate", help="check a recipe and its sources (teacher, data) without "
                                                    "training or writing anything")
    validate.add_argument("recipe")
    validate.add_argument("--recipe-only", action="store_true", help="check the recipe alone, not the teacher and data")
    validate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")

    search = commands.add_parser("search", help="search distillation, pruning, vocabulary and quantization for "
                                                "the model that meets a budget (the recipe gives task and teacher)")
    search.add_argument("recipe")
    search.add_argument("--max-size-mb", type=float, help="size on disk of the final artefact")
    search.add_argument("--min-quality", type=float, help="share of the teacher's quality kept, e.g. 0.99")
    search.add_argument("--max-latency-ms", type=float, help="batch-1 latency on this machine (timed paired)")
    search.add_argument("--min-speedup", type=float, help="times faster than the teacher at batch 1 (same pass)")
    search.add_argument("--budget-minutes", type=float, help="no new candidate run starts after this (default 45)")
    search.add_argument("--output-dir", help="search directory (default: the recipe's output_dir, or runs/<name>)")
    search.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")

    report = commands.add_parser("report", help="print the stage-by-stage table of a finished run")
    report.add_argument("run_dir")

    compare = commands.add_parser("compare", help="time every model a run evaluated together, round-robin")
    compare.add_argument("run_dir")
    defaults = CompareOptions()
    compare.add_argument("--reference", help="row label the ratios are against (default: the first row)")
    compare.add_argument("--rounds", type=int, default=defaults.rounds)
    compare.add_argument("--block-calls", type=int, default=defaults.block_calls)
    compare.add_argument("--throughput-rounds", type=int, default=defaults.throughput_rounds)

    card = commands.add_parser("card", help="write the model card of a run (final checkpoint + model_cards/)")
    card.add_argument("run_dir")
    card.add_argument("--repo-id", help="the repo the card's loading code names")
    card.add_argument("--model-cards-dir", default="model_cards")

    push = commands.add_parser("push", help="publish a run's final checkpoint and card to the Hub")
    push.add_argument("run_dir")
    push.add_argument("--repo-id", required=True, help="NAMESPACE/NAME")
    push.add_argument("--private", action="store_true")
    push.add_argument("--revision", help="branch to push to (created if missing)")
    push.add_argument("--create-pr", action="store_true")
    push.add_argument("--commit-message")
    push.add_argument("--dry-run", action="store_true", help="list what would be uploaded and where; upload nothing")

    export = commands.add_parser("export", help="export a checkpoint (or a run's final one) to ONNX for ONNX Runtime")
    export.add_argument("model", metavar="CHECKPOINT_OR_RUN_DIR")
    export.add_argument("--format", choices=["onnx"], default="onnx")
    export.add_argument("--quantize", choices=["none", "int8", "int4"], default="none",
                        help="int8: dynamic int8 (per-channel weights, activations quantized at run time); int4: "
                             "4-bit weight-only MatMulNBits. Static int8 needs calibration data: use a recipe's "
                             "quantize stage ({backend: onnx, quantization: int8-static})")
    export.add_argument("--no-optimize", action="store_true", help="keep the graph unfused")
    export.add_argument("--output-dir", required=True)
    for command in commands.choices.values():
        command.add_argument("--verbose", action="store_true",
                             help="also show the libraries' progress bars (datasets, transformers) and load reports")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with library_output(args.verbose):
            return COMMANDS[args.command](args)
    except HfCompressError as error:
        for line in str(error).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted: finished stages are kept; run the same command again to resume", file=sys.stderr)
        return 130


def _run(args) -> int:
    run(load_recipe(args.recipe, args.overrides), output_dir=args.output_dir)
    return 0


def _search(args) -> int:
    search(load_recipe(args.recipe, args.overrides), output_dir=args.output_dir, max_size_mb=args.max_size_mb,
           min_quality=args.min_quality, max_latency_ms=args.max_latency_ms, min_speedup=args.min_speedup,
           budget_minutes=args.budget_minutes)
    return 0


def _validate(args) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    if args.recipe_only:
        print(f"{args.recipe}: ok ({len(recipe.stages)} stages: {', '.join(recipe.stage_ids())}; sources not checked)")
        return 0
    print("\n".join(check_sources(recipe)))
    planned = plan_recipe(recipe)  # every stage against the model's shape: errors name the recipe line
    print(f"{args.recipe}: ok ({len(recipe.stages)} stages: {', '.join(recipe.stage_ids())})")
    print(format_plan(planned))
    return 0


def _report(args) -> int:
    results = RunDir(args.run_dir).load_results()
    print(format_table(results))
    fidelity = format_fidelity_table(results)
    if fidelity:
        print(fidelity)
    return 0


def _compare(args) -> int:
    """Time every model a finished run evaluated; the comparison is added to its results.json."""
    run_dir = RunDir(args.run_dir)
    results = run_dir.load_results()
    recipe = load_recipe(run_dir.recipe_file)
    options = CompareOptions(reference=args.reference, rounds=args.rounds, block_calls=args.block_calls,
                             throughput_rounds=args.throughput_rounds)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results.comparison = run_comparison(run_dir.path, results.rows, make_task(recipe.task), options,
                                        recipe.task.max_length, device)
    run_dir.save_results(results)
    print(format_table(results))
    return 0


def _card(args) -> int:
    print(write_model_card(Path(args.run_dir), Path(args.model_cards_dir), repo_id=args.repo_id))
    return 0


def _push(args) -> int:
    result = push_run(Path(args.run_dir), args.repo_id, private=args.private, revision=args.revision,
                      create_pr=args.create_pr, commit_message=args.commit_message, dry_run=args.dry_run)
    print(result.summary())
    return 0


def _export(args) -> int:
    variant = {"backend": "onnx", "quantization": {"int8": "int8-dynamic"}.get(args.quantize, args.quantize),
               "optimize": not args.no_optimize}
    print(export_checkpoint(args.model, args.output_dir, variant))
    return 0


COMMANDS = {"run": _run, "search": _search, "validate": _validate, "report": _report, "compare": _compare, "card": _card,
            "push": _push, "export": _export}

if __name__ == "__main__":
    sys.exit(main())
