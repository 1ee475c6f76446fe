"""Word embeddings in 8 or 4 bits with bitsandbytes' Embedding8bit / Embedding4bit, and their own weight file.

transformers' BitsAndBytesConfig only replaces Linear layers, and bitsandbytes refuses to `state_dict()` its
quantized embeddings (NotImplementedError). So the quantized embedding is written apart, in
`quantized_embeddings.safetensors`, in the layout bitsandbytes itself uses for quantized Linear weights
(int8 rows + SCB row scales; 4-bit packed data + its packed quant_state), and the main checkpoint is saved
without it.
"""

from __future__ import annotations

from pathlib import Path

import bitsandbytes as bnb
import torch
from safetensors.torch import save_file
from torch import nn

from ..modeling_hfcompress import EMBEDDINGS_KEY, compressed_class
from ..pruning.checkpoint import save_pruned

EMBEDDINGS_FILE = "quantized_embeddings.safetensors"


def quantize_input_embeddings(model, bits: int, quant_type: str = "nf4") -> None:
    """Replace the model's word embeddings by an 8-bit or 4-bit bitsandbytes embedding, in place."""
    source = model.get_input_embeddings()
    quantized = _empty_embedding(source.num_embeddings, source.embedding_dim, bits, quant_type, device="cpu")
    quantized.load_state_dict(source.state_dict())
    quantized.dtype = source.weight.dtype  # what lookups return
    model.set_input_embeddings(quantized.to(source.weight.device))  # bitsandbytes quantizes on .to(device)


def save_with_input_embeddings_apart(model, out_dir: Path) -> None:
    """`save_pretrained` without the quantized word embeddings, which go to EMBEDDINGS_FILE."""
    embedding = model.get_input_embeddings()
    save_file({name: tensor.contiguous().cpu() for name, tensor in _embedding_tensors(embedding).items()},
              str(Path(out_dir) / EMBEDDINGS_FILE))
    setattr(model.config, EMBEDDINGS_KEY, EMBEDDINGS_FILE)
    model.__class__ = compressed_class(type(model))  # its from_pretrained puts the embeddings back
    model.set_input_embeddings(nn.Identity())  # a module without weights: nothing of it in model.safetensors
    try:
        save_pruned(model, out_dir)
    finally:
        model.set_input_embeddings(embedding)


def _empty_embedding(num_embeddings: int, dim: int, bits: int, quant_type: str, device) -> nn.Embedding:
    if bits == 8:
        return bnb.nn.Embedding8bit(num_embeddings, dim, device=device)
    return bnb.nn.Embedding4bit(num_embeddings, dim, quant_type=quant_type, device=device)


def _embedding_tensors(embedding) -> dict[str, torch.Tensor]:
    if isinstance(embedding, bnb.nn.Embedding8bit):
        return {"weight": embedding.weight.data, "weight.SCB": embedding.weight.SCB}
    packed_state = embedding.weight.quant_state.as_dict(packed=True)
    return {"weight": embedding.weight.data, **{f"weight.{key}": value for key, value in packed_state.items()}}
