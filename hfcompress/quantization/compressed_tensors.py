"""compressed-tensors: integer weights in groups, saved as a `pack-quantized` checkpoint (W4A16 / W8A16).

This is the format vLLM serves and transformers reads by itself: `AutoModelForCausalLM.from_pretrained(folder)`
loads it with nothing but the `compressed-tensors` package installed. This backend rounds each weight to the
nearest level of its group (RTN); the `gptq` backend (gptq.py) chooses the levels with calibration data and
writes the same format.

The returned model is the compressed one (packed int32 weights, unpacked at every forward), in float32 like the
other variants; its float weights and scales are rounded through `variant.dtype` first, which is the dtype the
checkpoint stores them in, so the checkpoint reloaded with `dtype=torch.float32` gives the same logits.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import HfCompressError
from .base import OptionError, QuantizationBackend, Requirement, VariantOptions, estimate_checkpoint_bytes, in_modules
from .base import load_full_precision
from .registry import register_backend

FORMAT = "pack-quantized"
QParams = tuple[torch.Tensor, torch.Tensor]  # scale and zero point, one column per group


class CompressedTensorsOptions(VariantOptions):
    """Integer weights in groups, rounded to nearest, saved as a compressed-tensors `pack-quantized` checkpoint
    (W4A16 / W8A16) that plain `AutoModelForCausalLM.from_pretrained` and vLLM load."""

    backend: Literal["compressed-tensors"]
    bits: Literal[4, 8] = 4
    # Input features per scale (and zero point). None: one scale per output row (compressed-tensors' "channel").
    group_size: int | None = Field(128, ge=8)
    symmetric: bool = True  # False: a zero point per group as well
    # How each group's range is chosen: its min and max, or shrunk to the least rounding error (MSE_SHRINKS).
    observer: Literal["minmax", "mse"] = "minmax"
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"  # of the scales and the unquantized weights
    skip_modules: list[str] = Field(default_factory=list)  # kept in full precision, besides the task head

    @model_validator(mode="after")
    def _symmetric_only(self):
        if not self.symmetric:
            raise ValueError("symmetric: false writes packed zero points, which transformers (with "
                             "compressed-tensors 0.20) rejects as a size mismatch when loading; use symmetric: true")
        return self


@register_backend
class CompressedTensorsBackend(QuantizationBackend):
    name = "compressed-tensors"
    options_model = CompressedTensorsOptions
    requirements = (Requirement("compressed_tensors", "compressed-tensors"),)
    runtime_packages = ("compressed-tensors",)
    hub_tag = "compressed-tensors"
    keeps_per_layer_shapes = False
    method = "rtn"  # how the levels are chosen, as the variant name says it

    def default_name(self) -> str:
        options = self.options
        name = f"{self.method}-int{options.bits}" + (f"-g{options.group_size}" if options.group_size else "")
        return name + ("" if options.symmetric else "-asym") + ("-mse" if options.observer == "mse" else "")

    @property
    def bits(self) -> int:
        return self.options.bits

    def check(self, model: nn.Module) -> None:
        super().check(model)
        quantization_targets(model, self.unquantized_modules(model), self.options.group_size)

    def quantize(self, model_dir: Path, model_class, calibration_batches: Iterable[dict] | None = None) -> nn.Module:
        self.check_checkpoint(model_dir)
        options = self.options
        model = load_full_precision(model_dir, model_class, dtype=torch.float32)
        round_through(model, getattr(torch, options.dtype))
        targets = quantization_targets(model, self.unquantized_modules(model), options.group_size)
        qparams = self.quantize_weights(model, targets, calibration_batches)
        compress(model, weight_args(options), qparams, ignore=unquantized_linears(model, targets))
        return model.eval()

    def quantize_weights(self, model: nn.Module, targets: dict[str, nn.Linear],
                         calibration_batches: Iterable[dict] | None) -> dict[str, QParams]:
        """Replace each target's weight by its quantized (dequantized) values; its scale and zero point."""
        args, dtype = weight_args(self.options), getattr(torch, self.options.dtype)
        qparams = {}
        with torch.no_grad():
            for name, layer in targets.items():
                layer.weight.data, *qparams[name] = round_to_nearest(layer.weight.data, args, dtype)
        return qparams

    def save(self, model: nn.Module, out_dir: Path) -> None:
        from compressed_tensors.compressors import ModelCompressor

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        compressor = ModelCompressor.from_pretrained_model(model, quantization_format=FORMAT)
        # The first forward unpacks the weights in place (compressed-tensors' hook): pack them again. Exact, since
        # every weight is already on its group's grid.
        compressor.compress_model(model, skip_compressed=True)
        compute_dtype = next(model.parameters()).dtype
        model.to(getattr(torch, self.options.dtype))  # exact too: every float was rounded through this dtype already
        try:
            model.save_pretrained(out_dir)
        finally:
            model.to(compute_dtype)
        compressor.update_config(str(out_dir))
        self.write_record(out_dir)

    def load(self, path: Path, model_class) -> nn.Module:
        self.require_packages()
        return model_class.from_pretrained(str(path), dtype=torch.float32).eval()

    def estimated_size(self, model: nn.Module) -> int:
        """Packed `bits`-bit weights in every quantized Linear, one scale per group (or row) in `dtype`, and its
        shape (two int64); everything else, biases included, in `dtype`."""
        options = self.options
        float_bytes = torch.finfo(getattr(torch, options.dtype)).bits // 8
        skipped = self.unquantized_modules(model)

        def price(name: str, module: nn.Module) -> int | None:
            if not isinstance(module, nn.Linear) or in_modules(name, skipped):
                return None
            rows, columns = module.weight.shape
            groups = -(-columns // options.group_size) if options.group_size else 1
            bias = module.bias.numel() * float_bytes if module.bias is not None else 0
            return rows * columns * options.bits // 8 + rows * groups * float_bytes + 16 + bias

        return estimate_checkpoint_bytes(model, price, float_bytes)

    def usage_notes(self, record: dict) -> list[str]:
        return ["The Linear weights are a compressed-tensors `pack-quantized` checkpoint (needs "
                "`pip install compressed-tensors`); transformers unpacks them at the first forward, and vLLM "
                "serves the checkpoint as it is."]


def weight_args(variant: CompressedTensorsOptions, strategy: str | None = None):
    """compressed-tensors' description of the weights: int, `bits`, symmetric or not, by group or by row, and how
    each group's range is chosen (its observer)."""
    from compressed_tensors.quantization import QuantizationArgs

    strategy = strategy or ("group" if variant.group_size else "channel")
    return QuantizationArgs(num_bits=variant.bits, type="int", symmetric=variant.symmetric, strategy=strategy,
                            group_size=variant.group_size if strategy == "group" else None,
                            observer=variant.observer)


def round_through(model: nn.Module, dtype: torch.dtype) -> None:
    """Round every float parameter to the values `dtype` can hold (the model keeps its own dtype).

    Buffers are left alone: the rotary frequencies are recomputed in float32 when the checkpoint is loaded.
    """
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.is_floating_point():
                parameter.data = parameter.data.to(dtype).to(parameter.dtype)


def quantization_targets(model: nn.Module, skipped: list[str], group_size: int | None) -> dict[str, nn.Linear]:
    """The Linear layers to quantize (all but the skipped modules and their children), checked against the format."""
    targets = {}
    for name, module in model.named_modules():
        if in_modules(name, skipped):
            continue
        if isinstance(module, Conv1D):
            raise HfCompressError(f"compressed-tensors quantizes nn.Linear layers; {name} is a GPT-2 style Conv1D, "
                                  f"so {model.config.model_type} models cannot be written in this format")
        if isinstance(module, nn.Linear):
            check_group_size(name, module.in_features, group_size)
            targets[name] = module
    if not targets:
        raise HfCompressError("compressed-tensors: the model has no Linear layer left to quantize")
    return targets


def check_group_size(name: str, in_features: int, group_size: int | None) -> None:
    if group_size and in_features % group_size:
        raise OptionError("group_size", f"{group_size} does not divide the {in_features} input features of {name}: "
                              f"choose a divisor of {in_features}, or skip_modules: [{name}]")


def unquantized_linears(model: nn.Module, targets: dict[str, nn.Linear]) -> list[str]:
    """compressed-tensors' `ignore` list: every other Linear, by its full name (what vLLM matches too)."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and name not in targets]


# The MSE observer's search, as in GPTQ's reference code (`Quantizer(mse=True)`) and llm-compressor's "mse" observer:
# each group's range shrunk by up to 80% in steps of 1%, keeping the shrink with the least |error|^2.4.
MSE_SHRINKS = torch.arange(100, 20, -1) / 100
MSE_NORM = 2.4


def group_qparams(weight: torch.Tensor, args, dtype: torch.dtype, group_size: int | None = None) -> QParams:
    """Scale and zero point of every group of `group_size` columns (default: the args' group, else the whole row),
    the scale rounded to what `dtype` stores. The range is the group's minimum and maximum (`args.observer`
    "minmax"), or that range shrunk to where the group's rounding error is least ("mse": clipping a few outliers
    buys finer steps for every other weight)."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    rows, columns = weight.shape
    group_size = group_size or args.group_size or columns
    groups = weight.reshape(rows, columns // group_size, group_size)
    low, high = groups.amin(-1), groups.amax(-1)
    scale, zero_point = _range_qparams(low, high, args, dtype, weight.dtype)
    if args.observer != "mse":
        return scale, zero_point
    one_per_row = args.model_copy(update={"strategy": "channel", "group_size": None})
    rows_of_groups = groups.reshape(-1, group_size)  # one group per row, so every group can take its own shrink
    best_error = torch.full_like(low, float("inf"))
    for shrink in MSE_SHRINKS:
        candidate_scale, candidate_zero_point = _range_qparams(low * shrink, high * shrink, args, dtype, weight.dtype)
        rounded = fake_quantize(rows_of_groups, candidate_scale.reshape(-1, 1), candidate_zero_point.reshape(-1, 1),
                                one_per_row)
        error = (rounded - rows_of_groups).abs().pow(MSE_NORM).sum(-1).reshape(low.shape)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        scale = torch.where(better, candidate_scale, scale)
        zero_point = torch.where(better, candidate_zero_point, zero_point)
    return scale, zero_point


def _range_qparams(low: torch.Tensor, high: torch.Tensor, args, dtype: torch.dtype, compute_dtype: torch.dtype
                   ) -> QParams:
    from compressed_tensors.quantization.utils import calculate_qparams

    scale, zero_point = calculate_qparams(low, high, args)
    return scale.to(dtype).to(compute_dtype), zero_point


def round_to_nearest(weight: torch.Tensor, args, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The weight rounded to its group's nearest level (as float), the scales and the zero points."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    scale, zero_point = group_qparams(weight, args, dtype)
    return fake_quantize(weight, scale, zero_point, args), scale, zero_point


def compress(model: nn.Module, args, qparams: dict[str, QParams], ignore: list[str]) -> None:
    """Attach the quantization scheme with the given scales, then pack the weights (in place)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, apply_quantization_config

    config = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
                                ignore=ignore)
    apply_quantization_config(model, config)
    with torch.no_grad():
        for name, (scale, zero_point) in qparams.items():
            module = model.get_submodule(name)
            module.weight_scale.data = scale.to(module.weight_scale.dtype)
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.data = zero_point.to(module.weight_zero_point.dtype)
    ModelCompressor.from_pretrained_model(model, quantization_format=FORMAT).compress_model(model)
