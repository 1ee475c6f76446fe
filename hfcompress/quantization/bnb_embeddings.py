"""Word embeddings in 8 or 4 bits with bitsandbytes' Embedding8bit / Embedding4bit, and their own weight file.

transformers' BitsAndBytesConfig only replaces Linear layers, and bitsandbytes refuses to `state_dict()` its
quantized embeddings (NotImplementedError). So the quantized embedding is written apart, in
`quantized_embeddings.safetensors`, in the layout bitsandbytes itself uses for quantized Linear weights
(int8 rows + SCB row scales; 4-bit packed data + its packed quant_state), and the main checkpoint is saved
without it.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

import bitsandbytes as bnb
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import HfCompressError

EMBEDDINGS_FILE = "quantized_embeddings.safetensors"


def quantize_input_embeddings(model, bits: int, quant_type: str = "nf4") -> None:
    """Replace the model's word embeddings by an 8-bit or 4-bit bitsandbytes embedding, in place."""
    source = model.get_input_embeddings()
    output = model.get_output_embeddings()
    if output is not None and output.weight is source.weight:
        raise HfCompressError("quantize_embeddings: this model ties its word embeddings to its output layer "
                              "(tie_word_embeddings), which stays in full precision; quantizing only the input side "
                              "would store the matrix twice")
    quantized = _empty_embedding(source.num_embeddings, source.embedding_dim, bits, quant_type, device="cpu")
    quantized.load_state_dict(source.state_dict())
    quantized.dtype = source.weight.dtype  # what lookups return
    model.set_input_embeddings(quantized.to(source.weight.device))  # bitsandbytes quantizes on .to(device)


def save_with_input_embeddings_apart(model, out_dir: Path) -> None:
    """`save_pretrained` without the quantized word embeddings, which go to EMBEDDINGS_FILE."""
    embedding = model.get_input_embeddings()
    save_file({name: tensor.contiguous().cpu() for name, tensor in _embedding_tensors(embedding).items()},
              str(Path(out_dir) / EMBEDDINGS_FILE))
    model.set_input_embeddings(nn.Identity())  # a module without weights: nothing of it in model.safetensors
    try:
        model.save_pretrained(out_dir)
    finally:
        model.set_input_embeddings(embedding)


def load_with_input_embeddings_apart(path: Path, model_class, **kwargs):
    """`from_pretrained` a folder that `save_with_input_embeddings_apart` wrote, then put its embeddings back."""
    with _quiet_missing_weights_report():  # the word embeddings are missing by design
        model, info = model_class.from_pretrained(str(path), output_loading_info=True, **kwargs)
    placeholder = model.get_input_embeddings()
    expected_missing = {f"{name}.weight" for name, module in model.named_modules() if module is placeholder}
    if set(info["missing_keys"]) != expected_missing:
        raise HfCompressError(f"{path}: checkpoint weights missing besides the word embeddings: "
                              f"{sorted(set(info['missing_keys']) - expected_missing)}")
    attach_saved_input_embeddings(model, path)
    return model


def attach_saved_input_embeddings(model, path: Path) -> None:
    """Replace the model's (placeholder) word embeddings by the quantized ones saved in EMBEDDINGS_FILE.

    The placeholder gives the shape and lookup dtype; it may sit on the meta device, and then the embeddings stay
    on the CPU (the caller moves the model).
    """
    placeholder = model.get_input_embeddings()
    device = placeholder.weight.device if placeholder.weight.device.type != "meta" else torch.device("cpu")
    tensors = load_file(str(Path(path) / EMBEDDINGS_FILE))
    embedding = _embedding_from_tensors(tensors, like=placeholder)
    model.set_input_embeddings(embedding.to(device))


def _empty_embedding(num_embeddings: int, dim: int, bits: int, quant_type: str, device) -> nn.Embedding:
    if bits == 8:
        return bnb.nn.Embedding8bit(num_embeddings, dim, device=device)
    return bnb.nn.Embedding4bit(num_embeddings, dim, quant_type=quant_type, device=device)


def _embedding_tensors(embedding) -> dict[str, torch.Tensor]:
    if isinstance(embedding, bnb.nn.Embedding8bit):
        return {"weight": embedding.weight.data, "weight.SCB": embedding.weight.SCB}
    packed_state = embedding.weight.quant_state.as_dict(packed=True)
    return {"weight": embedding.weight.data, **{f"weight.{key}": value for key, value in packed_state.items()}}


def _embedding_from_tensors(tensors: dict[str, torch.Tensor], like: nn.Embedding):
    num_embeddings, dim = like.num_embeddings, like.embedding_dim
    data = tensors.pop("weight")
    if data.dtype == torch.int8:
        embedding = bnb.nn.Embedding8bit(num_embeddings, dim, device="meta")
        embedding.weight = bnb.nn.Int8Params(data, requires_grad=False, has_fp16_weights=False,
                                             CB=data, SCB=tensors["weight.SCB"])
    else:
        embedding = bnb.nn.Embedding4bit(num_embeddings, dim, device="meta")
        quant_state = {key.removeprefix("weight."): value for key, value in tensors.items()}
        embedding.weight = bnb.nn.Params4bit.from_prequantized(data, quant_state, device="cpu", module=embedding)
    embedding.dtype = like.weight.dtype  # what lookups return
    return embedding


@contextmanager
def _quiet_missing_weights_report():
    """Drop transformers' warnings while loading (a filter, not a level: a raised level makes it log others)."""
    report_logger = logging.getLogger("transformers.modeling_utils")
    only_errors = _OnlyErrors()
    report_logger.addFilter(only_errors)
    try:
        yield
    finally:
        report_logger.removeFilter(only_errors)


class _OnlyErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR
