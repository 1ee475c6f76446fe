"""ONNX export and ONNX Runtime variants: the graphs reproduce torch at any batch size and length, the quantized
ones keep most predictions, checkpoints reload, and a model or quantizer that fails fails its variant alone."""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import onnx
import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
)

import hfcompress
from hfcompress import run
from hfcompress.errors import HfCompressError
from hfcompress.evaluation import count_parameters
from hfcompress.fileio import read_json
from hfcompress.onnx import ORTModelForCausalLM, ORTModelForSequenceClassification, export_to_onnx, token_batch
from hfcompress.onnx.quantize import logits_node
from hfcompress.pruning import layer_shapes, needs_structure_record, prune_ffn, prune_heads, save_pruned
from hfcompress.quantization import parse_variant, quantize, save_quantized, variant_name
from hfcompress.recipe import parse_recipe

from conftest import classification_recipe, save_tiny_bert

VOCAB, HIDDEN, LAYERS, HEADS, FFN = 100, 32, 3, 4, 48
QUANTIZATIONS = ("none", "int8-dynamic", "int4")


def _bert():
    return BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=FFN, max_position_embeddings=64, num_labels=3))


def _pruned_bert():
    model = _bert()
    prune_heads(model, {0: [0, 1], 2: [3]})  # 2, 4 and 3 heads
    prune_ffn(model, {0: list(range(10)), 1: [5, 6]})  # 38, 46 and 48 neurons
    return model


def _roberta():
    return RobertaForSequenceClassification(RobertaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=FFN, max_position_embeddings=64, num_labels=2, pad_token_id=1, type_vocab_size=1))


def _gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=FFN,
                                      n_positions=64, bos_token_id=0, eos_token_id=0))


def _llama_gqa():
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=0))


FAMILIES = {"bert": _bert, "pruned-bert": _pruned_bert, "roberta": _roberta, "gpt2": _gpt2, "llama-gqa": _llama_gqa}


@dataclass
class Exported:
    torch_model: torch.nn.Module
    auto_class: type
    folders: dict[str, Path]  # quantization -> saved checkpoint
    in_memory: dict  # quantization -> the ORT model `quantize` returned

    @property
    def causal(self) -> bool:
        return self.auto_class is AutoModelForCausalLM


@pytest.fixture(scope="module")
def export_family(tmp_path_factory):
    """Build, save, export and quantize a family's tiny model once per module (exports take seconds each)."""
    done = {}

    def export(name: str) -> Exported:
        if name not in done:
            done[name] = _export_and_quantize(name, tmp_path_factory.mktemp(name) / "source")
        return done[name]

    return export


@pytest.fixture(params=list(FAMILIES))
def exported(request, export_family) -> Exported:
    return export_family(request.param)


def _export_and_quantize(name: str, source: Path) -> Exported:
    """One tiny random model, saved, then exported once and quantized as each variant."""
    torch.manual_seed(0)
    model = FAMILIES[name]().eval()
    save_pruned(model, source)  # writes the structure record when the layers differ in shape
    auto_class = AutoModelForCausalLM if model.can_generate() else AutoModelForSequenceClassification
    folders, in_memory = {}, {}
    for quantization in QUANTIZATIONS:
        variant = parse_variant({"backend": "onnx", "quantization": quantization})
        in_memory[quantization] = quantize(source, auto_class, variant)
        folders[quantization] = source.parent / variant_name(variant)
        save_quantized(in_memory[quantization], folders[quantization], variant)
    return Exported(model, auto_class, folders, in_memory)


