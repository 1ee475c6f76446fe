"""Quantization backends on a tiny BERT classifier and a tiny Llama, both built from configs (hidden 64)."""

from __future__ import annotations

import itertools
import sys

import pytest
import torch
from torch import nn
from pydantic import ValidationError
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
)

import hfcompress
from hfcompress.errors import HfCompressError
from hfcompress.fileio import read_json
from hfcompress.pruning import STRUCTURE_KEY, layer_shapes, prune_ffn, prune_heads, save_pruned
from hfcompress.quantization import (
    RECORD_FILE,
    load_quantized,
    memory_footprint,
    parse_variant,
    quantize,
    quantized_modules,
    save_quantized,
    size_on_disk,
    variant_name,
)
from hfcompress.quantization.bitsandbytes import BitsAndBytesOptions
from hfcompress.quantization.half import HalfOptions
from hfcompress.quantization.quanto import QuantoOptions
from hfcompress.stages.quantize import QuantizeOptions

VOCAB = 1000
INPUT_IDS = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))


def build_bert():
    config = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=64, num_labels=2)
    return BertForSequenceClassification(config), AutoModelForSequenceClassification, "classifier"


def build_llama(tie_word_embeddings=False):
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64,
                         tie_word_embeddings=tie_word_embeddings)
    return LlamaForCausalLM(config), AutoModelForCausalLM, "lm_head"


class Checkpoint:
    """A full-precision model saved with save_pretrained, and what the tests compare against."""

    def __init__(self, folder, build):
        torch.manual_seed(0)
        model, self.model_class, self.head = build()
        model.eval().save_pretrained(folder)
        self.folder = folder
        self.logits = logits(model)
        self.size = size_on_disk(folder)
        self.memory = memory_footprint(model)
        self.linear_names = {name for name, module in model.named_modules() if type(module) is nn.Linear}
        self.linear_weights = {name: model.get_submodule(name).weight.numel() for name in self.linear_names}
        self.embedding_size = model.get_input_embeddings().weight.shape


@pytest.fixture(scope="module", params=["bert", "llama"])
def checkpoint(request, tmp_path_factory):
    build = {"bert": build_bert, "llama": build_llama}[request.param]
    return Checkpoint(tmp_path_factory.mktemp(request.param), build)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT_IDS.to(model.device)).logits.float().cpu()


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    return ((output - reference).norm() / reference.norm()).item()


def calibration_batches():
    generator = torch.Generator().manual_seed(1)
    while True:
        yield {"input_ids": torch.randint(0, VOCAB, (4, 16), generator=generator)}


# ------------------------------------------------------------------------------------------------ options


@pytest.mark.parametrize(("options", "message"), [
    ({"backend": "bitsandbytes", "bits": 3}, "bits: Input should be 8 or 4"),
    ({"backend": "bitsandbytes", "bits": 4, "quant_type": "int4"}, "quant_type: Input should be 'nf4' or 'fp4'"),
    ({"backend": "bitsandbytes", "bits": 8, "quant_type": "fp4"}, ": Value error, quant_type only applies to bits: 4"),
    ({"backend": "bitsandbytes", "bits": 4, "llm_int8_threshold": 5.0}, "llm_int8_threshold only applies to bits: 8"),
    ({"backend": "bitsandbytes", "bits": 8, "threshold": 5.0}, "threshold: Extra inputs are not permitted"),
    ({"backend": "awq", "bits": 4}, "backend: backend must be one of: bitsandbytes, quanto, half"),
    ({"bits": 8}, "backend: backend must be one of: bitsandbytes, quanto, half"),
    ({"backend": "quanto", "weights": "int3"}, "weights: Input should be 'int8', 'int4' or 'int2'"),
    ({"backend": "quanto", "quantize_embeddings": True}, "optimum-quanto has no quantized Embedding module"),
    ({"backend": "half", "dtype": "float8"}, "dtype: Input should be 'float16' or 'bfloat16'"),
    ({"backend": "half", "name": "../escape"}, "name: String should match pattern"),
])
def test_bad_options_fail_validation_with_a_clear_message(options, message):
    with pytest.raises(HfCompressError, match=r"^quantization variant .*: ") as raised:
        parse_variant(options)
    assert message in str(raised.value)


