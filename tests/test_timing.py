"""Paired timing: the round-robin helper, the comparison pass over a run's models, and its place in the table."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from hfcompress import run
from hfcompress.comparison import compare_models
from hfcompress.recipe import parse_recipe
from hfcompress.report import format_table
from hfcompress.tasks import TextClassificationTask
from hfcompress.timing import Timing, _rotated, cpu_description, speedups, time_round_robin

from conftest import classification_recipe


def test_speedups_are_paired_per_round_with_their_quartiles():
    timings = {"ref": Timing((10.0, 20.0, 40.0, 10.0)), "fast": Timing((5.0, 10.0, 10.0, 5.0))}
    result = speedups(timings, "ref")
    assert result["ref"].ratio == pytest.approx(1.0)
    # per-round ratios 2, 2, 4, 2: median 2, quartiles 2 and 2.5
    assert (result["fast"].ratio, result["fast"].q1, result["fast"].q3) == pytest.approx((2.0, 2.0, 2.5))
    assert timings["ref"].median_ms == pytest.approx(15.0)
    assert (timings["ref"].q1_ms, timings["ref"].q3_ms) == pytest.approx((10.0, 25.0))


def test_each_round_starts_with_another_model():
    calls = {"a": 1, "b": 2, "c": 3}
    orders = [[name for name, _ in _rotated(calls, offset)] for offset in range(4)]
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]


def test_round_robin_measures_known_durations(monkeypatch):
    """On a virtual clock each call takes a known time: 6 ms for one model, 2 ms for the other, except that the
    second model's third round runs under load (4x slower): its block median and the per-round ratio show it."""
    clock = {"now": 0.0, "round_calls": 0}
    monkeypatch.setattr("hfcompress.timing.time.perf_counter", lambda: clock["now"])
    calls_per_block = 2 + 5  # warm-up + timed

    def long():
        clock["now"] += 0.006

    def short():
        loaded = clock["round_calls"] // calls_per_block == 2
        clock["round_calls"] += 1
        clock["now"] += 0.008 if loaded else 0.002

    timings = time_round_robin({"long": long, "short": short}, rounds=4, block_calls=5, warmup_calls=2)
    assert clock["round_calls"] == 4 * calls_per_block
    assert timings["long"].block_medians_ms == pytest.approx((6.0,) * 4)
    assert timings["short"].block_medians_ms == pytest.approx((2.0, 2.0, 8.0, 2.0))
    assert timings["short"].median_ms == pytest.approx(2.0)
    speedup = speedups(timings, "long")["short"]
    assert (speedup.ratio, speedup.q1, speedup.q3) == pytest.approx((3.0, 2.4375, 3.0))


def tiny_classifier(layers: int) -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=500, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=256, max_position_embeddings=64, num_labels=2)
    return BertForSequenceClassification(config).eval()


def test_comparison_orders_models_by_depth(tmp_path):
    models = {"deep": tiny_classifier(6), "shallow": tiny_classifier(1), "medium": tiny_classifier(3)}
    task = TextClassificationTask(None)
    comparison = compare_models(models, task, sequence_length=32, throughput_batch_size=8, rounds=5, block_calls=5,
                                warmup_calls=2, throughput_rounds=3, throughput_block_calls=3)
    rows = comparison["models"]
    assert comparison["settings"]["reference"] == "deep" and rows["deep"]["speedup"] == pytest.approx(1.0)
    assert rows["shallow"]["speedup"] > rows["medium"]["speedup"] > 1.0
    assert rows["shallow"]["latency_ms"] < rows["medium"]["latency_ms"] < rows["deep"]["latency_ms"]
    assert rows["shallow"]["speedup_q1"] <= rows["shallow"]["speedup"] <= rows["shallow"]["speedup_q3"]
    assert rows["shallow"]["throughput_per_s"] > rows["deep"]["throughput_per_s"] > 0
    assert rows["shallow"]["throughput_speedup"] > 1.0


def test_compare_stage_and_command_fill_the_speed_columns(tmp_path, tiny_bert_dir, reviews_csv):
    timing = {"timing_iterations": 2, "timing_warmup": 0, "throughput_batch_size": 2}
    fast = {"rounds": 3, "block_calls": 3, "warmup_calls": 1, "throughput_batch_size": 4, "throughput_rounds": 2,
            "throughput_block_calls": 1}
    stages = [
        {"evaluate": {**timing, "label": "teacher"}},
        {"distill": {"student": {"num_layers": 1, "strategy": "first"}, "max_steps": 2,
                     "per_device_train_batch_size": 8}},
        {"evaluate": {**timing, "label": "student"}},
        {"compare": fast},
    ]
    run_dir = tmp_path / "run"
    results = run(parse_recipe(classification_recipe(tiny_bert_dir, reviews_csv, run_dir, stages=stages)))
    comparison = results.latest_comparison()
    assert set(comparison["models"]) == {"teacher", "student"} and comparison["failed"] == {}
    assert comparison["settings"]["rounds"] == 3 and comparison["settings"]["sequence_length"] == 32
    table = format_table(results)
    assert "faster x (IQR)" in table and "round-robin" in table
    student_line = next(line for line in table.splitlines() if line.startswith("student"))
    assert f"{comparison['models']['student']['speedup']:.2f}" in student_line

    result = subprocess.run([sys.executable, "-m", "hfcompress", "compare", str(run_dir), "--rounds", "2",
                             "--block-calls", "2", "--throughput-rounds", "1"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    on_disk = json.loads((run_dir / "results.json").read_text())
    assert on_disk["comparison"]["settings"]["rounds"] == 2
    assert "faster x (IQR)" in result.stdout and "student" in result.stdout


def test_cpu_description_names_the_model_and_the_int8_bf16_instruction_sets_it_has():
    xeon = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: fpu sse4_2 avx2 avx512f " \
           "avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8\n"
    epyc = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse4_2 avx avx2 fma\n"
    assert cpu_description(xeon) == ("Intel(R) Xeon(R) Platinum 8480+ (avx2, avx512f, avx512_vnni, avx512_bf16, "
                                     "amx_int8, amx_bf16)")
    assert cpu_description(epyc) == "AMD EPYC (avx2)"
    assert cpu_description("processor\t: 0\nflags\t\t: fpu sse2\n").endswith("(no avx2/avx512f/avx512_vnni/"
                                                                           "avx512_bf16/amx_int8/amx_bf16)")
