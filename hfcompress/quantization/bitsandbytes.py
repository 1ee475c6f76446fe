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
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn
from transformers import BitsAndBytesConfig
from transformers.quantizers.quantizers_utils import should_convert_module

from ..errors import HfCompressError, first_line
from ..modeling_hfcompress import compute_4bit_as_configured
from .base import OptionError, QuantizationBackend, Requirement, VariantOptions, estimate_checkpoint_bytes, load_full_precision
from .base import save_pruned
from .registry import register_backend

# LLM.int8() casts fp32 inputs to fp16 by design; bitsandbytes warns about it at every layer of every forward.
warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast from")
BLOCK_SIZE_4BIT = 64  # bitsandbytes' default 4-bit block (weights per absmax)
FOUR_BIT_ONLY = ("quant_type", "double_quant", "compute_dtype")
EIGHT_BIT_ONLY = ("llm_int8_threshold",)


class BitsAndBytesOptions(VariantOptions):
    """LLM.int8() (bits 8) or QLoRA-style NF4/FP4 (bits 4) Linear layers, through transformers' BitsAndBytesConfig."""

    backend: Literal["bitsandbytes"]
    bits: Literal[8, 4]
    llm_int8_threshold: float = Field(6.0, ge=0)  # 8-bit: inputs above it take the fp16 outlier path
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = False  # 4-bit: quantize the per-block scales too
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    skip_modules: list[str] = Field(default_factory=list)  # kept in full precision, besides the task head
    quantize_embeddings: bool = False  # the word embeddings too (bitsandbytes Embedding8bit / Embedding4bit)

    @model_validator(mode="after")
    def _only_keys_of_this_bit_width(self):
        given = self.options_given(FOUR_BIT_ONLY if self.bits == 8 else EIGHT_BIT_ONLY)
        if given:
            raise ValueError(f"{', '.join(given)} only applies to bits: {4 if self.bits == 8 else 8}")
        return self


@register_backend
class BitsAndBytesBackend(QuantizationBackend):
    name = "bitsandbytes"
    options_model = BitsAndBytesOptions
    requirements = (Requirement("bitsandbytes", "bitsandbytes"),)
    runtime_packages = ("bitsandbytes",)
    hub_tag = "bitsandbytes"
    quantized_types = ("Linear8bitLt", "Linear4bit", "Embedding8bit", "Embedding4bit")

    def default_name(self) -> str:
        options = self.options
        name = "bnb-int8" if options.bits == 8 else f"bnb-{options.quant_type}"
        name += "-dq" if options.bits == 4 and options.double_quant else ""
        return name + ("-emb" if options.quantize_embeddings else "")

    @property
    def bits(self) -> int:
        return self.options.bits

    def check(self, model: nn.Module) -> None:
        super().check(model)
        if self.options.quantize_embeddings:
            check_embeddings_untied(model)

    def quantize(self, model_dir: Path, model_class, calibration_batches: Iterable[dict] | None = None) -> nn.Module:
        self.require_packages()
        from .bnb_embeddings import quantize_input_embeddings  # imports bitsandbytes, which is optional

        config = bitsandbytes_config(self.options, skip=self.unquantized_modules_of(model_dir, model_class))
        model = self._guarded(model_dir, lambda: load_full_precision(
            model_dir, model_class, quantization_config=config, device_map=_device_map()))
        if self.options.quantize_embeddings:
            check_embeddings_untied(model)
            quantize_input_embeddings(model, self.options.bits, self.options.quant_type)
        return model

    def save(self, model: nn.Module, out_dir: Path) -> None:
        from .bnb_embeddings import save_with_input_embeddings_apart

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if self.options.quantize_embeddings:
            save_with_input_embeddings_apart(model, out_dir)
        else:
            save_pruned(model, out_dir)
        self.write_record(out_dir)

    def load(self, path: Path, model_class) -> nn.Module:
        self.require_packages()
        return self._guarded(path, lambda: load_full_precision(path, model_class, device_map=_device_map()))

    def estimated_size(self, model: nn.Module) -> int:
        """int8: one byte per weight and a float32 scale per row; 4-bit: half a byte per weight and an absmax per
        block of 64 (a byte when double-quantized, plus a float32 per 256 blocks). Biases and everything else stay
        float32."""
        embeddings = model.get_input_embeddings() if self.options.quantize_embeddings else None
        skip = self.unquantized_modules(model)

        def price(name: str, module: nn.Module) -> int | None:
            quantized = module is embeddings or (isinstance(module, nn.Linear) and should_convert_module(name, skip))
            if not quantized:
                return None
            bias = module.bias.numel() * 4 if getattr(module, "bias", None) is not None else 0
            return bias + _quantized_weight_bytes(module.weight.shape, self.options)

        return estimate_checkpoint_bytes(model, price)

    def _guarded(self, path: Path, build) -> nn.Module:
        """Build the model; bitsandbytes' "cannot run here" errors become one HfCompressError line."""
        try:
            model = build()
        except (ImportError, NotImplementedError) as error:
            raise HfCompressError(f"bitsandbytes cannot run on this machine ({path}): {first_line(error)}") from None
        compute_4bit_as_configured(model)
        return model.eval()

    def loading_arguments(self, record: dict) -> list[str]:
        return ['device_map="cpu"']

    def usage_notes(self, record: dict) -> list[str]:
        notes = []
        if record.get("quantize_embeddings") is True:
            notes.append("The word embeddings are quantized too (bitsandbytes `Embedding8bit`/`Embedding4bit`) and "
                         "stored in a file of their own, `quantized_embeddings.safetensors`.")
        notes.append("The `BitsAndBytesConfig` is stored in `config.json` (`quantization_config`), so "
                     "`from_pretrained` re-creates the quantized layers; it needs `pip install bitsandbytes`. "
                     'On a GPU use `device_map="auto"` instead of `"cpu"`.')
        return notes


def check_embeddings_untied(model: nn.Module) -> None:
    output = model.get_output_embeddings()
    if output is not None and output.weight is model.get_input_embeddings().weight:
        raise OptionError("quantize_embeddings", "this model ties its word embeddings to its output layer "
                          "(tie_word_embeddings), which stays in full precision; quantizing only the input side would "
                          "store the matrix twice")


def bitsandbytes_config(options: BitsAndBytesOptions, skip: list[str]) -> BitsAndBytesConfig:
    if options.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=options.llm_int8_threshold,
                                  llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=options.quant_type,
        bnb_4bit_use_double_quant=options.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, options.compute_dtype),
        llm_int8_skip_modules=skip,  # transformers reads the skip list from this key for 4-bit too
    )


def _quantized_weight_bytes(shape, options: BitsAndBytesOptions) -> int:
    rows, values = shape[0], shape.numel()
    if options.bits == 8:
        return values + 4 * rows
    blocks = -(-values // BLOCK_SIZE_4BIT)
    scales = blocks + 4 * -(-blocks // 256) + 4 * 256 if options.double_quant else 4 * blocks
    return -(-values // 2) + scales + 4 * 16  # + the 16-level code book


def _device_map():
    return {"": torch.cuda.current_device()} if torch.cuda.is_available() else "cpu"
