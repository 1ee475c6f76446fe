"""The `distill` stage in the pipeline: cached teacher outputs train exactly like the live teacher, the cache is
reused, a pruned model heals from an earlier teacher, and a student with another vocabulary is refused."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

from hfcompress import run
from hfcompress.errors import HfCompressError
from hfcompress.recipe import RecipeError, parse_recipe
from hfcompress.stages.distill import teacher_cache_dir

from conftest import classification_recipe, save_tiny_bert

FINETUNE = {"finetune": {"max_steps": 4, "learning_rate": 1e-3, "eval_strategy": "no"}}


@pytest.fixture(scope="module")
def bert4_dir(tmp_path_factory, tokenizer):
    return save_tiny_bert(tmp_path_factory.mktemp("bert4"), tokenizer, num_hidden_layers=4, num_attention_heads=4,
                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def distill(**options):
    return {"distill": {"max_steps": 4, "learning_rate": 1e-3, "student": {"num_layers": 2}, **options}}


def test_cached_teacher_trains_exactly_like_the_live_teacher_and_is_reused(tmp_path, bert4_dir, reviews_csv):
    cached = classification_recipe(bert4_dir, reviews_csv, tmp_path / "cached", stages=[FINETUNE, distill()])
    live = classification_recipe(bert4_dir, reviews_csv, tmp_path / "live",
                                 stages=[FINETUNE, distill(cache_teacher_outputs=False)])
    results = run(parse_recipe(cached))
    run(parse_recipe(live))
    assert results.stages[1].metrics["student_layers"] == 2
    a = load_file(tmp_path / "cached" / "02-distill" / "model.safetensors")
    b = load_file(tmp_path / "live" / "02-distill" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)

    cache_dir = teacher_cache_dir()
    files = {path: path.stat().st_mtime_ns for path in cache_dir.iterdir()}
    cached["stages"][1]["distill"]["learning_rate"] = 5e-4  # the student reruns; the teacher does not
    cached["output_dir"] = str(tmp_path / "cached-again")
    run(parse_recipe(cached))
    assert {path: path.stat().st_mtime_ns for path in cache_dir.iterdir()} == files


def test_pruned_model_heals_from_an_earlier_teacher(tmp_path, bert4_dir, reviews_csv):
    recipe = classification_recipe(bert4_dir, reviews_csv, tmp_path / "run", stages=[
        FINETUNE, {"prune": {"layers": {"drop": 2}, "calibration_samples": 16}},
        {"distill": {"max_steps": 3, "teacher": "01-finetune", "loss": {"weights": {"kl": 1.0, "hidden_mse": 1.0}},
                     "cache_teacher_outputs": False}},
    ])
    results = run(parse_recipe(recipe))
    metrics = results.stages[2].metrics
    assert metrics["teacher"] == "01-finetune" and metrics["student_layers"] == 2
    assert metrics["layer_map"] == {"0": 1, "1": 3} or metrics["layer_map"] == {0: 1, 1: 3}


def test_student_with_another_vocabulary_is_refused(tmp_path, bert4_dir, reviews_csv):
    other = tmp_path / "other-vocab"
    other.mkdir()
    vocab = other / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "film"]) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(other)
    config = BertConfig(vocab_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                        num_labels=2)
    BertForSequenceClassification(config).save_pretrained(other)
    recipe = classification_recipe(bert4_dir, reviews_csv, tmp_path / "run", stages=[
        {"distill": {"max_steps": 1, "student": {"pretrained": str(other)}}}])
    with pytest.raises(HfCompressError, match="distillation needs a shared vocabulary"):
        run(parse_recipe(recipe))


def test_distill_options_are_validated(tmp_path, bert4_dir, reviews_csv):
    bad = [
        ({"student": {"num_layers": 2, "pretrained": "x"}}, "give one way to make the student"),
        ({"loss": {"weights": {"kl": 1.0, "mystery": 1.0}}}, "unknown loss 'mystery'"),
        ({"loss": {"temperature": 0}}, "temperature: Input should be greater than 0"),
        ({}, "with no student recipe the current model is the student"),
    ]
    for options, message in bad:
        recipe = classification_recipe(bert4_dir, reviews_csv, tmp_path, stages=[{"distill": options}])
        with pytest.raises(RecipeError, match=message):
            parse_recipe(recipe)
