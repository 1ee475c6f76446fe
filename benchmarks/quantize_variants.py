"""Quantization benchmark: every bit-width on one checkpoint, evaluated alike (accuracy, size, memory, latency).

    python benchmarks/quantize_variants.py --model runs/quickstart/03-distill

Runs fp32 (the input), bf16, bitsandbytes int8 and nf4 (also with 8-bit embeddings), quanto int8 and int4 through
the `quantize` stage and prints the stage table; the speed columns come from the `compare` stage (every variant timed
round-robin in one process). CPU latency is reported as measured: bitsandbytes and quanto
kernels are built for GPUs, and several are slower than fp32 on a CPU.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import ROOT, quickstart_recipe, save_results

import hfcompress
from hfcompress.recipe import parse_recipe
from hfcompress.report import format_table

VARIANTS = [
    {"backend": "half", "dtype": "bfloat16"},
    {"backend": "bitsandbytes", "bits": 8},
    {"backend": "bitsandbytes", "bits": 8, "quantize_embeddings": True},
    {"backend": "bitsandbytes", "bits": 4, "quant_type": "nf4"},
    {"backend": "bitsandbytes", "bits": 4, "quant_type": "nf4", "quantize_embeddings": True},
    {"backend": "quanto", "weights": "int8"},
    {"backend": "quanto", "weights": "int4"},
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "runs" / "quickstart" / "03-distill")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "quantize-bench")
    args = parser.parse_args()
    timing = {"timing_iterations": 50, "timing_warmup": 10}
    stages = [{"evaluate": {**timing, "label": "fp32"}},
              {"quantize": {"variants": VARIANTS, "evaluate": timing, "tolerance": 0.01}},
              {"compare": {}}]
    results = hfcompress.run(parse_recipe(quickstart_recipe(args.model, args.work_dir, stages, name="quantize-bench")))
    notes = ("\nbitsandbytes "
             "int8 (LLM.int8 with outlier decomposition) and quanto weight-only kernels dequantize on the fly on CPU,\n"
             "so they can be slower than fp32 here; the size and memory columns are what they buy. "
             f"Carried forward: {results['stages'][-1]['metrics']['carried_forward']}.")
    report = format_table(results) + notes
    save_results("quantize_variants", {"rows": results.rows}, report)


if __name__ == "__main__":
    main()
