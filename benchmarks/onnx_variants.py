"""ONNX Runtime variants of one checkpoint against torch fp32 and bf16: accuracy, size, latency, throughput.

    python benchmarks/onnx_variants.py --model runs/quickstart/06-distill

1. A run of the quickstart's task on the checkpoint: `evaluate` (torch fp32) and a `quantize` stage with torch bf16
   and every ONNX variant. Accuracy is on the test split, computed through ONNX Runtime for the ONNX rows;
   static int8 is calibrated on training batches. Speed is not measured there (timing is step 2).
2. All models loaded in this one process and timed round-robin (`hfcompress.timing`): per round, each model
   gets a block of untimed warm-up calls, then timed calls; a model's figure is the median of its block medians,
   its speed-up the median of its per-round ratios to torch fp32 (with their interquartile range).
   Batch 1 and batch 32 (fewer rounds), sequence length 64, synthetic token ids (timing depends on shape, not content).
"""

from __future__ import annotations

import argparse
import platform
from collections import Counter
from pathlib import Path

import onnx
import onnxruntime
import torch
from common import ROOT, quickstart_recipe, save_results

import hfcompress
from hfcompress.evaluation import synthetic_batch
from hfcompress.recipe import parse_recipe
from hfcompress.timing import speedups, time_round_robin

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
    results = hfcompress.run(parse_recipe(quickstart_recipe(args.model, args.work_dir, stages, name="onnx-bench")))
    failed = results["stages"][-1]["metrics"]["failed_variants"]
    rows = {row["label"].split("/")[-1].replace("bf16", "torch-bf16"): row for row in results["rows"]}
    folders = {name: args.work_dir / row["model_dir"] for name, row in rows.items() if name != "torch-fp32"}
    folders["torch-fp32"] = args.model

    models = {name: hfcompress.from_pretrained(folder) for name, folder in folders.items()}
    vocab_size = models["torch-fp32"].config.vocab_size
    timings = {}
    settings = {1: {"rounds": args.rounds, "block_calls": args.block_calls, "warmup_calls": 3},
                32: {"rounds": 5, "block_calls": 3, "warmup_calls": 1}}  # as the compare stage times throughput
    for batch_size, how in settings.items():
        batch = synthetic_batch(vocab_size, batch_size, LENGTH, "cpu")
        calls = {name: _forward(model, batch) for name, model in models.items()}
        timed = time_round_robin(calls, **how)
        timings[batch_size] = (timed, speedups(timed, "torch-fp32"))

    reference = rows["torch-fp32"]["metrics"]
    table, records = [], {}
    for name in rows:  # torch-fp32 (the evaluate stage), then the quantize stage's variants in order
        metrics = rows[name]["metrics"]
        one, one_ratio = timings[1][0][name], timings[1][1][name]
        many = timings[32][0][name]
        record = {
            "accuracy": metrics["accuracy"],
            "accuracy_points_vs_fp32": 100 * (metrics["accuracy"] - reference["accuracy"]),
            "size_mb": metrics["size_on_disk_bytes"] / 1e6,
            "size_ratio_vs_fp32": reference["size_on_disk_bytes"] / metrics["size_on_disk_bytes"],
            "batch1_median_ms": one.median_ms, "batch1_q1_ms": one.q1_ms, "batch1_q3_ms": one.q3_ms,
            "batch1_speedup_vs_fp32": one_ratio.ratio, "batch1_speedup_q1": one_ratio.q1,
            "batch1_speedup_q3": one_ratio.q3,
            "batch32_median_ms": many.median_ms, "throughput_samples_per_s": 32 / (many.median_ms / 1000),
            "batch32_speedup_vs_fp32": timings[32][1][name].ratio,
        }
        if name.startswith("onnx"):
            record["graph"] = graph_summary(folders[name] / "model.onnx")
        records[name] = record
        table.append(f"{name:<22} {record['accuracy']:.4f} ({record['accuracy_points_vs_fp32']:+.2f}) "
                     f"{record['size_mb']:7.1f} MB ({record['size_ratio_vs_fp32']:.2f}x smaller)  "
                     f"b1 {one.median_ms:6.2f} ms [{one.q1_ms:.2f}-{one.q3_ms:.2f}] "
                     f"{one_ratio.ratio:5.2f}x [{one_ratio.q1:.2f}-{one_ratio.q3:.2f}]  "
                     f"b32 {record['throughput_samples_per_s']:7.1f}/s ({record['batch32_speedup_vs_fp32']:.2f}x)")
    header = (f"model: {args.model}; test split of the quickstart task ({reference['num_examples']} reviews); "
              f"sequence length {LENGTH}; torch {torch.__version__} ({torch.get_num_threads()} threads), "
              f"onnxruntime {onnxruntime.__version__}; {platform.processor() or platform.machine()}\n"
              f"timing: batch 1 {args.rounds} rounds round-robin, {args.block_calls} timed calls per block after 3 "
              "warm-up calls (batch 32: 5 rounds of 3 after 1); median of block medians [IQR]; speed-up = median "
              "per-round ratio to torch-fp32 [IQR]\n"
              "name                   accuracy (points vs fp32)  size on disk          batch-1 latency, speed-up"
              "                    batch-32 throughput")
    graphs = "\n".join(f"{name}: {record['graph']}" for name, record in records.items() if "graph" in record)
    report = "\n".join([header, *table, "", "graphs:", graphs, f"failed variants: {failed or 'none'}"])
    print(report)
    save_results("onnx_variants", {"model": str(args.model), "variants": records, "failed": failed}, report)


def _forward(model, batch: dict):
    def call():
        with torch.no_grad():
            return model(**batch).logits

    return call


def graph_summary(path: Path) -> dict:
    """What the graph computes with: the ops that matter for speed, and the stored types of the embedding table
    and the classifier weight."""
    graph = onnx.load(str(path), load_external_data=False).graph
    ops = Counter(node.op_type for node in graph.node)
    types = {tensor.name: onnx.TensorProto.DataType.Name(tensor.data_type) for tensor in graph.initializer}
    embedding = next((name for name in types if "word_embeddings" in name), None)
    classifier = next((name for name in types if "classifier" in name and "weight" in name), None)
    interesting = ("Attention", "QAttention", "MatMul", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulNBits",
                   "Gemm", "QLinearMatMul", "DequantizeLinear", "QuantizeLinear", "SkipLayerNormalization")
    return {"ops": {op: ops[op] for op in interesting if ops[op]},
            "word_embeddings": types.get(embedding), "classifier": types.get(classifier)}


if __name__ == "__main__":
    main()
