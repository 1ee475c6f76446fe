"""The `quantize` stage: every variant saved and evaluated, one carried forward, a failing one does not stop the rest."""

from __future__ import annotations

import pytest
import torch

from hfcompress import from_pretrained, run
from hfcompress.errors import HfCompressError
from hfcompress.quantization import BACKENDS
from hfcompress.recipe import RecipeError, parse_recipe

from conftest import classification_recipe, save_tiny_bert


@pytest.fixture(scope="module")
def bert64_dir(tmp_path_factory, tokenizer):
    return save_tiny_bert(tmp_path_factory.mktemp("bert64"), tokenizer, hidden_size=64, num_attention_heads=4,
                          intermediate_size=128)


FAST_EVAL = {"timing_iterations": 2, "timing_warmup": 1, "throughput_batch_size": 4}


def test_variants_are_evaluated_and_the_smallest_acceptable_is_carried(tmp_path, bert64_dir, reviews_csv, monkeypatch):
    def unavailable(*args, **kwargs):
        raise HfCompressError("quanto: not available on this device")

    monkeypatch.setattr(BACKENDS["quanto"], "quantize", unavailable)
    variants = [{"backend": "bitsandbytes", "bits": 8}, {"backend": "quanto", "weights": "int4"},
                {"backend": "half", "dtype": "bfloat16"}]
    recipe = classification_recipe(bert64_dir, reviews_csv, tmp_path / "run", stages=[
        {"quantize": {"variants": variants, "tolerance": 1.0, "evaluate": FAST_EVAL}}])
    results = run(parse_recipe(recipe))
    metrics = results.stages[0].metrics
    assert [row.label for row in results.rows] == ["01-quantize/bnb-int8", "01-quantize/bf16"]
    assert [row.model_dir for row in results.rows] == ["01-quantize/bnb-int8", "01-quantize/bf16"]
    assert metrics["failed_variants"] == {"quanto-int4": "HfCompressError: quanto: not available on this device"}
    sizes = {row.label: row.metrics["size_on_disk_bytes"] for row in results.rows}
    assert metrics["carried_forward"] == "bf16" == min(sizes, key=sizes.get).split("/")[1]
    assert results.final_model_dir == "01-quantize/bf16"
    reloaded = from_pretrained(tmp_path / "run" / "01-quantize" / "bf16")
    assert next(reloaded.parameters()).dtype == torch.bfloat16


def test_carry_forward_by_name_and_unknown_name(tmp_path, bert64_dir, reviews_csv):
    stage = {"quantize": {"variants": [{"backend": "half", "dtype": "float16"}, {"backend": "half", "dtype": "bfloat16"}],
                          "carry_forward": "fp16", "evaluate": FAST_EVAL}}
    recipe = classification_recipe(bert64_dir, reviews_csv, tmp_path / "run", stages=[stage])
    assert run(parse_recipe(recipe)).final_model_dir == "01-quantize/fp16"
    stage["quantize"]["carry_forward"] = "int3"
    recipe["output_dir"] = str(tmp_path / "other")
    with pytest.raises(HfCompressError, match=r"quantize.carry_forward: no variant named 'int3' \(have: fp16, bf16\)"):
        run(parse_recipe(recipe))  # the plan refuses it before anything runs
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("variant, message", [
    ({"backend": "bitsandbytes", "bits": 3}, r"variants\[0\].bits: Input should be 8 or 4"),
    ({"backend": "bitsandbytes", "bits": 4, "quant_type": "nf3"}, r"quant_type: Input should be 'nf4' or 'fp4'"),
    ({"backend": "awq", "bits": 4}, r"variants\[0\].backend: backend must be one of: bitsandbytes, quanto, half"),
])
def test_bad_variants_fail_recipe_validation(tmp_path, bert64_dir, reviews_csv, variant, message):
    recipe = classification_recipe(bert64_dir, reviews_csv, tmp_path, stages=[{"quantize": {"variants": [variant]}}])
    with pytest.raises(RecipeError, match=message):
        parse_recipe(recipe)
