"""Quantization and export formats: one registered class per backend (bitsandbytes, quanto, half, onnx,
compressed-tensors, gptq, gguf) that owns its format end to end (see base.py).

    variant = parse_variant({"backend": "bitsandbytes", "bits": 8})
    model = quantize(model_dir, AutoModelForSequenceClassification, variant, calibration_batches=None)
    save_quantized(model, out_dir, variant)   # weights, config and quantization.json
    model = load_quantized(out_dir)           # dispatches on quantization.json

A new format is one file: an options model and a `@register_backend` subclass of `QuantizationBackend`.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable
from pathlib import Path

from torch import nn
from transformers import AutoTokenizer

from ..errors import HfCompressError
from ..run_dir import RunDir
from ..sources import model_class_for
# The built-in backends register themselves on import, in the order recipes and messages list them.
from . import bitsandbytes, quanto, half, onnx, compressed_tensors, gptq, gguf  # noqa: F401, I001
from .base import RECORD_FILE, OptionError, QuantizationBackend, Requirement, VariantOptions, memory_footprint, modules_of_types
from .base import read_record, size_on_disk
from .registry import BACKENDS, backend_class, backend_for, backend_for_checkpoint, parse_variant, register_backend
from .registry import validate_variants, variant_name

logger = logging.getLogger(__name__)


def quantize(model_dir: str | Path, model_class, variant: VariantOptions,
             calibration_batches: Iterable[dict] | None = None) -> nn.Module:
    """Load the full-precision checkpoint folder `model_dir` quantized as `variant` describes."""
    return backend_for(variant).quantize(Path(model_dir), model_class, calibration_batches)


def save_quantized(model: nn.Module, out_dir: str | Path, variant: VariantOptions) -> None:
    """Write the model's weights, config and quantization.json (the tokenizer is the caller's)."""
    backend_for(variant).save(model, Path(out_dir))


def load_quantized(path: str | Path, model_class=None) -> nn.Module:
    """Reload a checkpoint `save_quantized` wrote, with the backend its quantization.json names."""
    return backend_for_checkpoint(path).load(Path(path), model_class or model_class_for(path))


def export_checkpoint(source: str | Path, output_dir: str | Path, variant: VariantOptions | dict) -> Path:
    """`hfcompress export`: a full-precision checkpoint folder (or a run directory's final one) written in the
    variant's format, with its tokenizer, into `output_dir` (written beside it first, renamed into place when
    complete)."""
    folder, output_dir = full_precision_checkpoint(Path(source)), Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise HfCompressError(f"{output_dir}: the output directory exists and is not empty")
    backend = backend_for(variant)
    model = backend.quantize(folder, model_class_for(folder))
    partial = output_dir.with_name(output_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    backend.save(model, partial)
    try:
        AutoTokenizer.from_pretrained(str(folder)).save_pretrained(partial)
    except (OSError, ValueError):
        logger.warning("%s: no tokenizer to copy beside the exported model", folder)
    if output_dir.exists():
        output_dir.rmdir()
    partial.rename(output_dir)
    return output_dir


def full_precision_checkpoint(path: Path) -> Path:
    """The folder itself, or a run directory's final checkpoint; refused when it is already quantized."""
    if not path.is_dir():
        raise HfCompressError(f"{path}: no such checkpoint folder or run directory")
    run = RunDir(path)
    if run.has_results():
        final = run.load_results().final_model_dir
        if not final:
            raise HfCompressError(f"{path}: the run has no final checkpoint yet (results.json names none)")
        path = path / final
    if (path / RECORD_FILE).is_file():
        raise HfCompressError(f"{path}: this checkpoint is already quantized ({read_record(path).get('backend')}); "
                              "export a full-precision one, e.g. the run's last distill or prune stage folder")
    return path


def quantized_modules(model: nn.Module) -> dict[str, str]:
    """Module name -> quantized class name (Linear8bitLt, Linear4bit, Embedding8bit, QLinear, ...)."""
    return modules_of_types(model, [name for backend in BACKENDS.values() for name in backend.quantized_types])


__all__ = [
    "BACKENDS",
    "OptionError",
    "RECORD_FILE",
    "QuantizationBackend",
    "Requirement",
    "VariantOptions",
    "backend_class",
    "backend_for",
    "backend_for_checkpoint",
    "export_checkpoint",
    "load_quantized",
    "memory_footprint",
    "parse_variant",
    "quantize",
    "quantized_modules",
    "read_record",
    "register_backend",
    "save_quantized",
    "size_on_disk",
    "validate_variants",
    "variant_name",
]
