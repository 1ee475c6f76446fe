"""A format defined outside hfcompress, in one file: what a new backend needs and nothing more.

"toy": every Linear weight rounded to `bits`-bit levels with one scale per tensor, saved as an ordinary float32
checkpoint (a fake quantization: the levels are real, the storage is not). It refuses models whose Linear layers
are narrower than `min_features`, a shape check that `hfcompress validate` makes before anything is trained.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from hfcompress.errors import HfCompressError
from hfcompress.quantization import QuantizationBackend, VariantOptions, register_backend
from hfcompress.quantization.base import estimate_checkpoint_bytes, in_modules, load_full_precision, save_pruned


class ToyOptions(VariantOptions):
    backend: Literal["toy"]
    bits: int = Field(8, ge=2, le=8)
    min_features: int = Field(1, ge=1)


@register_backend
class ToyBackend(QuantizationBackend):
    name = "toy"
    options_model = ToyOptions

    def default_name(self) -> str:
        return f"toy-int{self.options.bits}"

    @property
    def bits(self) -> int:
        return self.options.bits

    def check(self, model: nn.Module) -> None:
        super().check(model)
        for name, module in self._targets(model).items():
            if module.in_features < self.options.min_features:
                raise HfCompressError(f"toy: {name} has {module.in_features} input features, fewer than "
                                      f"min_features {self.options.min_features}")

    def quantize(self, model_dir: Path, model_class, calibration_batches=None) -> nn.Module:
        model = load_full_precision(model_dir, model_class)
        self.check(model)
        levels = 2 ** (self.options.bits - 1) - 1
        with torch.no_grad():
            for module in self._targets(model).values():
                scale = module.weight.abs().max() / levels
                module.weight.copy_((module.weight / scale).round() * scale)
        return model.eval()

    def save(self, model: nn.Module, out_dir: Path) -> None:
        save_pruned(model, out_dir)
        self.write_record(out_dir)

    def load(self, path: Path, model_class) -> nn.Module:
        return load_full_precision(path, model_class).eval()

    def estimated_size(self, model: nn.Module) -> int:
        return estimate_checkpoint_bytes(model, lambda name, module: None)

    def usage_notes(self, record: dict) -> list[str]:
        return [f"Toy format: every Linear weight lies on {record['bits']}-bit levels, stored as float32."]

    def _targets(self, model: nn.Module) -> dict[str, nn.Linear]:
        skipped = self.unquantized_modules(model)
        return {name: module for name, module in model.named_modules()
                if isinstance(module, nn.Linear) and not in_modules(name, skipped)}
