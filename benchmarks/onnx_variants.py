"""ONNX Runtime variants of one checkpoint against torch fp32 and bf16: accuracy, size, latency, throughput.

    python benchmarks/onnx_variants.py --model runs/quickstart/06-distill

1. A run of the quickstart's task on the checkpoint: `evaluate` (torch fp32) and a `quantize` stage with torch bf16
   and every ONNX variant. Accuracy is on the test split, computed through ONNX Runtime for the ONNX rows;
   static int8 is calibrated on training batches. Speed is not measured there (timing is step 2).
2. All models loaded in this one process and timed round-robin (`hfcompress.comparison`, on `hfcompress.timing`):
   per round, each model gets a block of untimed warm-up calls, then timed calls; a model's figure is the median of
   its block medians, its speed-up the median of its per-round ratios to torch fp32 (with their interquartile
   range). Batch 1 and batch 32, sequence length 64, synthetic token ids (timing depends on shape, not content).
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
from common import ROOT, quickstart_recipe, save_results

import hfcompress
from hfcompress.comparison import compare_models
from hfcompress.recipe import parse_recipe
from hfcompress.tasks import make_task
from hfcompress.timing import cpu_description

ONNX_VARIANTS = [
    {"backend": "onnx", "quantization": "none", "optimize": False},
    {"backend": "onnx", "quantization": "none"},
    {"backend": "onnx", "quantization": "int8-dynamic", "optimize": False},
    {"backend": "onnx", "quantization": "int8-dynamic"},
    {"backend": "onnx", "quantization": "int8-static"},
    {"backend": "onnx", "quantization": "int4"},
    {"backend": "onnx", "quantization": "int4", "accuracy_level": 4, "name": "onnx-int4-a8"},
]
LENGTH = 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "runs" / "quickstart" / "06-distill")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "onnx-bench")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--block-calls", type=int, default=15)
    args = parser.parse_args()

    no_timing = {"measure_speed": False}
    stages = [{"evaluate": {**no_timing, "label": "torch-fp32"}},
              {"quantize": {"variants": [{"backend": "half", "dtype": "bfloat16"}, *ONNX_VARIANTS],
                            "evaluate": no_timing, "tolerance": 0.005}}]
    recipe = parse_recipe(quickstart_recipe(args.model, args.work_dir, stages, name="onnx-bench"))
    results = hfcompress.run(recipe)
    failed = results.stages[-1].metrics["failed_variants"]
    rows = {(row.variant or row.label).replace("bf16", "torch-bf16"): row.metrics for row in results.rows}
    folders = {(row.variant or row.label).replace("bf16", "torch-bf16"): args.work_dir / row.model_dir
               for row in results.rows[1:]}
    folders["torch-fp32"] = args.model

    models = {name: hfcompress.from_pretrained(folders[name]) for name in rows}  # torch-fp32 first: the reference
    comparison = compare_models(models, make_task(recipe.task), sequence_length=LENGTH, rounds=args.rounds,
                                block_calls=args.block_calls)
    reference = rows["torch-fp32"]
    table, records = [], {}
    for name, metrics in rows.items():
        timed = comparison["models"][name]
        record = {
            "accuracy": metrics["accuracy"],
            "accuracy_points_vs_fp32": 100 * (metrics["accuracy"] - reference["accuracy"]),
            "size_mb": metrics["size_on_disk_bytes"] / 1e6,
            "size_ratio_vs_fp32": reference["size_on_disk_bytes"] / metrics["size_on_disk_bytes"],
            **timed,
        }
        if name.startswith("onnx"):
            record["graph"] = graph_summary(folders[name] / "model.onnx")
        records[name] = record
        table.append(f"{name:<18} {record['accuracy']:.4f} ({record['accuracy_points_vs_fp32']:+.2f})  "
                     f"{record['size_mb']:6.1f} MB ({record['size_ratio_vs_fp32']:.2f}x smaller)  "
                     f"{timed['latency_ms']:6.2f} ms [{timed['latency_ms_q1']:.2f}-{timed['latency_ms_q3']:.2f}] "
                     f"{timed['speedup']:5.2f}x [{timed['speedup_q1']:.2f}-{timed['speedup_q3']:.2f}]  "
                     f"{timed['throughput_per_s']:7.1f}/s ({timed['throughput_speedup']:.2f}x)")
    settings = comparison["settings"]
    header = (f"model: {args.model}; accuracy on the test split of the quickstart task ({reference['num_examples']} "
              f"reviews), through ONNX Runtime for the onnx rows; torch {torch.__version__}, onnxruntime "
              f"{onnxruntime.__version__}, {settings['threads']} torch threads; {cpu_description()}\n"
              f"timing (hfcompress.comparison, all models in this process, round-robin): batch 1, {LENGTH} tokens, "
              f"{settings['rounds']} rounds x {settings['block_calls']} calls after {settings['warmup_calls']} warm-up; "
              f"batch {settings['throughput_batch_size']}: {settings['throughput_rounds']} rounds x "
              f"{settings['throughput_block_calls']}; median of block medians [IQR], speed-up = median per-round "
              "ratio to torch-fp32 [IQR]\n"
              "name               accuracy (points)  size on disk (vs fp32)     batch-1 latency [IQR], speed-up [IQR]"
              "      batch-32 throughput (vs fp32)")
    graphs = "\n".join(f"{name}: {record['graph']}" for name, record in records.items() if "graph" in record)
    report = "\n".join([header, *table, "", "graphs:", graphs, f"failed variants: {failed or 'none'}"])
    print(report)
    save_results("onnx_variants", {"model": str(args.model), "variants": records, "failed": failed,
                                   "timing": settings}, report)


def graph_summary(path: Path) -> dict:
    """What the graph computes with: the ops that matter for speed, and the stored types of the embedding table
    and the classifier weight."""
    graph = onnx.load(str(path), load_external_data=False).graph
    ops = Counter(node.op_type for node in graph.node)
    def stored_type(part: str) -> str | None:  # the largest initializer of that module (not its scales)
        tensors = [tensor for tensor in graph.initializer if part in tensor.name]
        if not tensors:
            return None
        largest = max(tensors, key=lambda tensor: np.prod(tensor.dims))
        return onnx.TensorProto.DataType.Name(largest.data_type)

    interesting = ("Attention", "QAttention", "MatMul", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulNBits",
                   "Gemm", "QLinearMatMul", "DequantizeLinear", "QuantizeLinear", "SkipLayerNormalization")
    return {"ops": {op: ops[op] for op in interesting if ops[op]},
            "word_embeddings": stored_type("word_embeddings"), "classifier": stored_type("classifier")}


if __name__ == "__main__":
    main()
