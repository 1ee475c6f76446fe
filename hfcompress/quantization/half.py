"""half: every weight in float16 or bfloat16 (no quantized modules; the 2x baseline the others are compared with).

Norm layers are not pinned to float32: PyTorch's layer_norm accumulates half-precision inputs in float32,
Llama-style RMSNorm computes its variance in float32 itself, and transformers already keeps the modules a
model lists in `_keep_in_fp32_modules` in float32.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from .base import QuantizationBackend, VariantOptions, estimate_checkpoint_bytes, load_full_precision, save_pruned
from .registry import register_backend


class HalfOptions(VariantOptions):
    """Every weight, embeddings included, in 16-bit floats."""

    backend: Literal["half"]
    dtype: Literal["float16", "bfloat16"] = "bfloat16"


@register_backend
class HalfBackend(QuantizationBackend):
    name = "half"
    options_model = HalfOptions

    def default_name(self) -> str:
        return {"float16": "fp16", "bfloat16": "bf16"}[self.options.dtype]

    @property
    def bits(self) -> int:
        return 16

    def quantize(self, model_dir: Path, model_class, calibration_batches: Iterable[dict] | None = None) -> nn.Module:
        return load_full_precision(model_dir, model_class, dtype=getattr(torch, self.options.dtype))

    def save(self, model: nn.Module, out_dir: Path) -> None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_pruned(model, out_dir)  # config.json records the dtype: plain from_pretrained loads it as saved
        self.write_record(out_dir)

    def load(self, path: Path, model_class) -> nn.Module:
        return load_full_precision(path, model_class, dtype=getattr(torch, self.options.dtype))  # load_pruned when the blocks differ in shape

    def estimated_size(self, model: nn.Module) -> int:
        return estimate_checkpoint_bytes(model, lambda name, module: None, float_bytes=2)

    def usage_notes(self, record: dict) -> list[str]:
        return [f"The weights are stored in {record.get('dtype', 'half precision')}, and `from_pretrained` loads "
                "them in that dtype (transformers 5 defaults to `dtype=\"auto\"`)."]