def test_variant_options_embed_in_a_stage_options_model():
    options = QuantizeOptions.model_validate({"variants": [
        {"backend": "bitsandbytes", "bits": 4}, {"backend": "quanto", "weights": "int4"}, {"backend": "half"},
    ]})
    assert [type(v) for v in options.variants] == [BitsAndBytesOptions, QuantoOptions, HalfOptions]
    assert options.variants[0].quant_type == "nf4" and options.variants[0].compute_dtype == "float32"

    with pytest.raises(ValidationError) as raised:
        QuantizeOptions.model_validate({"variants": [{"backend": "bitsandbytes", "bits": 3}]})
    (error,) = raised.value.errors()
    assert error["loc"] == ("variants", 0, "bits")  # validated by the registered backend's own options model
    dumped = options.model_dump()["variants"]
    assert dumped[0]["quant_type"] == "nf4" and dumped[1]["weights"] == "int4"  # each variant's own fields


@pytest.mark.parametrize(("options", "name"), [
    ({"backend": "bitsandbytes", "bits": 8}, "bnb-int8"),
    ({"backend": "bitsandbytes", "bits": 4}, "bnb-nf4"),
    ({"backend": "bitsandbytes", "bits": 4, "quant_type": "fp4", "double_quant": True}, "bnb-fp4-dq"),
    ({"backend": "bitsandbytes", "bits": 8, "quantize_embeddings": True}, "bnb-int8-emb"),
    ({"backend": "quanto", "weights": "int4"}, "quanto-int4"),
    ({"backend": "quanto", "activations": "int8"}, "quanto-int8-a8"),
    ({"backend": "half"}, "bf16"),
    ({"backend": "half", "dtype": "float16"}, "fp16"),
    ({"backend": "half", "name": "my-half"}, "my-half"),
])
def test_variant_names(options, name):
    assert variant_name(parse_variant(options)) == name


# ------------------------------------------------------------------------------------------------ backends

# (options, quantized Linear class, largest relative logit error, smallest compression of the Linear weights)
# Errors measured on these random-init models: 8-bit <= 0.018, 4-bit <= 0.155, int2 <= 0.55, int8 + int8
# activations <= 0.015. Compression counts the per-row / per-block scales: 8-bit ~3.65x, nf4 ~6.1x, quanto int4
# ~5.7x, int2 ~8.9x. Double quantization saves nothing at this size: its per-layer lookup tables (1 KB each)
# outweigh the smaller scales (~4.6x); it pays off on real layers.
LINEAR_VARIANTS = [
    ({"backend": "bitsandbytes", "bits": 8}, "Linear8bitLt", 0.05, 3.5),
    ({"backend": "bitsandbytes", "bits": 4}, "Linear4bit", 0.25, 5.5),
    ({"backend": "bitsandbytes", "bits": 4, "quant_type": "fp4", "double_quant": True}, "Linear4bit", 0.25, 4.0),
    ({"backend": "quanto", "weights": "int8"}, "QLinear", 0.05, 3.5),
    ({"backend": "quanto", "weights": "int4"}, "QLinear", 0.25, 5.0),
    ({"backend": "quanto", "weights": "int2"}, "QLinear", 0.8, 8.0),
    ({"backend": "quanto", "weights": "int8", "activations": "int8", "calibration_batches": 4}, "QLinear", 0.05, 3.5),
]


@pytest.mark.parametrize(("options", "linear_type", "tolerance", "compression"), LINEAR_VARIANTS,
                         ids=[variant_name(parse_variant(v[0])) for v in LINEAR_VARIANTS])
def test_linear_layers_quantized_close_to_fp32_and_round_trip(checkpoint, tmp_path, options, linear_type,
                                                             tolerance, compression):
    variant = parse_variant(options)
    model = quantize(checkpoint.folder, checkpoint.model_class, variant, calibration_batches())

    body_linears = {name for name in checkpoint.linear_names if not name.startswith(checkpoint.head)}
    linears = {name: kind for name, kind in quantized_modules(model).items() if name in checkpoint.linear_names}
    assert linears == dict.fromkeys(body_linears, linear_type)
    assert type(model.get_submodule(checkpoint.head)) is nn.Linear

    output = logits(model)
    assert relative_error(output, checkpoint.logits) < tolerance

    save_quantized(model, tmp_path, variant)  # after a forward: bitsandbytes' CPU 4-bit path repacks weights then
    reloaded = load_quantized(tmp_path, checkpoint.model_class)
    assert quantized_modules(reloaded) == quantized_modules(model)
    torch.testing.assert_close(logits(reloaded), output, rtol=0, atol=1e-6)

    linear_bytes = 4 * sum(checkpoint.linear_weights[name] for name in body_linears)
    assert linear_bytes / (size_on_disk(tmp_path) - (checkpoint.size - linear_bytes)) >= compression
    assert linear_bytes / (memory_footprint(model) - (checkpoint.memory - linear_bytes)) >= compression
    assert read_json(tmp_path / RECORD_FILE)["backend"] == variant.backend


