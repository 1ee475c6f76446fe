"""Calibrated 4-bit (GPTQ) and the formats LLM servers read, on the healed SmolLM2-135M.

    python benchmarks/smollm2_gptq.py     # needs runs/smollm2-135m/04-distill (hfcompress run recipes/smollm2-135m.yaml)
    python benchmarks/smollm2_gptq.py --variants rtn-int4-g64-mse gptq-int4-g32-mse gptq-int4-g64-mse \
        --output-dir runs/smollm2-mse --results-name smollm2_gptq_mse      # a subset, in its own run and results

One quantize stage over the healed model (22 of 30 blocks, 40 distillation steps), every variant saved and scored
on the same Hamlet test blocks as the recipe (perplexity, size on disk, memory after loading):
round-to-nearest int4 in groups of 64, GPTQ int4 in groups of 64 and 32 with and without act-order, GPTQ int8 in
groups of 64, then round-to-nearest int4 g64 and GPTQ int4 g32/g64 again with the "mse" observer (each group's range
shrunk to where its rounding error is least, as GPTQ's reference code does with `mse=True`); all compressed-tensors
pack-quantized checkpoints, scales and unquantized weights in bfloat16. Then GGUF f16 / q8_0 / q4_0 files, scored
as transformers loads them back (dequantized). GPTQ calibrates on 128 training blocks of 256 tokens (the quantize
stage's default calibration_samples; never the test split).
Speed is not measured here (the recipe's compare stage times its variants together).

Targets: GPTQ 4-bit within +6% of the healed model's perplexity, GGUF q8_0 within +1%, the compressed-tensors
folder at most 1/3 of the fp32 checkpoint.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import ROOT, save_results

import hfcompress
from hfcompress.quantization import parse_variant, size_on_disk, variant_name
from hfcompress.recipe import load_recipe, parse_recipe
from hfcompress.report import format_table

RUN_DIR = ROOT / "runs" / "smollm2-135m"
HEALED = RUN_DIR / "04-distill"
GPTQ = {"backend": "gptq", "damp": 0.01, "symmetric": True}
VARIANTS = [
    {"backend": "compressed-tensors", "bits": 4, "group_size": 64},
    {**GPTQ, "bits": 4, "group_size": 64, "act_order": False},
    {**GPTQ, "bits": 4, "group_size": 64, "act_order": True},
    {**GPTQ, "bits": 4, "group_size": 32, "act_order": False},
    {**GPTQ, "bits": 4, "group_size": 32, "act_order": True},
    {**GPTQ, "bits": 8, "group_size": 64, "act_order": False},
    {"backend": "compressed-tensors", "bits": 4, "group_size": 64, "observer": "mse"},
    {**GPTQ, "bits": 4, "group_size": 32, "observer": "mse"},
    {**GPTQ, "bits": 4, "group_size": 64, "observer": "mse"},
    {"backend": "gguf", "type": "f16"},
    {"backend": "gguf", "type": "q8_0"},
    {"backend": "gguf", "type": "q4_0"},
]


def main() -> None:
    names = [variant_name(parse_variant(variant)) for variant in VARIANTS]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", choices=names, default=names, help="a subset (default: all)")
    parser.add_argument("--output-dir", type=Path, default=ROOT / "runs" / "smollm2-gptq")
    parser.add_argument("--results-name", default="smollm2_gptq")
    args = parser.parse_args()
    if not (HEALED / "config.json").is_file():
        parser.exit(1, f"{HEALED} is missing: run `hfcompress run recipes/smollm2-135m.yaml` first\n")
    variants = [variant for variant, name in zip(VARIANTS, names) if name in args.variants]
    recipe = load_recipe(ROOT / "recipes" / "smollm2-135m.yaml").to_dict()
    quantize = {"variants": variants, "calibration_samples": 128, "tolerance": 0.06,
                "evaluate": {"measure_speed": False, "per_device_eval_batch_size": 4}}
    bench = parse_recipe(recipe | {"name": "smollm2-135m-gptq", "teacher": str(HEALED),
                                   "stages": [{"quantize": quantize}]})
    results = hfcompress.run(bench, output_dir=args.output_dir)
    stage = results.stages[0].metrics
    healed = stage["input_perplexity"]
    fp32_size = size_on_disk(HEALED)
    rows = {row.variant: row.metrics for row in results.rows if row.variant}

    lines = [format_table(results), "",
             f"healed model (input): perplexity {healed:.2f}, {fp32_size / 1e6:.1f} MB (fp32 safetensors)",
             f"{'variant':22s} {'perplexity':>10s} {'vs healed':>9s} {'size MB':>8s} {'of fp32':>7s}"]
    for name, metrics in rows.items():
        lines.append(f"{name:22s} {metrics['perplexity']:10.2f} {100 * (metrics['perplexity'] / healed - 1):+8.1f}% "
                     f"{metrics['size_on_disk_bytes'] / 1e6:8.1f} {metrics['size_on_disk_bytes'] / fp32_size:7.3f}")
    if stage["failed_variants"]:
        lines.append(f"failed variants: {stage['failed_variants']}")
    gptq4 = {name: metrics for name, metrics in rows.items() if name.startswith("gptq-int4")}
    if gptq4:
        best = min(gptq4, key=lambda name: gptq4[name]["perplexity"])
        ratio = gptq4[best]["perplexity"] / healed - 1
        lines.append(f"best GPTQ 4-bit: {best} {100 * ratio:+.1f}% (target: within +6%): "
                     f"{'met' if ratio <= 0.06 else 'NOT met'}")
        for observer in ("", "-mse"):
            rtn, gptq = f"rtn-int4-g64{observer}", f"gptq-int4-g64{observer}"
            if rtn in rows and gptq in rows:
                closed = (rows[rtn]["perplexity"] - rows[gptq]["perplexity"]) / (rows[rtn]["perplexity"] - healed)
                lines.append(f"{gptq} closes {100 * closed:.0f}% of {rtn}'s perplexity gap")
        largest = max(rows[name]["size_on_disk_bytes"] for name in gptq4)
        lines.append(f"largest GPTQ 4-bit folder: {largest / fp32_size:.3f} of fp32 (target: at most 1/3): "
                     f"{'met' if largest <= fp32_size / 3 else 'NOT met'}")
    if "gguf-q8_0" in rows:
        ratio = rows["gguf-q8_0"]["perplexity"] / healed - 1
        lines.append(f"GGUF q8_0: {100 * ratio:+.2f}% (target: within +1%): {'met' if ratio <= 0.01 else 'NOT met'}")
    report = "\n".join(lines)
    print(report)
    save_results(args.results_name, {"healed_perplexity": healed, "fp32_size_bytes": fp32_size, "rows": rows,
                                  "failed_variants": stage["failed_variants"]}, report)


if __name__ == "__main__":
    main()
