"""`validate` and `run` show hfcompress's own lines and training bar; the libraries' bars and load reports only
with --verbose."""

import shutil

import datasets
import pytest
from transformers import BertConfig, BertModel
from transformers.utils import logging as transformers_logging

from hfcompress.cli import main

from conftest import classification_recipe, write_recipe

LIBRARY_OUTPUT = ["Generating train split", "Map:", "tokenize:", "Loading weights", "Writing model shards", "LOAD REPORT"]


@pytest.fixture
def headless_teacher(tmp_path, tokenizer):
    """A bare encoder: the classifier's weights are missing, which transformers' load report lists."""
    folder = tmp_path / "teacher"
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def fresh_csv(reviews_csv, tmp_path):
    """A copy under a new path, so datasets builds it anew (and would show its bars) instead of reading its cache."""
    return shutil.copy(reviews_csv, tmp_path / "reviews.csv")


def recipe_file(tmp_path, teacher, data, stages=None):
    return str(write_recipe(tmp_path / "recipe.yaml", classification_recipe(teacher, data, tmp_path / "run", stages)))


def test_run_shows_the_stage_lines_and_training_bar_and_nothing_of_the_libraries(
        headless_teacher, fresh_csv, tmp_path, capfd):
    stages = [{"finetune": {"max_steps": 2, "per_device_train_batch_size": 8}}]
    assert main(["run", recipe_file(tmp_path, headless_teacher, fresh_csv, stages)]) == 0
    out, err = capfd.readouterr()
    assert "01-finetune: running" in out + err and "2/2" in err  # hfcompress's own tqdm over the training steps
    assert [text for text in LIBRARY_OUTPUT if text in out + err] == []


def test_verbose_brings_the_libraries_output_back_and_leaves_their_settings_as_found(
        headless_teacher, fresh_csv, tmp_path, capfd):
    before = (datasets.is_progress_bar_enabled(), transformers_logging.get_verbosity())
    assert main(["validate", recipe_file(tmp_path, headless_teacher, fresh_csv), "--verbose"]) == 0
    assert "Generating train split" in capfd.readouterr().err
    assert (datasets.is_progress_bar_enabled(), transformers_logging.get_verbosity()) == before


def test_validate_alone_prints_no_progress_bar(headless_teacher, fresh_csv, tmp_path, capfd):
    assert main(["validate", recipe_file(tmp_path, headless_teacher, fresh_csv)]) == 0
    out, err = capfd.readouterr()
    assert "ok (2 stages" in out
    assert [text for text in LIBRARY_OUTPUT if text in out + err] == []