def padded_batch(batch_size: int, length: int, with_token_types: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random ids; every row after the first is padded at its end by a different amount."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch_size, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    for row in range(1, batch_size):
        attention_mask[row, length - min(row * 2, length - 1):] = 0
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if with_token_types:
        batch["token_type_ids"] = torch.randint(0, 2, (batch_size, length), generator=generator)
    return batch


def valid_positions(logits: torch.Tensor, batch: dict, causal: bool) -> torch.Tensor:
    """Per-token logits at the positions that are not padding; a classifier's logits as they are."""
    return logits[batch["attention_mask"].bool()] if causal else logits


def predictions(model, batch: dict, causal: bool) -> torch.Tensor:
    with torch.no_grad():
        return valid_positions(model(**batch).logits, batch, causal).argmax(-1)


def test_the_pruned_family_has_layers_the_config_cannot_express():
    model = _pruned_bert()
    assert [(shape.heads, shape.ffn_size) for shape in layer_shapes(model)] == [(2, 38), (4, 46), (3, 48)]
    assert needs_structure_record(model)


@pytest.mark.parametrize("batch_size", [1, 4])
@pytest.mark.parametrize("length", [6, 13])
def test_fp32_graph_matches_torch_at_any_batch_size_and_length(exported, batch_size, length):
    ort_model = hfcompress.from_pretrained(exported.folders["none"])
    takes_token_types = "token_type_ids" in ort_model.input_names
    batch = padded_batch(batch_size, length, takes_token_types, seed=batch_size * length)
    with torch.no_grad():
        expected = exported.torch_model(**batch).logits
    actual = ort_model(**batch).logits
    assert actual.shape == expected.shape
    torch.testing.assert_close(valid_positions(actual, batch, exported.causal),
                               valid_positions(expected, batch, exported.causal), atol=1e-4, rtol=1e-4)


def test_graph_axes_are_symbolic_and_the_inputs_are_the_models(exported):
    graph = onnx.load(str(exported.folders["none"] / "model.onnx")).graph
    for graph_input in graph.input:
        assert [dim.dim_param for dim in graph_input.type.tensor_type.shape.dim] == ["batch_size", "sequence_length"]
    expected = ["input_ids", "attention_mask"] + (["token_type_ids"] if exported.torch_model.config.model_type == "bert" else [])
    assert [graph_input.name for graph_input in graph.input] == expected
    assert [output.name for output in graph.output] == ["logits"]


@pytest.mark.parametrize("quantization", ["int8-dynamic", "int4"])
def test_quantized_graphs_agree_with_fp32_on_most_predictions(exported, quantization):
    fp32 = hfcompress.from_pretrained(exported.folders["none"])
    quantized = hfcompress.from_pretrained(exported.folders[quantization])
    batch = padded_batch(32, 12, "token_type_ids" in fp32.input_names, seed=7)
    agreement = (predictions(quantized, batch, exported.causal) == predictions(fp32, batch, exported.causal)).float()
    assert agreement.mean() >= 0.75
    model = onnx.load(str(exported.folders[quantization] / "model.onnx"))
    quantized_op = {"int8-dynamic": "MatMulInteger", "int4": "MatMulNBits"}[quantization]
    assert sum(node.op_type == quantized_op for node in model.graph.node) >= LAYERS
    assert logits_node(model).op_type in ("MatMul", "Gemm")  # the task head stays float (no MatMulInteger/NBits)


def test_saved_checkpoint_reloads_to_the_same_outputs_and_reports_sizes(exported):
    batch = padded_batch(3, 9, False, seed=3)
    for quantization, folder in exported.folders.items():
        reloaded = hfcompress.from_pretrained(folder)
        expected_class = ORTModelForCausalLM if exported.causal else ORTModelForSequenceClassification
        assert type(reloaded) is expected_class
        torch.testing.assert_close(reloaded(**batch).logits, exported.in_memory[quantization](**batch).logits,
                                   atol=0, rtol=0)
        assert reloaded.num_parameters() == count_parameters(exported.torch_model)
        assert reloaded.config.vocab_size == VOCAB
    footprint = {q: hfcompress.from_pretrained(folder).get_memory_footprint() for q, folder in exported.folders.items()}
    parameter_bytes = 4 * count_parameters(exported.torch_model)
    assert 0.5 * parameter_bytes < footprint["none"] <= 1.1 * parameter_bytes  # tied weights are stored once
    assert footprint["int8-dynamic"] < 0.6 * footprint["none"]  # tiny models: biases and norms weigh more
    assert footprint["int4"] < footprint["none"]


def test_greedy_generation_through_ort_matches_torch(export_family):
    llama = export_family("llama-gqa")
    prompt = torch.tensor([[5, 17, 42, 8]])
    expected = llama.torch_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                                          min_new_tokens=6, do_sample=False, pad_token_id=0)
    actual = hfcompress.from_pretrained(llama.folders["none"]).generate(prompt, max_new_tokens=6, min_new_tokens=6)
    assert torch.equal(actual, expected)


