"""The `prune` stage in the pipeline: budgets, importance vs random, reload, and recovery keeping the structure."""

from __future__ import annotations

import json

import pytest
import torch

from hfcompress import from_pretrained, run
from hfcompress.recipe import RecipeError, parse_recipe

from conftest import classification_recipe, save_tiny_bert


@pytest.fixture(scope="module")
def bert4_dir(tmp_path_factory, tokenizer):
    return save_tiny_bert(tmp_path_factory.mktemp("bert3"), tokenizer, num_hidden_layers=3, num_attention_heads=4)


PRUNE = {"layers": {"drop": 1}, "heads": {"sparsity": 0.25}, "ffn": {"sparsity": 0.25}, "calibration_samples": 32}


def test_prune_then_recover_keeps_the_structure(tmp_path, bert4_dir, reviews_csv):
    recipe = classification_recipe(bert4_dir, reviews_csv, tmp_path / "run", stages=[
        {"prune": PRUNE}, {"finetune": {"max_steps": 2, "eval_strategy": "no"}}])
    results = run(parse_recipe(recipe))
    metrics = results.stages[0].metrics
    assert metrics["removed"]["layers"] == [metrics["removed"]["layers"][0]]
    assert sum(metrics["removed"]["heads"].values()) == 2  # a quarter of the 8 heads left after dropping a layer
    assert sum(metrics["removed"]["ffn"].values()) == 32  # a quarter of 2 x 64 neurons
    pruned = from_pretrained(tmp_path / "run" / "01-prune")
    assert sum(p.numel() for p in pruned.parameters()) == metrics["parameters_after"] < metrics["parameters_before"]
    # BERT configs cannot express per-layer head counts: the checkpoint ships its modeling code
    assert metrics["loader"] == "transformers (trust_remote_code=True)"
    recovered_dir = tmp_path / "run" / "02-finetune"
    assert json.loads((recovered_dir / "config.json").read_text())["pruning_structure"] == json.loads(
        (tmp_path / "run" / "01-prune" / "config.json").read_text())["pruning_structure"]
    recovered = from_pretrained(recovered_dir)
    assert [tuple(p.shape) for p in recovered.parameters()] == [tuple(p.shape) for p in pruned.parameters()]


def test_random_selection_spends_the_same_budget_differently(tmp_path, bert4_dir, reviews_csv):
    chosen = {}
    for selection in ("importance", "random"):
        recipe = classification_recipe(bert4_dir, reviews_csv, tmp_path / selection, stages=[
            {"prune": {"ffn": {"sparsity": 0.5}, "selection": selection, "calibration_samples": 32}}])
        metrics = run(parse_recipe(recipe)).stages[0].metrics
        chosen[selection] = metrics
    assert chosen["importance"]["parameters_after"] == chosen["random"]["parameters_after"]
    importance = from_pretrained(tmp_path / "importance" / "01-prune")
    randomly = from_pretrained(tmp_path / "random" / "01-prune")
    kept_a = importance.bert.encoder.layer[0].intermediate.dense.weight
    kept_b = randomly.bert.encoder.layer[0].intermediate.dense.weight
    assert kept_a.shape != kept_b.shape or not torch.equal(kept_a, kept_b)


@pytest.mark.parametrize("options, message", [
    ({}, "give at least one of `layers`, `heads`, `ffn`"),
    ({"heads": {"sparsity": 0.3, "count": 2}}, "give exactly one of `sparsity`"),
    ({"heads": {"sparsity": 1.5}}, "stages[0].prune.heads.sparsity: Input should be less than 1"),
    ({"layers": {"drop": 1, "how": "x"}}, "stages[0].prune.layers.how: unknown key"),
])
def test_bad_prune_options_fail_validation(tmp_path, bert4_dir, reviews_csv, options, message):
    recipe = classification_recipe(bert4_dir, reviews_csv, tmp_path, stages=[{"prune": options}])
    with pytest.raises(RecipeError, match=message.replace("[", r"\[").replace("]", r"\]").replace("`", ".")):
        parse_recipe(recipe)
