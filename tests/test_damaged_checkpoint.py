"""A damaged weight file reaches the user as one line naming the file and what is wrong with it."""

import os

import pytest

import hfcompress
from hfcompress.cli import main
from hfcompress.errors import HfCompressError

from conftest import classification_recipe, save_tiny_bert, write_recipe


@pytest.fixture
def half_written(tmp_path, tokenizer):
    """A tiny checkpoint whose model.safetensors lost its second half, as an interrupted save leaves it."""
    folder = save_tiny_bert(tmp_path / "model", tokenizer)
    weights = folder / "model.safetensors"
    full_size = weights.stat().st_size
    os.truncate(weights, full_size // 2)
    return folder, full_size


def test_from_pretrained_names_the_file_and_how_much_of_it_is_there(half_written):
    folder, full_size = half_written
    with pytest.raises(HfCompressError) as raised:
        hfcompress.from_pretrained(folder)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"{folder / 'model.safetensors'}: damaged safetensors file: cut short: ")
    assert f"{full_size // 2:,} of the {full_size:,} bytes its header describes" in message


@pytest.mark.parametrize("kept_bytes, reason", [(0, "0 bytes, too few for a safetensors header"),
                                                (100, "100 bytes, fewer than the")])
def test_a_file_cut_inside_its_header_says_so(tmp_path, tokenizer, kept_bytes, reason):
    folder = save_tiny_bert(tmp_path / "model", tokenizer)
    os.truncate(folder / "model.safetensors", kept_bytes)
    with pytest.raises(HfCompressError, match=reason):
        hfcompress.from_pretrained(folder)


def test_a_run_whose_stage_loads_it_ends_with_that_line(half_written, reviews_csv, tmp_path, capsys):
    folder, full_size = half_written
    recipe = classification_recipe(folder, reviews_csv, tmp_path / "run", stages=[
        {"evaluate": {"timing_iterations": 2, "timing_warmup": 1, "throughput_batch_size": 4}}])
    assert main(["run", str(write_recipe(tmp_path / "recipe.yaml", recipe))]) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    last = captured.err.strip().splitlines()[-1]
    assert last.startswith(f"error: {folder / 'model.safetensors'}: damaged safetensors file: cut short: ")
