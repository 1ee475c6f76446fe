"""The pipeline end to end on a tiny model and real data: outputs on disk, resume, and clear errors on bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from hfcompress import from_pretrained, run
from hfcompress.recipe import parse_recipe

from conftest import classification_recipe, write_recipe


def stage_mtimes(run_dir):
    return {path.parent.name: path.stat().st_mtime_ns for path in run_dir.glob("*/stage.json")}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_bert_dir, reviews_csv):
    run_dir = tmp_path_factory.mktemp("run")
    recipe = classification_recipe(tiny_bert_dir, reviews_csv, run_dir)
    results = run(parse_recipe(recipe))
    return recipe, run_dir, results


def test_run_writes_every_stage_and_the_results(finished_run):
    recipe, run_dir, results = finished_run
    assert (run_dir / "recipe.yaml").is_file() and (run_dir / "run.log").is_file()
    assert sorted(p.name for p in run_dir.iterdir() if p.is_dir()) == ["01-finetune", "02-evaluate"]
    assert not list(run_dir.glob(".*partial")), "no partial folder is left behind"
    for stage in ("01-finetune", "02-evaluate"):
        assert json.loads((run_dir / stage / "metrics.json").read_text())
    on_disk = json.loads((run_dir / "results.json").read_text())
    assert on_disk["final_model_dir"] == "01-finetune"
    [row] = on_disk["rows"]
    metrics = row["metrics"]
    assert row["model_dir"] == "01-finetune" and row["label"] == "01-finetune"
    assert 0.0 <= metrics["accuracy"] <= 1.0 and 0.0 <= metrics["f1"] <= 1.0
    assert metrics["num_examples"] == on_disk["task"]["test_split_size"] > 50
    model = AutoModelForSequenceClassification.from_pretrained(run_dir / "01-finetune")
    assert metrics["num_parameters"] == sum(p.numel() for p in model.parameters())
    assert metrics["size_on_disk_bytes"] == (run_dir / "01-finetune" / "model.safetensors").stat().st_size
    assert 0 < metrics["latency_ms_p50"] <= metrics["latency_ms_p95"]
    assert metrics["throughput_per_s"] > 0
    assert model.config.id2label == {0: "rotten", 1: "fresh"}
    history = on_disk["stages"][0]["metrics"]["validation_history"]
    assert history[-1]["step"] == 6


def test_checkpoint_reloads_with_the_same_outputs(finished_run, tokenizer):
    _, run_dir, _ = finished_run
    inputs = tokenizer(["a gripping, funny film", "dull and far too long"], padding=True, return_tensors="pt")
    plain = AutoModelForSequenceClassification.from_pretrained(run_dir / "01-finetune").eval()
    ours = from_pretrained(run_dir / "01-finetune").eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(**inputs).logits, ours(**inputs).logits)


def test_training_moves_the_model(tiny_bert_dir, finished_run, tokenizer):
    _, run_dir, _ = finished_run
    before = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir)
    after = AutoModelForSequenceClassification.from_pretrained(run_dir / "01-finetune")
    assert not torch.equal(before.classifier.weight, after.classifier.weight)


def test_rerun_skips_finished_stages_and_a_changed_stage_reruns_from_there(tmp_path, tiny_bert_dir, reviews_csv):
    run_dir = tmp_path / "run"
    recipe = classification_recipe(tiny_bert_dir, reviews_csv, run_dir)
    first = run(parse_recipe(recipe))
    times = stage_mtimes(run_dir)

    second = run(parse_recipe(recipe))
    assert stage_mtimes(run_dir) == times
    assert second.rows == first.rows

    recipe["stages"][1]["evaluate"]["timing_iterations"] = 4
    run(parse_recipe(recipe))
    changed = stage_mtimes(run_dir)
    assert changed["01-finetune"] == times["01-finetune"]
    assert changed["02-evaluate"] != times["02-evaluate"]

    recipe["stages"][0]["finetune"]["learning_rate"] = 5e-4
    run(parse_recipe(recipe))
    again = stage_mtimes(run_dir)
    assert again["01-finetune"] != changed["01-finetune"] and again["02-evaluate"] != changed["02-evaluate"]


def run_cli(recipe_path, *extra):
    return subprocess.run([sys.executable, "-m", "hfcompress", "run", str(recipe_path), *extra],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: r["task"].update(label_names=["rotten", "brilliant"]),
         "task.label_names[1]: label 'brilliant' does not occur in column 'category'"),
        (lambda r: r["task"].update(text_column="review"), "task.text_column: column 'review' not in dataset"),
        (lambda r: r["task"]["dataset"].update(data_files="missing.csv"),
         "task.dataset.data_files: data file 'missing.csv' does not exist"),
        (lambda r: r.update(teacher="nobody/no-such-model-offline"), "teacher: cannot load"),
        (lambda r: r.update(teacher="./no/such/folder"), "teacher: local path './no/such/folder' does not exist"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_earlier_output_is_untouched(finished_run, tmp_path, change, message):
    good, run_dir, _ = finished_run
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    recipe = json.loads(json.dumps(good))
    recipe["stages"][0]["finetune"]["learning_rate"] = 2e-3  # so the first stage would have to run again
    change(recipe)
    result = run_cli(write_recipe(tmp_path / "bad.yaml", recipe))
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    after = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    assert after == before


def test_report_prints_the_table(finished_run):
    _, run_dir, _ = finished_run
    result = subprocess.run([sys.executable, "-m", "hfcompress", "report", str(run_dir)], capture_output=True, text=True)
    assert result.returncode == 0
    assert "01-finetune" in result.stdout and "accuracy" in result.stdout and "faster x" in result.stdout


def test_card_stage_and_push_dry_run(tmp_path, tiny_bert_dir, reviews_csv):
    from huggingface_hub import ModelCard

    run_dir, cards = tmp_path / "run", tmp_path / "cards"
    recipe = classification_recipe(tiny_bert_dir, reviews_csv, run_dir)
    recipe["stages"].append({"card": {"model_cards_dir": str(cards), "repo_id": "me/tiny"}})
    results = run(parse_recipe(recipe))
    card = ModelCard.load(run_dir / "01-finetune" / "README.md")
    final = results.rows[-1].metrics
    assert {r.metric_type: r.metric_value for r in card.data.eval_results} == pytest.approx(
        {"accuracy": final["accuracy"], "f1": final["f1"]})
    assert (cards / "tiny" / "README.md").read_text() == (run_dir / "01-finetune" / "README.md").read_text()
    assert str(tmp_path) not in card.content

    result = subprocess.run([sys.executable, "-m", "hfcompress", "push", str(run_dir), "--repo-id", "me/tiny",
                             "--dry-run"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "dry run: would upload" in result.stdout and "model.safetensors" in result.stdout