@pytest.mark.parametrize("options", [{"backend": "bitsandbytes", "bits": 8}, {"backend": "quanto", "weights": "int8"}])
def test_skip_modules_stay_in_full_precision(checkpoint, options):
    skipped = "intermediate.dense" if checkpoint.head == "classifier" else "mlp.down_proj"
    model = quantize(checkpoint.folder, checkpoint.model_class, parse_variant({**options, "skip_modules": [skipped]}))

    kept = {name for name in checkpoint.linear_names if name.endswith(skipped)}
    assert len(kept) == 2  # one per layer
    for name in kept:
        assert type(model.get_submodule(name)) is nn.Linear
    assert not kept & set(quantized_modules(model))
    assert len(quantized_modules(model)) == len(checkpoint.linear_names) - len(kept) - 1  # - the head


@pytest.mark.parametrize(("bits", "embedding_type", "tolerance", "compression"), [
    (8, "Embedding8bit", 0.05, 3.5),
    (4, "Embedding4bit", 0.25, 6.0),
])
def test_bitsandbytes_quantized_embeddings(checkpoint, tmp_path, bits, embedding_type, tolerance, compression):
    linears_only = parse_variant({"backend": "bitsandbytes", "bits": bits})
    linears_model = quantize(checkpoint.folder, checkpoint.model_class, linears_only)
    save_quantized(linears_model, tmp_path / "without", linears_only)
    variant = parse_variant({"backend": "bitsandbytes", "bits": bits, "quantize_embeddings": True})
    model = quantize(checkpoint.folder, checkpoint.model_class, variant)

    assert type(model.get_input_embeddings()).__name__ == embedding_type
    output = logits(model)
    assert relative_error(output, checkpoint.logits) < tolerance

    save_quantized(model, tmp_path / "with", variant)
    reloaded = load_quantized(tmp_path / "with", checkpoint.model_class)
    assert type(reloaded.get_input_embeddings()).__name__ == embedding_type
    torch.testing.assert_close(logits(reloaded), output, rtol=0, atol=1e-6)

    embedding_bytes = 4 * checkpoint.embedding_size.numel()
    saved = size_on_disk(tmp_path / "without") - size_on_disk(tmp_path / "with")
    assert embedding_bytes / (embedding_bytes - saved) >= compression


def test_tied_embeddings_are_not_quantized_halfway(tmp_path):
    model, model_class, _ = build_llama(tie_word_embeddings=True)
    model.save_pretrained(tmp_path)
    variant = parse_variant({"backend": "bitsandbytes", "bits": 8, "quantize_embeddings": True})
    with pytest.raises(HfCompressError, match="ties its word embeddings to its output layer"):
        quantize(tmp_path, model_class, variant)


@pytest.mark.parametrize("options", [
    {"backend": "bitsandbytes", "bits": 4}, {"backend": "quanto", "weights": "int8"}, {"backend": "half"},
])
def test_tied_embeddings_survive_the_round_trip(tmp_path, options):
    model, model_class, _ = build_llama(tie_word_embeddings=True)  # like SmolLM2: lm_head shares the embedding
    model.save_pretrained(tmp_path / "fp32")
    variant = parse_variant(options)
    quantized = quantize(tmp_path / "fp32", model_class, variant)
    save_quantized(quantized, tmp_path / "quantized", variant)
    reloaded = load_quantized(tmp_path / "quantized", model_class)

    assert reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight
    torch.testing.assert_close(logits(reloaded), logits(quantized), rtol=0, atol=1e-6)


