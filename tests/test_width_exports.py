"""Hidden-pruned models through every export: ONNX (fp32 matches torch; int4 takes every linear and embedding table
once the widths are whole blocks), GGUF (the head size no longer hidden / heads: llama.cpp's key length) and
compressed-tensors (groups that divide every new width; plain transformers loads it)."""

from __future__ import annotations

import gguf
import onnx
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
)

from hfcompress.pruning import hidden_importance, needs_structure_record, prune_hidden, save_pruned, select_hidden
from hfcompress.errors import HfCompressError
from hfcompress.quantization import parse_variant, quantize, save_quantized, variant_name


VOCAB = 640


def random_batch(batch_size: int = 2, length: int = 9, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch_size, length), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def pruned_to(model, size: int):
    """`model` with its hidden size cut to `size` by activation importance on a random batch."""
    batch = random_batch(4, 16, seed=1)
    channels = select_hidden(hidden_importance(model, [batch]), size=size)
    return prune_hidden(model, channels)


def hidden_pruned_bert(folder):
    """Hidden 64 -> 32 with its 4 heads of 16 in each block: the config says 2 heads, the record says 4."""
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
        max_position_embeddings=64, num_labels=2)).eval()
    save_pruned(pruned_to(model, 32), folder)
    return model


def hidden_pruned_llama(folder, tokenizer=None):
    """Hidden 64 -> 32, 4 query heads of 16 (attention 64 wide), tied embeddings: a plain LlamaConfig."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True, bos_token_id=1,
        eos_token_id=2)).eval()
    save_pruned(pruned_to(model, 32), folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return model


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def weight_matmuls(graph: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """Names of MatMul nodes whose weight is a constant, and of the MatMulNBits nodes."""
    constants = {tensor.name for tensor in graph.graph.initializer}
    matmuls = [node.name for node in graph.graph.node if node.op_type == "MatMul" and node.input[1] in constants]
    return matmuls, [node.name for node in graph.graph.node if node.op_type == "MatMulNBits"]


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_onnx_int4_takes_every_layer_and_embedding_of_a_hidden_pruned_model(family, tmp_path):
    source = tmp_path / "source"
    model = hidden_pruned_bert(source) if family == "bert" else hidden_pruned_llama(source)
    auto_class = AutoModelForSequenceClassification if family == "bert" else AutoModelForCausalLM
    assert needs_structure_record(model) == (family == "bert")
    batch = random_batch()

    fp32 = quantize(source, auto_class, parse_variant({"backend": "onnx", "quantization": "none"}))
    torch.testing.assert_close(logits(fp32, batch), logits(model, batch), atol=1e-4, rtol=1e-4)

    variant = parse_variant({"backend": "onnx", "quantization": "int4", "block_size": 16,
                             "quantize_embeddings": True, "optimize": False})
    int4 = quantize(source, auto_class, variant)
    save_quantized(int4, tmp_path / "int4", variant)
    graph = onnx.load(str(tmp_path / "int4" / "model.onnx"))
    float_matmuls, four_bit = weight_matmuls(graph)
    # 7 linears per block (q, k, v, o and 2 FFN for BERT + its pooler; q, k, v, o, gate, up, down for Llama); the
    # task head stays float32 as in every backend (BERT's classifier a Gemm, Llama's tied head a MatMul over the
    # transposed table): no linear with a constant weight is left in float32
    assert len(four_bit) == (2 * 6 + 1 if family == "bert" else 2 * 7)
    assert float_matmuls == []
    quantized_tables = [node for node in graph.graph.node if node.op_type == "GatherBlockQuantized"]
    # word, position and token-type tables; a word table tied to the LM head stays float32 with the head
    assert len(quantized_tables) == (3 if family == "bert" else 0)
    agreement = (logits(int4, batch).argmax(-1) == logits(model, batch).argmax(-1)).float().mean()
    assert agreement >= 0.5  # random tiny weights at 4 bits: the outputs still follow the float model's


def test_gguf_of_a_hidden_pruned_llama_names_its_head_size_and_loads_back(bpe_tokenizer, tmp_path):  # noqa: F811
    source = tmp_path / "source"
    model = hidden_pruned_llama(source, bpe_tokenizer)
    variant = parse_variant({"backend": "gguf", "type": "f16"})
    save_quantized(quantize(source, AutoModelForCausalLM, variant), tmp_path / "gguf", variant)

    reader = gguf.GGUFReader(tmp_path / "gguf" / "model-f16.gguf")
    fields = {name: field.contents() for name, field in reader.fields.items()}
    assert (fields["llama.embedding_length"], fields["llama.attention.head_count"],
            fields["llama.attention.key_length"], fields["llama.attention.value_length"]) == (32, 4, 16, 16)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "gguf", gguf_file="model-f16.gguf",
                                                    dtype=torch.float32)
    batch = random_batch()
    torch.testing.assert_close(logits(reloaded, batch), logits(model, batch), atol=2e-2, rtol=0)


def test_compressed_tensors_of_a_hidden_pruned_llama_loads_with_plain_transformers(tmp_path):
    source = tmp_path / "source"
    hidden_pruned_llama(source)
    variant = parse_variant({"backend": "compressed-tensors", "bits": 8, "group_size": 32})
    quantized = quantize(source, AutoModelForCausalLM, variant)
    save_quantized(quantized, tmp_path / "ct", variant)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)
    assert reloaded.config.hidden_size == 32
    batch = random_batch()
    torch.testing.assert_close(logits(reloaded, batch), logits(quantized, batch), atol=1e-4, rtol=0)


def test_quantize_embeddings_is_an_int4_option_and_names_the_variant():
    variant = parse_variant({"backend": "onnx", "quantization": "int4", "quantize_embeddings": True, "optimize": False})
    assert variant_name(variant) == "onnx-int4-emb-unfused"
    with pytest.raises(HfCompressError, match="quantize_embeddings only applies to quantization: int4"):
        parse_variant({"backend": "onnx", "quantization": "int8-dynamic", "quantize_embeddings": True})
