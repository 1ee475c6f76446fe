"""`hfcompress search` on a tiny 4-layer BERT and a slice of the real reviews: the size filter, successive halving,
resuming, the Pareto front and impossible budgets."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import hfcompress.search
from conftest import classification_recipe, save_tiny_bert
from hfcompress.errors import HfCompressError
from hfcompress.plan import plan_recipe
from hfcompress.recipe import parse_recipe
from hfcompress.recipe_schema import SearchOptions
from hfcompress.run_dir import RunDir
from hfcompress.search import WINNER_RECIPE, load_search, pareto_front, search, shortfall

SPACE = {"num_layers": [1, 2], "heads_sparsity": [0.0, 0.5], "ffn_sparsity": [0.0], "vocabulary": [None, 1],
         "quantization": [{"backend": "half", "dtype": "bfloat16"}]}
# The full 30,522-token embedding alone is ~2 MB in bf16 at hidden 32; the vocabulary the slice uses, ~0.2 MB.
MAX_SIZE_MB = 1.0


def search_recipe(teacher: Path, data: Path, out: Path, **search_options) -> dict:
    recipe = classification_recipe(teacher, data, out, stages=[
        {"finetune": {"max_steps": 6, "per_device_train_batch_size": 16, "learning_rate": 1e-3}}])
    recipe["search"] = {"space": SPACE, "max_candidates": 2, "eta": 2, "num_train_epochs": 0.5, "recovery_steps": 4,
                        "seeds": [0, 1], **search_options}
    return recipe


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tokenizer):
    return save_tiny_bert(tmp_path_factory.mktemp("search-teacher"), tokenizer, num_hidden_layers=4)


@pytest.fixture(scope="module")
def searched(tmp_path_factory, teacher_dir, reviews_csv):
    out = tmp_path_factory.mktemp("search")
    recipe = parse_recipe(search_recipe(teacher_dir, reviews_csv, out, max_size_mb=MAX_SIZE_MB, min_quality=0.5))
    return recipe, out, search(recipe)


def test_pareto_front_on_hand_made_points():
    points = [
        {"size_mb": 5, "quality": 0.99, "latency_ms": 3},   # 0: on the front
        {"size_mb": 6, "quality": 0.98, "latency_ms": 4},   # 1: dominated by 0
        {"size_mb": 4, "quality": 0.95, "latency_ms": 3},   # 2: smaller: on the front
        {"size_mb": 5, "quality": 0.99, "latency_ms": 2},   # 3: dominates 0 (faster, same otherwise)
        {"size_mb": 9, "quality": 1.00, "latency_ms": 9},   # 4: best quality: on the front
        {"size_mb": 9, "quality": 1.00, "latency_ms": 9},   # 5: equal to 4: neither dominates
    ]
    assert pareto_front(points, {"size_mb": "min", "quality": "max", "latency_ms": "min"}) == [2, 3, 4, 5]
    assert pareto_front(points, {"size_mb": "min", "quality": "max"}) == [0, 2, 3, 4, 5]
    assert pareto_front([], {"size_mb": "min"}) == []


def test_shortfall_is_zero_within_budgets_and_grows_with_the_miss():
    options = SearchOptions(max_size_mb=10, min_quality=0.99)
    assert shortfall({"size_mb": 9, "quality": 0.995}, options) == 0
    assert shortfall({"size_mb": 12, "quality": 0.99}, options) == pytest.approx(0.2)
    assert shortfall({"size_mb": 10, "quality": 0.891}, options) == pytest.approx(0.1)


def test_the_size_filter_never_trains_a_candidate_over_budget(searched):
    _, out, state = searched
    entries = state["candidates"]
    assert len(entries) == 2 * 2 * 2  # depths x head sparsities x vocabularies
    over = {name for name, entry in entries.items() if entry["planned_size_mb"] > MAX_SIZE_MB}
    assert over and len(over) < len(entries)
    assert all("-vfull-" in name for name in over)  # the whole embedding alone is over budget
    trained_dirs = {path.name for path in (out / "candidates").glob("rung*/*")}
    assert trained_dirs and not trained_dirs & over
    for name in over:
        assert entries[name]["status"].startswith("over the size budget") and not entries[name]["rungs"]


def test_planned_sizes_match_what_the_runs_measured(searched):
    _, _, state = searched
    for name, entry in state["candidates"].items():
        for record in entry["rungs"].values():  # bf16: two bytes per parameter, so the plan is close
            assert record["size_mb"] == pytest.approx(entry["planned_size_mb"], rel=0.05), name


def test_successive_halving_promotes_the_best_half_each_rung(searched):
    _, _, state = searched
    rungs = state["rungs"]
    assert [len(rung["candidates"]) for rung in rungs] == [2, 1]
    first = {name: state["candidates"][name]["rungs"]["0"] for name in rungs[0]["candidates"]}
    fitting = [name for name, entry in state["candidates"].items() if not entry["status"].startswith("over")]
    largest_per_depth = {depth: max((name for name in fitting if name.startswith(f"L{depth}-")),
                                    key=lambda name: state["candidates"][name]["planned_size_mb"]) for depth in (1, 2)}
    assert set(first) == set(largest_per_depth.values())  # the largest that fit, one per depth (one format here)
    best = max(first, key=lambda name: first[name]["quality"])  # both fit the size, no latency budget is given
    assert rungs[1]["candidates"] == [best] or first[rungs[1]["candidates"][0]]["quality"] == first[best]["quality"]
    shares = [state["candidates"][rung["candidates"][0]]["rungs"][str(rung["rung"])]["share_of_training"]
              for rung in rungs]
    assert shares == [0.5, 1.0]
    for rung in rungs:
        assert rung["teacher_latency_ms"] > 0
        for name in rung["candidates"]:
            assert state["candidates"][name]["rungs"][str(rung["rung"])]["latency_ms"] > 0


def test_the_chosen_model_meets_the_budget_and_its_test_quality_is_a_mean_of_seeds(searched):
    recipe, out, state = searched
    chosen = state["chosen"]
    assert chosen["meets"] and chosen["size_mb"] <= MAX_SIZE_MB and chosen["quality"] >= 0.5
    assert set(chosen["test_by_seed"]) == {0, 1}
    assert chosen["test_mean"] == pytest.approx(sum(chosen["test_by_seed"].values()) / 2)
    assert 0 <= chosen["test_mean"] <= 1
    assert load_search(out)["chosen"]["name"] == chosen["name"]
    assert (out / "pareto.png").stat().st_size > 0
    last = state["rungs"][-1]["candidates"]
    assert chosen["quality"] == max(state["candidates"][name]["rungs"][str(chosen["rung"])]["quality"] for name in last)


def test_the_winning_recipe_is_written_out_and_plans_to_the_chosen_size(searched, teacher_dir):
    _, out, state = searched
    winner = yaml.safe_load((out / WINNER_RECIPE).read_text())
    assert winner["teacher"]["name_or_path"] == str(teacher_dir)
    assert [next(iter(stage)) for stage in winner["stages"]][0] == "finetune"
    assert "search" not in winner
    planned = plan_recipe(parse_recipe(winner))
    quantized = next(step for step in planned if step.stage_id.endswith("quantize")).shape
    assert next(iter(quantized.variant_sizes.values())) / 1e6 <= MAX_SIZE_MB or not quantized.exact


def test_the_chosen_runs_card_says_what_was_tried(searched):
    _, _, state = searched
    run_dir = Path(state["chosen"]["run_dir"])
    final = RunDir(run_dir).load_results().final_model_dir
    card = (run_dir / final / "README.md").read_text()
    assert "## How this model was chosen" in card
    assert state["chosen"]["name"] in card and "over the size budget" in card


def test_a_second_search_reuses_every_finished_run(searched, monkeypatch):
    recipe, out, state = searched

    def no_training(*args, **kwargs):
        raise AssertionError("a finished candidate was trained again")

    monkeypatch.setattr(hfcompress.pipeline, "run", no_training)
    again = search(recipe)
    assert again["chosen"]["name"] == state["chosen"]["name"]
    assert again["chosen"]["test_by_seed"] == state["chosen"]["test_by_seed"]


def test_an_interrupted_search_trains_only_what_is_missing(searched, monkeypatch):
    recipe, out, state = searched
    missing = out / "candidates" / "rung0" / state["rungs"][0]["candidates"][-1] / "results.json"
    missing.unlink()  # as if the search was killed while this run was training
    calls = []
    real_run = hfcompress.search.run
    monkeypatch.setattr(hfcompress.search, "run", lambda recipe, output_dir: calls.append(output_dir)
                        or real_run(recipe, output_dir=output_dir))
    search(recipe)
    assert [Path(path).name for path in calls] == [missing.parent.name]


def test_an_impossible_size_budget_names_the_closest_candidate(tmp_path, teacher_dir, reviews_csv):
    recipe = parse_recipe(search_recipe(teacher_dir, reviews_csv, tmp_path, max_size_mb=0.001))
    with pytest.raises(HfCompressError) as error:
        search(recipe)
    message = str(error.value)
    assert "\n" not in message and "no candidate fits 0.001 MB" in message
    smallest = min(load_search(tmp_path)["candidates"].items(), key=lambda item: item[1]["planned_size_mb"])[0]
    assert smallest in message
    assert not (tmp_path / "candidates").exists()
    assert RunDir(tmp_path).search_file.is_file()


def test_a_search_without_a_budget_is_refused(tmp_path, teacher_dir, reviews_csv):
    recipe = parse_recipe(search_recipe(teacher_dir, reviews_csv, tmp_path))
    with pytest.raises(HfCompressError, match="give at least one budget"):
        search(recipe)
