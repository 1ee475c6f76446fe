"""gguf: a llama.cpp GGUF file (Llama architecture), written with the `gguf` package.

What llama.cpp's convert_hf_to_gguf.py writes for a Llama checkpoint (that script is not in any pip package):
its tensor names (`gguf.get_tensor_name_map`), the query/key rows reordered from transformers' rotary layout
(two halves per head) to GGML's (interleaved pairs), the hyper-parameters (block count, GQA head counts, rope,
norm epsilon), the tokenizer (`gguf.vocab`) with its special tokens and chat template (`gguf.SpecialVocab`).
1-D tensors (norms) stay float32; a matrix whose rows are not whole quantization blocks falls back to float16;
with a 4- or 5-bit type the output head (the token embedding, when the two are tied) is Q8_0, as llama.cpp's
own quantizer keeps the head above 4 bits. The variant is evaluated as transformers loads the file back (`gguf_file=`, dequantized to float),
so its perplexity is the file's.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import gguf
import numpy as np
import torch
from torch import nn

from ..errors import HfCompressError
from ..fileio import read_json
from .base import QuantizationBackend, Requirement, VariantOptions, load_full_precision
from .registry import register_backend

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama",)


class GgufOptions(VariantOptions):
    """A llama.cpp GGUF file (Llama architecture), evaluated as transformers loads it back (`gguf_file=`)."""

    backend: Literal["gguf"]
    type: Literal["f32", "f16", "bf16", "q8_0", "q5_0", "q5_1", "q4_0", "q4_1"] = "q8_0"


@register_backend
class GgufBackend(QuantizationBackend):
    name = "gguf"
    options_model = GgufOptions
    requirements = (Requirement("gguf", "gguf"),)
    runtime_packages = ("gguf",)
    hub_tag = "gguf"
    keeps_per_layer_shapes = False

    def default_name(self) -> str:
        return f"gguf-{self.options.type}"

    @property
    def bits(self) -> int | None:
        digits = "".join(char for char in self.options.type.split("_")[0] if char.isdigit())
        return int(digits) if digits else None

    def check(self, model: nn.Module) -> None:
        super().check(model)
        check_architecture(model.config)

    def quantize(self, model_dir: Path, model_class, calibration_batches: Iterable[dict] | None = None) -> nn.Module:
        """Write the GGUF file (into a temporary folder, removed with the model) and load it back."""
        self.check_checkpoint(model_dir)
        model = load_full_precision(model_dir, model_class, dtype=torch.float32)
        folder = Path(tempfile.mkdtemp(prefix="hfcompress-gguf-"))
        path = folder / gguf_file_name(self.options)
        try:
            write_gguf(model, Path(model_dir), path, self.options.type)
            loaded = load_gguf(folder, path.name, model_class)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        loaded.gguf_export = path
        weakref.finalize(loaded, shutil.rmtree, folder, True)
        return loaded

    def save(self, model: nn.Module, out_dir: Path) -> None:
        exported = getattr(model, "gguf_export", None)
        if exported is None or not Path(exported).is_file():
            raise HfCompressError("gguf: save takes the model that quantize() returned (it carries the GGUF file it "
                                  "wrote)")
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(exported, out_dir / exported.name)
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["architectures"] = [type(model).__name__]
        model.config.__class__.from_dict(config).save_pretrained(out_dir)  # tells model_class_for the architecture
        self.write_record(out_dir, gguf_file=exported.name)

    def load(self, path: Path, model_class) -> nn.Module:
        self.require_packages()
        return load_gguf(Path(path), gguf_file_name(self.options), model_class)

    def estimated_size(self, model: nn.Module) -> int | None:
        """The tensors as `write_gguf` types them (see `tensor_type`), in GGML's block sizes; the file also holds
        the tokenizer (vocabulary and merges, about a megabyte for a 49k-token BPE), which is not counted."""
        qtype = getattr(gguf.GGMLQuantizationType, self.options.type.upper())
        total, tied = 0, _tied(model)
        for name, _, tensor in named_tensors(model):  # shapes only: works on the meta device
            block_size, type_size = gguf.GGML_QUANT_SIZES[tensor_type(name, tensor, qtype, tied)]
            total += tensor.numel() // block_size * type_size
        return total

    def loading_arguments(self, record: dict) -> list[str]:
        return [f'gguf_file="{record["gguf_file"]}"']

    def usage_notes(self, record: dict) -> list[str]:
        return [f"The weights are one llama.cpp GGUF file (`{record['gguf_file']}`): llama.cpp runs it as it is; "
                "transformers dequantizes it to float when loading (needs `pip install gguf`)."]


def check_architecture(config) -> None:
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise HfCompressError(f"gguf export writes Llama-architecture models ({', '.join(SUPPORTED_MODEL_TYPES)}); "
                              f"this one is {config.model_type!r}")
    check_rope(config)


def gguf_file_name(variant: GgufOptions) -> str:
    return f"model-{variant.type}.gguf"


def load_gguf(folder: Path, file_name: str, model_class) -> nn.Module:
    """transformers' GGUF loader: every tensor dequantized to float32."""
    return model_class.from_pretrained(str(folder), gguf_file=file_name, dtype=torch.float32).eval()


