"""bitsandbytes on a model that is already built, through transformers' own bitsandbytes integration.

`from_pretrained(..., quantization_config=BitsAndBytesConfig(...))` builds the model from config.json, which
cannot describe a pruned model whose blocks differ in shape. For such a checkpoint the model is built first
(`load_pruned`, or an empty skeleton sliced to the recorded shapes), and then transformers' bitsandbytes quantizer
does to it what `from_pretrained` does between building the model and loading its weights:

- `preprocess_model` swaps the Linear layers (all but the skipped ones) for empty bitsandbytes layers
  (`replace_with_bnb_linear`);
- its conversion ops give each of them its weight: `Bnb8bitQuantize` / `Bnb4bitQuantize` quantize a float weight
  (bitsandbytes quantizes when the parameter is moved to a device, the CPU included), `Bnb8bitDeserialize` /
  `Bnb4bitDeserialize` rebuild a saved one from its int8 / packed 4-bit data and statistics;
- `postprocess_model` puts the BitsAndBytesConfig in the model's config (so `save_pretrained` writes it to
  config.json) and marks the model quantized, and `model.hf_quantizer` lets `save_pretrained` save it.

The layers, weights and saved tensors are therefore the ones `from_pretrained` produces for an unpruned model.
"""

from __future__ import annotations

from pathlib import Path

import bitsandbytes as bnb
import torch
from torch import nn
from transformers import AutoConfig
from transformers.quantizers import AutoHfQuantizer

from ..errors import HfCompressError
from .base import check_loaded, empty_model, read_weights

BNB_LINEAR_TYPES = (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)


def quantize_model(model: nn.Module, quantization_config, device: torch.device) -> nn.Module:
    """Quantize the Linear layers of a full-precision model in place, as `from_pretrained` would have."""
    quantizer = AutoHfQuantizer.from_config(quantization_config, pre_quantized=False)
    float_modules = dict(model.named_modules())
    quantizer.preprocess_model(model=model, dtype=model.dtype, device_map={"": device})
    quantize_op = quantizer.get_quantize_ops()
    for name, module in _bnb_linears(model):
        source = float_modules[name]
        weight_name = f"{name}.weight"
        quantized = quantize_op.convert({weight_name: source.weight.detach().to(device)}, model=model,
                                        full_layer_name=weight_name)
        module.weight = quantized[weight_name]
        if source.bias is not None:
            module.bias = nn.Parameter(source.bias.detach().to(device), requires_grad=False)
    return _finish(model, quantizer)


def load_prequantized(path: Path, model_class, device: torch.device, embeddings_apart: bool = False) -> nn.Module:
    """Rebuild a pruned bitsandbytes checkpoint: pruned skeleton, bitsandbytes layers, then the saved tensors.

    `embeddings_apart`: the word embeddings were quantized too and saved in their own file (bnb_embeddings.py).
    """
    config = AutoConfig.from_pretrained(str(path))
    quantization_config = getattr(config, "quantization_config", None)
    if not quantization_config:
        raise HfCompressError(f"{path}: config.json has no bitsandbytes quantization_config")
    del config.quantization_config  # the skeleton is a float model; the quantizer swaps its layers below
    model = empty_model(path, model_class, config)
    quantizer = AutoHfQuantizer.from_config(quantization_config, pre_quantized=True)
    quantizer.preprocess_model(model=model, dtype=model.dtype, device_map={"": device})

    state_dict = read_weights(path)
    deserialize = quantizer.get_load_operations()["deserialize"](quantizer)
    for name, module in _bnb_linears(model):
        prefix = f"{name}."
        saved = {key.removeprefix(prefix): state_dict.pop(key) for key in list(state_dict)
                 if key.startswith(prefix) and key != f"{prefix}bias"}
        if "weight" not in saved:
            raise HfCompressError(f"{path}: the checkpoint lacks the quantized weight of {name}")
        module.weight = deserialize.convert({key: [value] for key, value in saved.items()}, model=model,
                                            full_layer_name=f"{prefix}weight")["weight"]
    result = model.load_state_dict(state_dict, strict=False, assign=True)
    if result.unexpected_keys:
        raise HfCompressError(f"{path}: tensors that do not belong to the model: {result.unexpected_keys[:3]}")
    if embeddings_apart:
        from .bnb_embeddings import attach_saved_input_embeddings

        attach_saved_input_embeddings(model, path)
    model.tie_weights()
    check_loaded(model, path)
    if device.type != "cpu":
        model.to(device)
    return _finish(model, quantizer)


def _finish(model: nn.Module, quantizer) -> nn.Module:
    model.hf_quantizer = quantizer
    quantizer.postprocess_model(model)
    return model.eval()


def _bnb_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, BNB_LINEAR_TYPES)]
