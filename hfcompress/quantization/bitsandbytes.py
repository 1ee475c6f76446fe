"""bitsandbytes: LLM.int8() and NF4/FP4 Linear layers, loaded through transformers' BitsAndBytesConfig.

The quantization config is stored in config.json, so plain `from_pretrained` reloads the checkpoint (with
`trust_remote_code=True` for a model pruned into blocks of different shapes, whose modeling file cuts the blocks
before transformers swaps in the bitsandbytes layers), unless the word embeddings are quantized too (see
bnb_embeddings.py).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from transformers import BitsAndBytesConfig

from ..errors import HfCompressError, first_line
from ..modeling_hfcompress import compute_4bit_as_configured
from .base import (
    QuantizationBackend,
    estimate_checkpoint_bytes,
    load_full_precision,
    save_pruned,
    task_head_names,
    write_record,
)
from .options import BitsAndBytesOptions


# LLM.int8() casts fp32 inputs to fp16 by design; bitsandbytes warns about it at every layer of every forward.
warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast from")
BLOCK_SIZE_4BIT = 64  # bitsandbytes' default 4-bit block (weights per absmax)


class BitsAndBytesBackend(QuantizationBackend):
    name = "bitsandbytes"
    package = pip_name = "bitsandbytes"
    quantized_types = ("Linear8bitLt", "Linear4bit", "Embedding8bit", "Embedding4bit")

    def quantize(self, model_dir: Path, model_class, variant: BitsAndBytesOptions,
                 calibration_batches: Iterable[dict] | None = None) -> nn.Module:
        self.require_package()
        config = bitsandbytes_config(variant, skip=task_head_names(model_dir, model_class) + variant.skip_modules)
        model = self._guarded(model_dir, lambda: load_full_precision(
            model_dir, model_class, quantization_config=config, device_map=_device_map()))
        if variant.quantize_embeddings:
            from .bnb_embeddings import quantize_input_embeddings

            quantize_input_embeddings(model, variant.bits, variant.quant_type)
        return model

    def save(self, model: nn.Module, out_dir: Path, variant: BitsAndBytesOptions) -> None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if variant.quantize_embeddings:
            from .bnb_embeddings import save_with_input_embeddings_apart

            save_with_input_embeddings_apart(model, out_dir)
        else:
            save_pruned(model, out_dir)
        write_record(out_dir, variant)

    def load(self, path: Path, model_class) -> nn.Module:
        self.require_package()
        return self._guarded(path, lambda: load_full_precision(path, model_class, device_map=_device_map()))

    def estimated_size(self, model: nn.Module, variant: BitsAndBytesOptions, skip: list[str]) -> int:
        """int8: one byte per weight and a float32 scale per row; 4-bit: half a byte per weight and an absmax per
        block of 64 (a byte when double-quantized, plus a float32 per 256 blocks). Biases and everything else stay
        float32."""
        from transformers.quantizers.quantizers_utils import should_convert_module

        embeddings = model.get_input_embeddings() if variant.quantize_embeddings else None

        def price(name: str, module: nn.Module) -> int | None:
            quantized = module is embeddings or (isinstance(module, nn.Linear) and should_convert_module(name, skip))
            if not quantized:
                return None
            bias = module.bias.numel() * 4 if getattr(module, "bias", None) is not None else 0
            return bias + _quantized_weight_bytes(module.weight.shape, variant)

        return estimate_checkpoint_bytes(model, price)

    def _guarded(self, path: Path, build) -> nn.Module:
        """Build the model; bitsandbytes' "cannot run here" errors become one HfCompressError line."""
        try:
            model = build()
        except (ImportError, NotImplementedError) as error:
            raise HfCompressError(f"bitsandbytes cannot run on this machine ({path}): {first_line(error)}") from None
        compute_4bit_as_configured(model)
        return model.eval()


def bitsandbytes_config(variant: BitsAndBytesOptions, skip: list[str]) -> BitsAndBytesConfig:
    if variant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=variant.llm_int8_threshold,
                                  llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=variant.quant_type,
        bnb_4bit_use_double_quant=variant.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, variant.compute_dtype),
        llm_int8_skip_modules=skip,  # transformers reads the skip list from this key for 4-bit too
    )


def _quantized_weight_bytes(shape, variant: BitsAndBytesOptions) -> int:
    rows, values = shape[0], shape.numel()
    if variant.bits == 8:
        return values + 4 * rows
    blocks = -(-values // BLOCK_SIZE_4BIT)
    scales = blocks + 4 * -(-blocks // 256) + 4 * 256 if variant.double_quant else 4 * blocks
    return -(-values // 2) + scales + 4 * 16  # + the 16-level code book


def _device_map():
    return {"": torch.cuda.current_device()} if torch.cuda.is_available() else "cpu"