# ------------------------------------------------------------------------------------------------ writing the file


def write_gguf(model: nn.Module, tokenizer_dir: Path, path: Path, type_name: str) -> None:
    """Write `model` (a float LlamaForCausalLM) and the tokenizer in `tokenizer_dir` as one GGUF file."""
    config = model.config
    check_architecture(config)
    file_type = gguf.LlamaFileType[{"f32": "ALL_F32"}.get(type_name, f"MOSTLY_{type_name.upper()}")]
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(Path(config.name_or_path or path.stem).name)
    write_hyperparameters(writer, config)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_tokenizer(writer, tokenizer_dir, config.vocab_size)
    for name, data, qtype in gguf_tensors(model, getattr(gguf.GGMLQuantizationType, type_name.upper())):
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def check_rope(config) -> None:
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise HfCompressError(f"gguf export writes plain rotary embeddings; this model uses rope_type "
                              f"{rope['rope_type']!r}")


def write_hyperparameters(writer, config) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)  # after layer pruning: the blocks that are left
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float((getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    if head_dim * config.num_attention_heads != config.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)


def write_tokenizer(writer, tokenizer_dir: Path, vocab_size: int) -> None:
    """Tokens, their types (and scores), merges, special token ids and the chat template, as gguf.vocab reads them
    from tokenizer.json / tokenizer_config.json / chat_template.jinja; padded to the model's vocabulary size."""
    vocab = None
    for vocab_class in (gguf.vocab.BpeVocab, gguf.vocab.LlamaHfVocab):
        try:
            vocab = vocab_class(tokenizer_dir)
            break
        except (FileNotFoundError, ValueError, TypeError):
            continue
    if vocab is None:
        raise HfCompressError(f"{tokenizer_dir}: gguf export needs a tokenizer.json with a byte-level BPE (GPT-2 "
                              f"style) or a Llama SentencePiece-style BPE tokenizer")
    tokens, scores, types = [], [], []
    for text, score, token_type in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(token_type)
    if len(tokens) > vocab_size:
        raise HfCompressError(f"{tokenizer_dir}: the tokenizer has {len(tokens)} tokens, the model's embedding "
                              f"only {vocab_size}")
    for index in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{index}]")
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model(vocab.tokenizer_model)
    if vocab.tokenizer_model == "gpt2":
        writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer_dir))
    else:
        writer.add_token_scores(scores)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(tokenizer_dir, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=len(tokens)).add_to_gguf(
        writer, quiet=True)


def pre_tokenizer_name(tokenizer_dir: Path) -> str:
    """llama.cpp's name for the way the text is split before BPE (its converter recognises it by a hash of the
    tokenization of a test text; the common byte-level layouts are recognised here by their tokenizer.json)."""
    pre = read_json(tokenizer_dir / "tokenizer.json").get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    logger.warning("%s: pre-tokenizer %s not recognised; llama.cpp will split text with its default rule",
                   tokenizer_dir, kinds)
    return "default"


def gguf_tensors(model: nn.Module, qtype) -> Iterable[tuple[str, np.ndarray, object]]:
    """(llama.cpp name, float32 array, GGML type) for every tensor of the model."""
    config, tied = model.config, _tied(model)
    for name, hf_name, tensor in named_tensors(model):
        data = tensor.detach().float().cpu().numpy()
        if hf_name.endswith("self_attn.q_proj.weight"):
            data = rotary_rows_to_ggml(data, config.num_attention_heads)
        elif hf_name.endswith("self_attn.k_proj.weight"):
            data = rotary_rows_to_ggml(data, config.num_key_value_heads)
        yield name, data, tensor_type(name, data, qtype, tied)


def named_tensors(model: nn.Module) -> Iterable[tuple[str, str, torch.Tensor]]:
    """(llama.cpp name, transformers name, tensor) of every tensor the file holds."""
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    tied = _tied(model)
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reads the output head from token_embd when output.weight is absent
        name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise HfCompressError(f"gguf export: no llama.cpp name for the tensor {hf_name}")
        yield name, hf_name, tensor


def _tied(model: nn.Module) -> bool:
    return bool(getattr(model.config, "tie_word_embeddings", False))


def rotary_rows_to_ggml(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf `permute`: per head, rows (first half, second half) -> interleaved pairs."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def tensor_type(name: str, data: np.ndarray | torch.Tensor, qtype, tied: bool):
    """The GGML type `write_gguf` stores the tensor in (only its shape is read)."""
    types = gguf.GGMLQuantizationType
    if data.ndim == 1 or qtype == types.F32:
        return types.F32
    if qtype in (types.F16, types.BF16):
        return qtype
    block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
    if data.shape[-1] % block_size:
        return types.F16
    is_head = name == "output.weight" or (tied and name == "token_embd.weight")
    if is_head and qtype in (types.Q4_0, types.Q4_1, types.Q5_0, types.Q5_1):
        return types.Q8_0
    return qtype