def test_quanto_calibrates_on_at_most_the_configured_batches(checkpoint):
    taken = itertools.count()

    def counted_batches():
        for batch in calibration_batches():
            next(taken)
            yield batch

    variant = parse_variant({"backend": "quanto", "activations": "int8", "calibration_batches": 3})
    model = quantize(checkpoint.folder, checkpoint.model_class, variant, counted_batches())
    assert next(taken) == 3
    first_linear = model.get_submodule(sorted(quantized_modules(model))[0])
    assert first_linear.input_scale.item() != 1.0  # calibrated, not the initial scale

    with pytest.raises(HfCompressError, match="needs calibration batches"):
        quantize(checkpoint.folder, checkpoint.model_class, variant, None)


@pytest.mark.parametrize(("dtype", "tolerance"), [("float16", 0.005), ("bfloat16", 0.02)])
def test_half_precision(checkpoint, tmp_path, dtype, tolerance):
    variant = parse_variant({"backend": "half", "dtype": dtype})
    model = quantize(checkpoint.folder, checkpoint.model_class, variant)

    assert {parameter.dtype for parameter in model.parameters()} == {getattr(torch, dtype)}
    assert quantized_modules(model) == {}
    output = logits(model)
    assert relative_error(output, checkpoint.logits) < tolerance

    save_quantized(model, tmp_path, variant)
    torch.testing.assert_close(logits(load_quantized(tmp_path, checkpoint.model_class)), output, rtol=0, atol=0)
    assert size_on_disk(tmp_path) <= 0.51 * checkpoint.size
    assert memory_footprint(model) <= 0.51 * checkpoint.memory


def test_hfcompress_from_pretrained_dispatches_on_the_record(checkpoint, tmp_path):
    variant = parse_variant({"backend": "quanto", "weights": "int8"})
    model = quantize(checkpoint.folder, checkpoint.model_class, variant)
    save_quantized(model, tmp_path, variant)

    reloaded = hfcompress.from_pretrained(tmp_path)  # no model class: read from config.json
    assert type(reloaded) is type(model)
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=0, atol=0)
    assert read_json(tmp_path / RECORD_FILE)["weights"] == "int8"


# ------------------------------------------------------------------------------------------------ pruned checkpoints


class PrunedCheckpoint:
    """A BERT pruned into blocks of different shapes, saved with save_pruned (config.json carries pruning_structure)."""

    def __init__(self, folder):
        torch.manual_seed(0)
        config = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=128, max_position_embeddings=64, num_labels=2)
        model = BertForSequenceClassification(config).eval()
        prune_heads(model, {0: [1]})
        prune_ffn(model, {1: list(range(10))})
        save_pruned(model, folder)
        self.folder = folder
        self.model_class = AutoModelForSequenceClassification
        self.logits = logits(model)
        self.shapes = layer_shapes(model)
        self.body_linears = {name for name, module in model.named_modules()
                             if type(module) is nn.Linear and not name.startswith("classifier")}


@pytest.fixture(scope="module")
def pruned_checkpoint(tmp_path_factory):
    return PrunedCheckpoint(tmp_path_factory.mktemp("pruned-bert"))


# (options, quantized Linear class or None, largest relative logit error: the tolerances of the tests above)
PRUNED_VARIANTS = [
    ({"backend": "bitsandbytes", "bits": 8}, "Linear8bitLt", 0.05),
    ({"backend": "bitsandbytes", "bits": 4}, "Linear4bit", 0.25),
    ({"backend": "bitsandbytes", "bits": 8, "quantize_embeddings": True}, "Linear8bitLt", 0.05),
    ({"backend": "quanto", "weights": "int8"}, "QLinear", 0.05),
    ({"backend": "half", "dtype": "bfloat16"}, None, 0.02),
]


@pytest.mark.parametrize(("options", "linear_type", "tolerance"), PRUNED_VARIANTS,
                         ids=[variant_name(parse_variant(v[0])) for v in PRUNED_VARIANTS])
