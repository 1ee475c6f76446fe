"""optimum-quanto: int8/int4/int2 weights (QLinear), optionally int8 activations calibrated on a few batches.

A checkpoint is `save_pretrained` of the frozen model (each quantized weight is stored as its `_data` and
`_scale` tensors) with quanto's quantization map in config.json (`quanto_quantization`). transformers cannot load
pre-quantized quanto weights, so the checkpoint ships the modeling file of hfcompress/modeling_hfcompress.py, whose
`from_pretrained` rebuilds the quantized modules with `optimum.quanto.requantize` (as quanto's own
QuantizedTransformersModel does) and loads the saved tensors: `AutoModel*.from_pretrained(path,
trust_remote_code=True)` loads it with transformers and optimum-quanto alone, and `load` runs the same code.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from fnmatch import fnmatch
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from ..errors import HfCompressError
from ..modeling_hfcompress import QUANTO_KEY, compressed_class, set_weight_group_size
from .base import OptionError, QuantizationBackend, Requirement, VariantOptions, estimate_checkpoint_bytes, load_full_precision
from .base import save_pruned
from .registry import register_backend


class QuantoOptions(VariantOptions):
    """optimum-quanto: int8/int4/int2 weights, optionally int8 activations calibrated on a few batches."""

    backend: Literal["quanto"]
    weights: Literal["int8", "int4", "int2"] = "int8"
    activations: Literal["int8"] | None = None
    calibration_batches: int = Field(8, ge=1)
    # int4/int2: input features per scale and shift. None: quanto's choice (128, or the largest multiple of 32 below
    # it that divides the layer's inputs). 32 is the block of GGUF's Q4_0/Q4_1, so it re-quantizes those exactly.
    group_size: int | None = Field(None, ge=8)
    skip_modules: list[str] = Field(default_factory=list)  # kept in full precision, besides the task head
    quantize_embeddings: bool = False

    @model_validator(mode="after")
    def _group_size_needs_int4_or_int2(self):
        if self.group_size is not None and self.weights == "int8":
            raise ValueError("group_size only applies to weights: int4 or int2 (int8 weights have one scale per row)")
        return self

    @model_validator(mode="after")
    def _embeddings_unsupported(self):
        if self.quantize_embeddings:
            raise ValueError("optimum-quanto has no quantized Embedding module (it quantizes Linear, Conv2d and "
                             "LayerNorm layers); use backend: bitsandbytes to quantize the embeddings")
        return self


@register_backend
class QuantoBackend(QuantizationBackend):
    name = "quanto"
    options_model = QuantoOptions
    requirements = (Requirement("optimum.quanto", "optimum-quanto"),)
    runtime_packages = ("optimum-quanto",)
    hub_tag = "quanto"
    quantized_types = ("QLinear", "QConv2d", "QLayerNorm")

    def default_name(self) -> str:
        options = self.options
        name = f"quanto-{options.weights}" + (f"-g{options.group_size}" if options.group_size else "")
        return name + ("-a8" if options.activations else "")

    @property
    def bits(self) -> int:
        return int(self.options.weights.removeprefix("int"))

    def check(self, model: nn.Module) -> None:
        """`group_size` must divide the inputs of every Linear layer quanto will quantize."""
        super().check(model)
        if self.options.group_size is None:
            return
        patterns = exclude_patterns(self.unquantized_modules(model))
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and not any(fnmatch(name, pattern) for pattern in patterns):
                _check_group_divides(name, module.in_features, self.options.group_size)

    def quantize(self, model_dir: Path, model_class, calibration_batches: Iterable[dict] | None = None) -> nn.Module:
        self.require_packages()
        from optimum.quanto import freeze, quantize

        options = self.options
        if options.activations and calibration_batches is None:
            raise HfCompressError(f"quanto activations: {options.activations} needs calibration batches, none given")
        model = load_full_precision(model_dir, model_class)  # load_pruned when the blocks differ in shape
        quantize(model, weights=_qtype(options.weights), activations=_qtype(options.activations),
                 exclude=exclude_patterns(self.unquantized_modules(model)))
        set_group_size(model, options.group_size)
        if options.activations:
            calibrate(model, itertools.islice(calibration_batches, options.calibration_batches))
        freeze(model)  # float weights -> stored int weights
        return model

    def save(self, model: nn.Module, out_dir: Path) -> None:
        from optimum.quanto import quantization_map

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        setattr(model.config, QUANTO_KEY, {"quantization_map": quantization_map(model),
                                           "group_size": self.options.group_size,
                                           "float_outputs": float_outputs(model)})
        model.__class__ = compressed_class(type(model))  # save_pretrained then ships the modeling file
        save_pruned(model, out_dir)
        self.write_record(out_dir)

    def load(self, path: Path, model_class) -> nn.Module:
        self.require_packages()
        return load_full_precision(path, model_class)  # the modeling file's loader, pruned shapes included

    def estimated_size(self, model: nn.Module) -> int:
        """int8: a byte per weight and a float32 scale per row; int4/int2: packed, with a float32 scale and shift per
        group of inputs (quanto's default group when none is given). Everything else stays float32."""
        bits = self.bits
        patterns = exclude_patterns(self.unquantized_modules(model))

        def price(name: str, module: nn.Module) -> int | None:
            if not isinstance(module, nn.Linear) or any(fnmatch(name, pattern) for pattern in patterns):
                return None
            rows, inputs = module.weight.shape
            group = self.options.group_size or default_group_size(inputs)
            scales = 4 * rows if bits == 8 else 8 * (rows * inputs // group if group else rows)
            bias = 4 * module.bias.numel() if module.bias is not None else 0
            return -(-rows * inputs * bits // 8) + scales + bias + 8  # + input and output scales

        return estimate_checkpoint_bytes(model, price)

    def usage_notes(self, record: dict) -> list[str]:
        return ["The weights are optimum-quanto tensors, which transformers cannot load by itself: the modeling "
                "file rebuilds them with `optimum.quanto.requantize` (`pip install optimum-quanto`), on the CPU."]


def default_group_size(in_features: int) -> int | None:
    """quanto's own choice for int4/int2 weights without a group size (optimum.quanto.nn.QModuleMixin): 128, or
    the largest multiple of 32 below it that divides the inputs; None (one scale per row) when none does."""
    group_size = 128
    if in_features <= group_size:
        return None
    while in_features % group_size and group_size > 32:
        group_size -= 32
    return group_size if in_features % group_size == 0 else None


def _check_group_divides(name: str, in_features: int, group_size: int) -> None:
    if in_features % group_size:
        raise OptionError("group_size", f"quanto group_size {group_size} does not divide the {in_features} input "
                                        f"features of {name}: choose a divisor, or skip_modules: [{name}]")


def exclude_patterns(modules: list[str]) -> list[str]:
    """quanto matches whole module names (fnmatch): skip each module, its children, and the same name deeper down."""
    return [pattern for name in modules for pattern in (name, f"{name}.*", f"*.{name}", f"*.{name}.*")]


def set_group_size(model: nn.Module, group_size: int | None) -> None:
    """Quantize int4/int2 weights in groups of `group_size` input features (before `freeze`)."""
    try:
        set_weight_group_size(model, group_size)
    except ValueError as error:
        module = str(error).rsplit(" ", 1)[-1]
        raise HfCompressError(f"quanto {error}: choose a divisor, or skip_modules: [{module}]") from None


def calibrate(model: nn.Module, batches: Iterable[dict]) -> None:
    """Record activation ranges over the batches (dicts of model inputs)."""
    from optimum.quanto import Calibration

    device = next(model.parameters()).device
    seen = 0
    with torch.no_grad(), Calibration():
        for batch in batches:
            model(**{key: value.to(device) for key, value in batch.items()})
            seen += 1
    if seen == 0:
        raise HfCompressError("quanto activations: the calibration batches were empty")


def float_outputs(model: nn.Module) -> list[str]:
    """The quantized modules whose outputs calibration left in float.

    Calibration (streamline mode) stops quantizing an output that only float operations (add, silu, ...) consume,
    which costs less accuracy; quanto's quantization map does not record it, so `load` replays it from this list.
    """
    from optimum.quanto import QModuleMixin

    return [
        name for name, module in model.named_modules()
        if isinstance(module, QModuleMixin) and "output" in module._quantize_hooks
        and module._quantize_hooks["output"].id not in module._forward_hooks
    ]


def _qtype(name: str | None):
    if name is None:
        return None
    from optimum.quanto import qtypes

    return qtypes[f"q{name}"]