class SingularValues(torch.nn.Module):
    """A classifier head computing an SVD, which has no ONNX function."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, hidden):
        return self.linear(hidden) + torch.linalg.svd(hidden @ hidden.T)[1][: hidden.shape[0], None]


def test_a_model_that_cannot_export_fails_with_one_line_naming_it_and_the_op(tmp_path):
    torch.manual_seed(0)
    model = _bert().eval()
    model.classifier = SingularValues(model.classifier)
    with pytest.raises(HfCompressError) as error:
        export_to_onnx(model, tmp_path, "svd-bert")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("svd-bert: cannot export to ONNX: ") and "linalg_svd" in message


@pytest.mark.parametrize("options, message", [
    ({"quantization": "int8-dynamic", "block_size": 64}, "block_size only applies to quantization: int4"),
    ({"quantization": "int4", "block_size": 48}, "block_size: Input should be 16, 32, 64, 128 or 256"),
    ({"quantization": "none", "per_channel": False}, "per_channel only applies to quantization: int8-dynamic or"),
])
def test_options_that_do_not_apply_are_refused(options, message):
    with pytest.raises(HfCompressError, match=re.escape(message)):
        parse_variant({"backend": "onnx", **options})


def test_variant_names():
    names = [variant_name(parse_variant({"backend": "onnx", **options})) for options in (
        {"quantization": "none"}, {}, {"quantization": "int8-static"}, {"quantization": "int4"},
        {"quantization": "int4", "block_size": 128, "optimize": False})]
    assert names == ["onnx-fp32", "onnx-int8", "onnx-int8-static", "onnx-int4", "onnx-int4-b128-unfused"]


# ---- the quantize stage ---------------------------------------------------------------------------------------------

FAST_EVAL = {"timing_iterations": 2, "timing_warmup": 1, "throughput_batch_size": 4}


def test_onnx_variants_in_the_quantize_stage_are_evaluated_carded_and_a_failing_one_fails_alone(
        tmp_path, tokenizer, reviews_csv, monkeypatch):
    from onnxruntime.quantization import matmul_nbits_quantizer

    def broken_process(self):
        raise RuntimeError("MatMulNBits: unsupported weight layout\nsecond line")

    monkeypatch.setattr(matmul_nbits_quantizer.MatMulNBitsQuantizer, "process", broken_process)
    teacher = save_tiny_bert(tmp_path / "teacher", tokenizer, hidden_size=64, num_attention_heads=4,
                             intermediate_size=128, id2label={0: "rotten", 1: "fresh"},
                             label2id={"rotten": 0, "fresh": 1})
    variants = [{"backend": "onnx", "quantization": "none"}, {"backend": "onnx", "quantization": "int8-static"},
                {"backend": "onnx", "quantization": "int4"}]
    recipe = classification_recipe(teacher, reviews_csv, tmp_path / "run", stages=[
        {"quantize": {"variants": variants, "tolerance": 1.0, "calibration_samples": 32, "evaluate": FAST_EVAL}},
        {"card": {"model_cards_dir": str(tmp_path / "cards")}}])
    results = run(parse_recipe(recipe))

    metrics = results.stages[0].metrics
    assert list(metrics["failed_variants"]) == ["onnx-int4"]
    reason = metrics["failed_variants"]["onnx-int4"]
    assert "\n" not in reason and "onnxruntime int4 quantization failed: MatMulNBits: unsupported" in reason
    assert str(teacher) in reason
    rows = {row.label: row.metrics for row in results.rows}
    assert list(rows) == ["01-quantize/onnx-fp32", "01-quantize/onnx-int8-static"]
    torch_model = AutoModelForSequenceClassification.from_pretrained(teacher)
    for row in rows.values():
        assert 0.3 < row["accuracy"] < 1.0 and row["num_examples"] > 50
        assert row["num_parameters"] == count_parameters(torch_model)
        assert row["latency_ms_p50"] > 0 and row["memory_footprint_bytes"] > 0
    fp32, int8 = rows["01-quantize/onnx-fp32"], rows["01-quantize/onnx-int8-static"]
    assert int8["size_on_disk_bytes"] < 0.5 * fp32["size_on_disk_bytes"]
    assert metrics["carried_forward"] == "onnx-int8-static"

    final = tmp_path / "run" / results.final_model_dir
    loaded = hfcompress.from_pretrained(final)
    assert isinstance(loaded, ORTModelForSequenceClassification) and loaded.config.id2label[0] == "rotten"
    card = (final / "README.md").read_text()
    assert "onnx" in re.search(r"tags:\n((?:- .*\n)+)", card).group(1)
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert "import torch" not in snippet and "hfcompress" not in snippet.split("print")[0]
    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda repo_id: str(final))
    printed = []
    exec(snippet, {"print": printed.append})  # noqa: S102  (the card's own code, run against the local folder)
    assert printed[0] in ("rotten", "fresh")


def test_onnx_usage_snippet_for_a_causal_lm_runs_with_onnxruntime_alone(export_family, tmp_path, monkeypatch):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from hfcompress.quantization import backend_for

    shutil.copytree(export_family("gpt2").folders["none"], tmp_path, dirs_exist_ok=True)
    words = [f"w{index}" for index in range(VOCAB - 4)] + ["Once", "upon", "a", "time"]
    word_level = Tokenizer(models.WordLevel({word: index for index, word in enumerate(words)}, unk_token="w1"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level)
    tokenizer.save_pretrained(tmp_path)
    code = "\n".join(backend_for({"backend": "onnx"}).usage_code("someone/tiny", "causal-lm", {}))
    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda repo_id: str(tmp_path))
    printed = []
    exec(code, {"print": printed.append})  # noqa: S102
    assert len(printed) == 1 and printed[0].startswith("Once upon a time ") and len(printed[0].split()) == 34


# ---- hfcompress export ----------------------------------------------------------------------------------------------


def test_an_onnx_folder_of_a_pruned_model_names_no_file_it_does_not_ship(export_family):
    pruned = export_family("pruned-bert")
    source = pruned.folders["none"].parent / "source"
    assert "auto_map" in read_json(source / "config.json")  # the torch checkpoint ships modeling_hfcompress.py
    for folder in pruned.folders.values():
        auto_map = read_json(folder / "config.json").get("auto_map", {})
        named = {reference.split(".")[0] for reference in auto_map.values()}
        assert all((folder / f"{module}.py").is_file() for module in named), named
        assert AutoConfig.from_pretrained(folder, trust_remote_code=True).num_labels == 3
    assert "auto_map" in pruned.in_memory["none"].config.to_dict()  # saving leaves the in-memory model alone


def test_cli_exports_a_checkpoint_or_a_runs_final_one_and_refuses_quantized_ones(export_family, tmp_path, capsys):
    from hfcompress.cli import main
    from hfcompress.fileio import write_json

    bert = export_family("bert")
    source = bert.folders["none"].parent / "source"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copytree(source, run_dir / "03-distill")
    write_json(run_dir / "results.json", {"name": "run", "teacher": "t", "final_model_dir": "03-distill",
                                          "task": {"type": "text-classification", "dataset": "csv"}})
    assert main(["export", str(run_dir), "--format", "onnx", "--quantize", "int8", "--output-dir", str(tmp_path / "out")]) == 0
    exported = hfcompress.from_pretrained(tmp_path / "out")
    batch = padded_batch(4, 10, True, seed=11)
    torch.testing.assert_close(exported(**batch).logits, bert.in_memory["int8-dynamic"](**batch).logits, atol=1e-6, rtol=0)
    assert not (tmp_path / "out.partial").exists()

    assert main(["export", str(source), "--output-dir", str(tmp_path / "out")]) == 2
    assert main(["export", str(bert.folders["int4"]), "--output-dir", str(tmp_path / "other")]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert errors[-2] == f"error: {tmp_path / 'out'}: the output directory exists and is not empty"
    assert errors[-1].startswith(f"error: {bert.folders['int4']}: this checkpoint is already quantized (onnx)")


def test_static_int8_on_a_fused_bert_quantizes_the_pooler_too(tmp_path, tokenizer):
    """BERT's pooler reads the [CLS] row of a fused SkipLayerNormalization: the static quantizer must still range it
    (it used to fail: "Unable to get valid quantization scale for input 'select'")."""
    source = save_tiny_bert(tmp_path / "bert", tokenizer, hidden_size=64, num_attention_heads=4, intermediate_size=128)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    calibration = [{name: torch.from_numpy(array) for name, array in token_batch(tokenizer.vocab_size, names, 8, 16,
                                                                                 seed=seed).items()}
                   for seed in range(4)]
    variant = parse_variant({"backend": "onnx", "quantization": "int8-static"})
    model = quantize(source, AutoModelForSequenceClassification, variant, calibration)
    assert model.export_record["fusions"]  # the fused graph is the one quantized
    graph = onnx.load(str(model.model_path)).graph
    producer = {output: node for node in graph.node for output in node.output}
    weight = next(node.output[0] for node in graph.node
                  if node.op_type == "DequantizeLinear" and "pooler.dense.weight" in node.input[0])
    pooler = next(node for node in graph.node if node.op_type in ("Gemm", "MatMul") and weight in node.input)
    assert producer[pooler.input[0]].op_type == "DequantizeLinear"  # its activations are quantized too
    fp32 = quantize(source, AutoModelForSequenceClassification, parse_variant({"backend": "onnx"}))
    batch = {name: torch.from_numpy(array) for name, array in token_batch(tokenizer.vocab_size, names, 16, 16,
                                                                          seed=9).items()}
    assert torch.allclose(model(**batch).logits, fp32(**batch).logits, atol=0.1)