def test_pruned_checkpoint_quantizes_keeps_its_shapes_and_reloads(pruned_checkpoint, tmp_path, options, linear_type,
                                                                 tolerance):
    assert pruned_checkpoint.shapes[0].heads == 3 and pruned_checkpoint.shapes[1].ffn_size == 118  # uneven blocks
    variant = parse_variant(options)
    model = quantize(pruned_checkpoint.folder, pruned_checkpoint.model_class, variant, calibration_batches())

    assert layer_shapes(model) == pruned_checkpoint.shapes
    expected = dict.fromkeys(pruned_checkpoint.body_linears, linear_type) if linear_type else {}
    assert {name: kind for name, kind in quantized_modules(model).items() if name in pruned_checkpoint.body_linears} \
        == expected
    output = logits(model)
    assert relative_error(output, pruned_checkpoint.logits) < tolerance

    save_quantized(model, tmp_path, variant)
    assert read_json(tmp_path / "config.json")[STRUCTURE_KEY] == read_json(pruned_checkpoint.folder / "config.json")[STRUCTURE_KEY]
    reloaded = hfcompress.from_pretrained(tmp_path)  # quantization.json first, then the pruned shapes
    assert type(reloaded) is type(model)
    assert layer_shapes(reloaded) == pruned_checkpoint.shapes
    assert quantized_modules(reloaded) == quantized_modules(model)
    torch.testing.assert_close(logits(reloaded), output, rtol=0, atol=1e-6 if linear_type else 0)


@pytest.mark.parametrize(("options", "package", "pip_name"), [
    ({"backend": "bitsandbytes", "bits": 8}, "bitsandbytes", "bitsandbytes"),
    ({"backend": "quanto", "weights": "int8"}, "optimum.quanto", "optimum-quanto"),
])
def test_missing_backend_package_is_a_clear_error(checkpoint, monkeypatch, options, package, pip_name):
    monkeypatch.setitem(sys.modules, package, None)  # makes `import package` fail
    with pytest.raises(HfCompressError, match=f"needs the '{package}' package.*; pip install {pip_name}$"):
        quantize(checkpoint.folder, checkpoint.model_class, parse_variant(options))


def snap_to_affine_4bit_blocks(model: nn.Module, block: int = 32) -> None:
    """Put every body Linear weight on a GGUF-Q4_1-like grid: 16 evenly spaced levels per block of inputs."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and not name.endswith(("lm_head", "classifier")):
                rows, columns = module.weight.shape
                blocks = module.weight.view(rows, columns // block, block)
                low, high = blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)
                step = (high - low) / 15
                blocks.copy_(low + torch.round((blocks - low) / step) * step)


def test_quanto_int4_group_size_32_reproduces_weights_already_on_32_blocks(tmp_path):
    """Like the GGUF Q4_1 teacher: re-quantizing in matching groups loses (almost) nothing; quanto's default
    group size (64 here: all 64 inputs) does."""
    model, model_class, _ = build_llama()
    snap_to_affine_4bit_blocks(model)
    model.save_pretrained(tmp_path / "fp32")
    reference = logits(model)

    matching = parse_variant({"backend": "quanto", "weights": "int4", "group_size": 32})
    default = parse_variant({"backend": "quanto", "weights": "int4"})
    matched_model = quantize(tmp_path / "fp32", model_class, matching)
    matched_error = relative_error(logits(matched_model), reference)
    default_error = relative_error(logits(quantize(tmp_path / "fp32", model_class, default)), reference)
    assert matched_error < 0.01 < default_error

    save_quantized(matched_model, tmp_path / "int4-g32", matching)
    assert read_json(tmp_path / "int4-g32" / RECORD_FILE)["group_size"] == 32
    reloaded = load_quantized(tmp_path / "int4-g32", model_class)
    torch.testing.assert_close(logits(reloaded), logits(matched_model), rtol=0, atol=1e-6)


def test_quanto_group_size_must_divide_the_inputs_and_needs_int4_or_int2(tmp_path):
    model, model_class, _ = build_llama()
    model.save_pretrained(tmp_path)
    with pytest.raises(HfCompressError, match="group_size 48 does not divide the 64 input features of model.layers.0"):
        quantize(tmp_path, model_class, parse_variant({"backend": "quanto", "weights": "int4", "group_size": 48}))
    with pytest.raises(HfCompressError, match="group_size only applies to weights: int4 or int2"):
        parse_variant({"backend": "quanto", "weights": "int8", "group_size": 32})
    assert variant_name(parse_variant({"backend": "quanto", "weights": "int4", "group_size": 32})) == "quanto-int4-g32"
