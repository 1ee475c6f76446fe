"""The plan: every stage checked against the model's shape before anything runs, and the parameter counts it
predicts equal to the ones a real run records."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from hfcompress import run
from hfcompress.plan import format_plan, plan_recipe
from hfcompress.recipe import RecipeError, load_recipe

from conftest import classification_recipe, planned_then_run, write_recipe

ROOT = Path(__file__).parents[1]
HAMLET = "pkg://scattertext/data/hamlet.txt"
QUICKSTART_RUN = Path("/work/main/runs/quickstart")


@pytest.fixture(scope="module")
def bert4_dir(tmp_path_factory, tokenizer) -> Path:
    """4 layers of 4 heads, hidden 64, FFN 96 (so a quanto group of 64 fits the attention but not the FFN output)."""
    folder = tmp_path_factory.mktemp("bert4")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=96, max_position_embeddings=64, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gqa_llama_dir(tmp_path_factory, tokenizer) -> Path:
    """A config-only Llama with 4 query heads sharing 2 key/value heads (the plan reads no weights)."""
    folder = tmp_path_factory.mktemp("gqa-llama")
    LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                tie_word_embeddings=True).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def lm_recipe(teacher: Path, output_dir: Path, stages: list) -> dict:
    return {"name": "tiny-lm", "teacher": str(teacher), "output_dir": str(output_dir), "stages": stages,
            "task": {"type": "causal-lm", "dataset": {"path": "text", "data_files": HAMLET}, "max_length": 32}}


DISTILL_2 = {"distill": {"student": {"num_layers": 2}, "max_steps": 1}}
# (stages, the key path the error names, words the message must contain); the teacher has 4 layers of 4 heads.
CONFLICTS = {
    "every_other keeps half the layers": (
        [{"finetune": {"max_steps": 1}}, {"distill": {"student": {"num_layers": 3, "strategy": "every_other"}}}],
        "stages[1].distill.student.num_layers", "every_other keeps 2 of 4 layers, not 3: drop num_layers"),
    "student deeper than the teacher": (
        [{"distill": {"student": {"num_layers": 6}}}],
        "stages[0].distill.student.num_layers", "num_layers must be between 1 and 4"),
    "student layer out of range": (
        [{"distill": {"student": {"layers": [0, 4]}}}],
        "stages[0].distill.student.layers", "layer 4 out of range"),
    "teacher is a later stage": (
        [{"finetune": {"max_steps": 1}}, {"distill": {"teacher": "03-finetune", "max_steps": 1}},
         {"finetune": {"max_steps": 1}}],
        "stages[1].distill.teacher", "'03-finetune' runs after this stage (02-distill)"),
    "teacher is a stage without a model": (
        [{"evaluate": {}}, {"prune": {"ffn": {"sparsity": 0.5}}}, {"distill": {"teacher": "01-evaluate"}}],
        "stages[2].distill.teacher", "stage '01-evaluate' produces no model"),
    "unknown teacher": (
        [{"finetune": {"max_steps": 1}}, {"distill": {"teacher": "01-finetun", "student": {"num_layers": 2}}}],
        "stages[1].distill.teacher", "no model named '01-finetun'"),
    "drop as many layers as are left": (
        [DISTILL_2, {"prune": {"layers": {"drop": 2}}}],
        "stages[1].prune.layers.drop", "cannot drop 2 of 2 layers"),
    "head count that empties every layer": (
        [{"prune": {"heads": {"count": 16}}}],
        "stages[0].prune.heads.count", "asks for 16 of the 16 attention heads left"),
    "head sparsity that removes nothing": (
        [{"prune": {"heads": {"sparsity": 0.05}}}],
        "stages[0].prune.heads.sparsity", "removes none of the 16 attention heads"),
    "ffn sparsity that removes nothing": (
        [{"prune": {"ffn": {"sparsity": 0.01, "scope": "uniform"}}}],
        "stages[0].prune.ffn.sparsity", "removes none of the 384 FFN neurons"),
    "quanto group size that does not divide the FFN width": (
        [{"quantize": {"variants": [{"backend": "quanto", "weights": "int4", "group_size": 64}]}}],
        "stages[0].quantize.variants[0].group_size",
        "group_size 64 does not divide the 96 input features of bert.encoder.layer.0.output.dense"),
    "carry_forward names no variant": (
        [{"quantize": {"variants": [{"backend": "half"}], "carry_forward": "bnb-int8"}}],
        "stages[0].quantize.carry_forward", "no variant named 'bnb-int8' (have: bf16)"),
    "prune after quantize": (
        [{"quantize": {"variants": [{"backend": "half"}]}}, {"prune": {"ffn": {"sparsity": 0.5}}}],
        "stages[1].prune", "needs a full-precision model, but the current one is quantized (bf16)"),
    "repo id the Hub refuses": (
        [{"push": {"repo_id": "me/my--model", "dry_run": True}}],
        "stages[0].push.repo_id", "Cannot have -- or .. in repo_id"),
    "attention loss across different head counts": (
        [{"distill": {"student": {"config_overrides": {"num_attention_heads": 2}},
                      "loss": {"weights": {"kl": 1.0, "attention_kl": 1.0}}}}],
        "stages[0].distill.loss", "attention_kl needs the same number of attention heads in student and teacher"),
    "layer map beyond the teacher": (
        [{"distill": {"student": {"num_layers": 2}, "loss": {"weights": {"hidden_mse": 1.0}, "layer_map": {0: 7}}}}],
        "stages[0].distill.loss", "teacher layer 7 out of range (4 layers)"),
}


def line_of(path: Path, message: str) -> str:
    """The recipe line an error names (`file:LINE: ...`), with the one before it: a block value starts on the line
    after its key."""
    number = int(message.split(":")[1])
    return "\n".join(path.read_text().splitlines()[number - 2 : number])


@pytest.mark.parametrize("case", list(CONFLICTS))
def test_conflicting_options_are_rejected_by_the_plan_with_the_recipe_line(case, tmp_path, bert4_dir, reviews_csv):
    stages, key, expected = CONFLICTS[case]
    path = write_recipe(tmp_path / "recipe.yaml",
                        classification_recipe(bert4_dir, reviews_csv, tmp_path / "run", stages))
    recipe = load_recipe(path)
    started = time.perf_counter()
    with pytest.raises(RecipeError) as caught:
        plan_recipe(recipe)
    assert time.perf_counter() - started < 20  # only configs are read; no weights, no data
    [message] = caught.value.lines
    assert message.startswith(f"{path}:") and f": {key}: " in message and expected in message, message
    last_key = key.rsplit(".", 1)[-1].split("[")[0]
    assert last_key in line_of(path, message), (message, line_of(path, message))
    assert not (tmp_path / "run").exists()


def test_grouped_query_attention_budget_smaller_than_a_group(tmp_path, gqa_llama_dir):
    path = write_recipe(tmp_path / "lm.yaml", lm_recipe(gqa_llama_dir, tmp_path / "run",
                                                        [{"prune": {"heads": {"count": 1}}}]))
    with pytest.raises(RecipeError) as caught:
        plan_recipe(load_recipe(path))
    [message] = caught.value.lines
    assert ": stages[0].prune.heads.count: count 1 (global) removes none of the 8 attention heads" in message
    assert "grouped-query attention: heads go in units of 2" in message
    # heads_per_group takes one head from every group: still two at a time, so one head stays impossible
    path = write_recipe(tmp_path / "lm2.yaml", lm_recipe(gqa_llama_dir, tmp_path / "run", [
        {"prune": {"heads": {"count": 4, "group_strategy": "heads_per_group"}}}]))
    planned = plan_recipe(load_recipe(path))
    assert [(s.heads, s.kv_heads) for s in planned[-1].shape.layers] == [(2, 2)] * 2
    teacher = LlamaForCausalLM(LlamaConfig.from_pretrained(gqa_llama_dir))  # tied input and output embeddings
    assert planned[0].shape.num_parameters == sum(p.numel() for p in teacher.parameters())


def test_missing_teacher_folder_names_the_teacher_line(tmp_path, reviews_csv):
    path = write_recipe(tmp_path / "recipe.yaml",
                        classification_recipe(tmp_path / "no-such-teacher", reviews_csv, tmp_path / "run"))
    with pytest.raises(RecipeError) as caught:
        plan_recipe(load_recipe(path))
    [message] = caught.value.lines
    assert ": teacher: local path" in message and "does not exist" in message
    assert "teacher:" in line_of(path, message)


@pytest.mark.parametrize("case", ["every_other keeps half the layers", "teacher is a later stage"])
def test_validate_command_rejects_in_one_line_and_writes_nothing(case, tmp_path, bert4_dir, reviews_csv):
    stages, key, expected = CONFLICTS[case]
    path = write_recipe(tmp_path / "recipe.yaml",
                        classification_recipe(bert4_dir, reviews_csv, tmp_path / "run", stages))
    result = subprocess.run([sys.executable, "-m", "hfcompress", "validate", str(path)], capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    # One error line; a first read of the data file may also draw the datasets library's progress bars.
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert line.startswith(f"error: {path}:") and key in line and expected in line
    assert not (tmp_path / "run").exists()


def test_run_refuses_before_writing_anything(tmp_path, bert4_dir, reviews_csv):
    stages, _, expected = CONFLICTS["every_other keeps half the layers"]
    recipe = classification_recipe(bert4_dir, reviews_csv, tmp_path / "run", stages)
    with pytest.raises(RecipeError, match="every_other keeps 2 of 4 layers"):
        run(load_recipe(write_recipe(tmp_path / "recipe.yaml", recipe)))
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------ plan vs what the run records

FAST_EVAL = {"measure_speed": False}


@pytest.fixture(scope="module")
def quickstart_like_run(tmp_path_factory, bert4_dir, reviews_csv):
    """The quickstart's stage list, scaled down: finetune, distill every other layer, prune heads and FFN by
    importance, heal, a random prune (which the plan reproduces exactly), quantization variants."""
    folder = tmp_path_factory.mktemp("plan-run")
    train = {"max_steps": 2, "per_device_train_batch_size": 16}
    stages = [
        {"finetune": train}, {"evaluate": {"label": "teacher", **FAST_EVAL}},
        {"distill": {"student": {"num_layers": 2, "strategy": "every_other"}, **train}}, {"evaluate": FAST_EVAL},
        {"prune": {"heads": {"sparsity": 0.33}, "ffn": {"sparsity": 0.25}, "calibration_samples": 16}},
        {"distill": {"teacher": "01-finetune", **train}}, {"evaluate": FAST_EVAL},
        {"prune": {"ffn": {"count": 20}, "heads": {"count": 2}, "selection": "random"}}, {"evaluate": FAST_EVAL},
        {"quantize": {"variants": [{"backend": "bitsandbytes", "bits": 8}, {"backend": "bitsandbytes", "bits": 4},
                                   {"backend": "quanto", "weights": "int8"},
                                   {"backend": "quanto", "weights": "int4"},
                                   {"backend": "half"}], "evaluate": FAST_EVAL}},
    ]
    path = write_recipe(folder / "recipe.yaml", classification_recipe(bert4_dir, reviews_csv, folder / "run", stages))
    return (*planned_then_run(path), folder / "run")


def test_planned_parameter_counts_equal_the_recorded_ones(quickstart_like_run):
    planned, results, _ = quickstart_like_run
    rows = {row.label: row.metrics for row in results.rows}
    for row in results.rows:
        if not row.label.startswith("10-quantize/"):
            assert row.metrics["num_parameters"] == planned[row.stage_id].num_parameters, row.label
    stages = {stage.id: stage for stage in results.stages}
    for prune_id in ("05-prune", "08-prune"):
        assert stages[prune_id].metrics["parameters_after"] == planned[prune_id].num_parameters
    assert planned["03-distill"].num_parameters < planned["01-finetune"].num_parameters
    assert planned["05-prune"].num_parameters < planned["03-distill"].num_parameters
    for label, metrics in rows.items():
        if label.startswith("10-quantize/"):  # packed weights count as the matrices they stand for
            assert metrics["num_parameters"] == pytest.approx(planned["10-quantize"].num_parameters, rel=0.01)



def test_random_selection_is_planned_block_for_block(quickstart_like_run):
    planned, results, _ = quickstart_like_run
    recorded = next(stage for stage in results.stages if stage.id == "08-prune").metrics["layer_shapes"]
    assert [shape.__dict__ for shape in planned["08-prune"].layers] == recorded


def test_quantized_size_estimates_are_close_to_the_files(quickstart_like_run):
    planned, results, run_dir = quickstart_like_run
    estimates = planned["10-quantize"].variant_sizes
    measured = {row.variant: row.metrics["size_on_disk_bytes"] for row in results.rows if row.variant}
    assert set(measured) == set(estimates)
    for name, size in measured.items():
        assert estimates[name] == pytest.approx(size, rel=0.02), name  # the files add a JSON header per tensor
    fp32 = next(r for r in results.rows if r.stage_id == "09-evaluate").metrics["size_on_disk_bytes"]
    assert planned["09-evaluate"].fp32_bytes == pytest.approx(fp32, rel=0.01)


def test_a_pruned_checkpoint_is_planned_with_its_own_block_shapes(quickstart_like_run, tmp_path, reviews_csv):
    """A recipe may start from (or distill from) a checkpoint whose blocks differ in shape: the plan builds it with
    the structure the checkpoint records, not the uniform shape of its config."""
    planned, results, run_dir = quickstart_like_run
    pruned = run_dir / "06-distill"
    stages = [{"evaluate": FAST_EVAL}, {"distill": {"teacher": str(run_dir / "01-finetune"), "max_steps": 1}}]
    recipe = load_recipe(write_recipe(tmp_path / "recipe.yaml",
                                      classification_recipe(pruned, reviews_csv, tmp_path / "run", stages)))
    steps = plan_recipe(recipe)
    assert steps[0].shape.num_parameters == planned["06-distill"].num_parameters
    recorded = next(stage for stage in results.stages if stage.id == "05-prune").metrics["layer_shapes"]
    assert [shape.__dict__ for shape in steps[0].shape.layers] == recorded  # importance chose these per block
    assert steps[-1].shape.num_parameters == planned["06-distill"].num_parameters  # the student is the current model


def test_with_the_training_token_counts_a_vocabulary_step_is_planned_exactly(tmp_path, bert4_dir, reviews_csv):
    from hfcompress.sources import load_tokenizer
    from hfcompress.stages.prune import training_token_counts

    stages = [{"prune": {"vocabulary": {"min_frequency": 2}}},
              {"quantize": {"variants": [{"backend": "half"}], "evaluate": FAST_EVAL}}]
    recipe = load_recipe(write_recipe(tmp_path / "recipe.yaml",
                                      classification_recipe(bert4_dir, reviews_csv, tmp_path / "run", stages)))
    tokenizer = load_tokenizer(recipe.teacher)
    upper_bound = plan_recipe(recipe, tokenizer=tokenizer, count_vocabulary=False)[1].shape
    exact = plan_recipe(recipe)[1].shape  # what `validate` prints: the counts are read from the training split
    assert exact.num_parameters == plan_recipe(
        recipe, tokenizer=tokenizer, token_counts=training_token_counts(recipe, tokenizer))[1].shape.num_parameters
    results = run(recipe)
    after = results.stages[0].metrics
    assert not upper_bound.exact and upper_bound.config.vocab_size == 30522
    assert exact.exact and exact.config.vocab_size == after["vocabulary"]["tokens_kept"] < 30522 // 5
    assert exact.num_parameters == after["parameters_after"]
    quantized = results.rows[-1].metrics["size_on_disk_bytes"]
    assert plan_recipe(recipe, tokenizer=tokenizer, token_counts=training_token_counts(recipe, tokenizer))[
        2].shape.variant_sizes["bf16"] == pytest.approx(quantized, rel=0.03)  # + the safetensors header


def test_validate_prints_one_line_per_stage(tmp_path, bert4_dir, reviews_csv):
    stages = [{"distill": {"student": {"num_layers": 2}, "max_steps": 1}}, {"evaluate": {}},
              {"quantize": {"variants": [{"backend": "half"}, {"backend": "bitsandbytes", "bits": 8}]}}]
    path = write_recipe(tmp_path / "recipe.yaml",
                        classification_recipe(bert4_dir, reviews_csv, tmp_path / "run", stages))
    planned = plan_recipe(load_recipe(path))
    text = format_plan(planned)
    lines = text.splitlines()[1:]
    assert [line.split()[0] for line in lines] == ["teacher", "01-distill", "02-evaluate", "03-quantize"]
    assert "bf16 ~" in lines[3] and "bnb-int8 ~" in lines[3]
    assert f"{planned[1].shape.num_parameters / 1e6:.2f} M params" in lines[1]


def test_quickstart_plan_matches_the_demo_run_when_there_is_one():
    """The shipped recipe with the packaged MiniLM teacher, against the counts `make demo` recorded."""
    results_file = QUICKSTART_RUN / "results.json"
    if not results_file.is_file():
        pytest.skip(f"no finished quickstart run at {QUICKSTART_RUN}")
    planned = {step.stage_id: step.shape for step in plan_recipe(load_recipe(ROOT / "recipes" / "quickstart.yaml"))}
    results = json.loads(results_file.read_text())
    for row in results["rows"]:
        stage_id = row["stage_id"]
        assert row["metrics"]["num_parameters"] == planned[stage_id].num_parameters, row["label"]
