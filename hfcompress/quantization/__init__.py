"""Quantization and export formats: one module per backend (bitsandbytes, quanto, half, onnx,
compressed-tensors, gptq, gguf) behind one interface.

    variant = parse_variant({"backend": "bitsandbytes", "bits": 8})
    model = quantize(model_dir, AutoModelForSequenceClassification, variant, calibration_batches=None)
    save_quantized(model, out_dir, variant)   # weights, config and quantization.json
    model = load_quantized(out_dir)           # dispatches on quantization.json
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from torch import nn

from ..errors import HfCompressError
from .base import RECORD_FILE, QuantizationBackend, memory_footprint, modules_of_types, read_record, size_on_disk
from .bitsandbytes import BitsAndBytesBackend
from .compressed_tensors import CompressedTensorsBackend
from .gguf import GgufBackend
from .gptq import GptqBackend
from .half import HalfBackend
from .options import (
    BitsAndBytesOptions,
    CompressedTensorsOptions,
    GgufOptions,
    GptqOptions,
    HalfOptions,
    OnnxOptions,
    QuantoOptions,
    VariantOptions,
    parse_variant,
    variant_name,
)
from .onnx import OnnxBackend
from .quanto import QuantoBackend

BACKENDS: dict[str, QuantizationBackend] = {
    backend.name: backend for backend in (BitsAndBytesBackend(), QuantoBackend(), HalfBackend(), OnnxBackend(),
                                          CompressedTensorsBackend(), GptqBackend(), GgufBackend())
}


def get_backend(name: str) -> QuantizationBackend:
    if name not in BACKENDS:
        raise HfCompressError(f"unknown quantization backend {name!r} (known: {', '.join(BACKENDS)})")
    return BACKENDS[name]


def quantize(model_dir: str | Path, model_class, variant,
             calibration_batches: Iterable[dict] | None = None) -> nn.Module:
    """Load the full-precision checkpoint folder `model_dir` quantized as `variant` describes."""
    return get_backend(variant.backend).quantize(Path(model_dir), model_class, variant, calibration_batches)


def save_quantized(model: nn.Module, out_dir: str | Path, variant) -> None:
    """Write the model's weights, config and quantization.json (the tokenizer is the caller's)."""
    get_backend(variant.backend).save(model, Path(out_dir), variant)


def load_quantized(path: str | Path, model_class=None) -> nn.Module:
    """Reload a checkpoint `save_quantized` wrote, with the backend its quantization.json names."""
    if model_class is None:
        from ..modeling import model_class_for

        model_class = model_class_for(path)
    return get_backend(read_record(Path(path))["backend"]).load(Path(path), model_class)


def quantized_modules(model: nn.Module) -> dict[str, str]:
    """Module name -> quantized class name (Linear8bitLt, Linear4bit, Embedding8bit, QLinear, ...)."""
    return modules_of_types(model, [name for backend in BACKENDS.values() for name in backend.quantized_types])


__all__ = [
    "BACKENDS",
    "RECORD_FILE",
    "BitsAndBytesOptions",
    "CompressedTensorsOptions",
    "GgufOptions",
    "GptqOptions",
    "HalfOptions",
    "OnnxOptions",
    "QuantizationBackend",
    "QuantoOptions",
    "VariantOptions",
    "get_backend",
    "load_quantized",
    "memory_footprint",
    "parse_variant",
    "quantize",
    "quantized_modules",
    "save_quantized",
    "size_on_disk",
    "variant_name",
]
