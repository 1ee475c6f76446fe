"""half: every weight in float16 or bfloat16 (no quantized modules; the 2x baseline the others are compared with).

Norm layers are not pinned to float32: PyTorch's layer_norm accumulates half-precision inputs in float32,
Llama-style RMSNorm computes its variance in float32 itself, and transformers already keeps the modules a
model lists in `_keep_in_fp32_modules` in float32.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from .base import (
    QuantizationBackend,
    estimate_checkpoint_bytes,
    load_full_precision,
    read_record,
    save_pruned,
    write_record,
)
from .options import HalfOptions


class HalfBackend(QuantizationBackend):
    name = "half"

    def quantize(self, model_dir: Path, model_class, variant: HalfOptions,
                 calibration_batches: Iterable[dict] | None = None) -> nn.Module:
        return load_full_precision(model_dir, model_class, dtype=getattr(torch, variant.dtype))

    def save(self, model: nn.Module, out_dir: Path, variant: HalfOptions) -> None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_pruned(model, out_dir)  # config.json records the dtype: plain from_pretrained loads it as saved
        write_record(out_dir, variant)

    def estimated_size(self, model: nn.Module, variant: HalfOptions, skip: list[str]) -> int:
        return estimate_checkpoint_bytes(model, lambda name, module: None, float_bytes=2)

    def load(self, path: Path, model_class) -> nn.Module:
        dtype = getattr(torch, read_record(path)["dtype"])
        return load_full_precision(path, model_class, dtype=dtype)  # load_pruned when the blocks differ in shape
