"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers").

Block by block: the calibration batches (training text) run through the model up to the first decoder block; each
block then sees the outputs of the blocks before it *after* they were quantized. For every Linear of a block the
inputs give the Hessian of the layer's squared output error, H = 2/n sum x x^T; its columns are rounded one at a
time and each rounding error is pushed onto the columns not rounded yet, weighted by the inverse Hessian (Cholesky
form), which is what lowers the layer's output error below round-to-nearest's. Options as in the paper and its
reference code: damping (a fraction of the mean diagonal), act-order (columns by decreasing Hessian diagonal; the
groups stay the contiguous input ranges of the format, with scales from the unrounded weights, so no column index
has to be stored: llm-compressor's `actorder: weight`), lazy batched updates over `block_size` columns, and each
group's range from its min and max or, with `observer: mse`, shrunk to its least rounding error (compressed_tensors.py).

The result is written exactly like round-to-nearest (compressed_tensors.py): a `pack-quantized` checkpoint.

llm-compressor (0.14) implements the same and writes the same format, but requires transformers <= 5.17 and
compressed-tensors 0.19, and GPTQModel (7.7) requires torch 2.14 with CUDA libraries: neither installs beside the
transformers 5.24 / torch 2.13 this project pins, so the algorithm is implemented here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

import torch
from pydantic import Field
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import HfCompressError
from ..pruning.adapters import adapter_for
from .compressed_tensors import CompressedTensorsBackend, CompressedTensorsOptions, QParams, group_qparams
from .compressed_tensors import round_to_nearest, weight_args
from .registry import register_backend

BlockInputs = list[tuple[tuple, dict]]  # positional and keyword arguments of one call of a decoder block


class GptqOptions(CompressedTensorsOptions):
    """GPTQ (Frantar et al. 2022): the same format, each weight column rounded with the error of the columns
    before it pushed onto the ones after, as the layer's input Hessian on the training text says."""

    backend: Literal["gptq"]  # type: ignore[assignment]
    act_order: bool = False  # columns in order of decreasing Hessian diagonal (groups stay contiguous)
    damp: float = Field(0.01, gt=0, description="added to the Hessian diagonal, as a fraction of its mean")
    block_size: int = Field(128, ge=1, description="columns whose updates are applied together (speed only)")


@register_backend
class GptqBackend(CompressedTensorsBackend):
    name = "gptq"
    options_model = GptqOptions
    method = "gptq"

    def default_name(self) -> str:
        return super().default_name() + ("-ao" if self.options.act_order else "")

    def quantize_weights(self, model: nn.Module, targets: dict[str, nn.Linear],
                         calibration_batches: Iterable[dict] | None) -> dict[str, QParams]:
        if calibration_batches is None:
            raise HfCompressError("gptq needs calibration batches (the quantize stage takes them from the training "
                                  "split: calibration_samples)")
        return gptq_quantize_model(model, calibration_batches, targets, self.options)


# ------------------------------------------------------------------------------------------------ one weight matrix


def gptq_quantize_weight(weight: torch.Tensor, hessian: torch.Tensor, variant: GptqOptions
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ on one (out, in) weight with the (in, in) Hessian of its inputs.

    Returns the quantized weight (as float), the scales and the zero points (one column per group).
    """
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    dtype = getattr(torch, variant.dtype)
    args = weight_args(variant)
    column_args = weight_args(variant, strategy="channel")  # one column at a time, with its group's scale
    weight = weight.detach().float().clone()
    hessian = hessian.detach().float().clone()
    rows, columns = weight.shape
    group_size = variant.group_size or columns

    dead = torch.diag(hessian) == 0  # inputs that were always zero: their weights do not matter
    hessian[dead, dead] = 1
    weight[:, dead] = 0

    # Scales from the weights before any update whenever a group's columns are not visited together.
    static_scales = variant.act_order or variant.group_size is None
    if static_scales:
        scale, zero_point = group_qparams(weight, args, dtype)
    else:  # filled as each group starts
        scale = torch.zeros(rows, columns // group_size)
        zero_point = torch.zeros(rows, columns // group_size, dtype=args.zp_dtype or torch.int8)
    order = torch.argsort(torch.diag(hessian), descending=True) if variant.act_order else torch.arange(columns)
    weight, hessian = weight[:, order], hessian[order][:, order]
    hessian_inverse = _upper_cholesky_of_inverse(hessian, variant.damp)

    quantized = torch.zeros_like(weight)
    block_size = group_size * max(1, variant.block_size // group_size) if not static_scales else variant.block_size
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        block, block_inverse = weight[:, start:end].clone(), hessian_inverse[start:end, start:end]
        errors = torch.zeros_like(block)
        for i in range(end - start):
            column = start + i
            group = int(order[column]) // group_size
            if not static_scales and column % group_size == 0:  # a group starts: scale it as updated so far
                group_scale, group_zero_point = group_qparams(block[:, i:i + group_size], args, dtype, group_size)
                scale[:, group], zero_point[:, group] = group_scale[:, 0], group_zero_point[:, 0]
            value = block[:, i]
            rounded = fake_quantize(value[:, None], scale[:, group, None], zero_point[:, group, None],
                                    column_args)[:, 0]
            quantized[:, column] = rounded
            errors[:, i] = (value - rounded) / block_inverse[i, i]
            block[:, i:] -= errors[:, i, None] * block_inverse[i, None, i:]
        weight[:, end:] -= errors @ hessian_inverse[start:end, end:]

    quantized = quantized[:, torch.argsort(order)]
    return quantized, scale, zero_point


def _upper_cholesky_of_inverse(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """U with U^T U = (H + damp * mean(diag H) * I)^-1: row i of U carries column i's error onto later columns."""
    hessian = hessian + damp * torch.diag(hessian).mean() * torch.eye(len(hessian))
    lower = torch.linalg.cholesky(hessian)
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)


# ------------------------------------------------------------------------------------------------ the model, block by block


def gptq_quantize_model(model: nn.Module, calibration_batches: Iterable[dict], targets: dict[str, nn.Module],
                        variant: GptqOptions) -> dict[str, QParams]:
    """GPTQ on every target inside a decoder block, block by block; round-to-nearest for targets outside blocks.

    Each target's weight is replaced (in place) by its quantized values; returns its scales and zero points.
    """
    blocks = adapter_for(model).layers(model)
    names = {id(module): name for name, module in model.named_modules()}
    qparams: dict[str, QParams] = {}
    with torch.no_grad():
        inputs = capture_block_inputs(model, blocks[0], calibration_batches)
        for block in blocks:
            prefix = names[id(block)] + "."
            layers = {name: layer for name, layer in targets.items() if name.startswith(prefix)}
            hessians = input_hessians(block, layers, inputs)
            for name, layer in layers.items():
                quantized, *qparams[name] = gptq_quantize_weight(weight_matrix(layer), hessians[name], variant)
                set_weight_matrix(layer, quantized)
            inputs = [((block_output(block, args, kwargs), *args[1:]), kwargs) if args
                      else ((), {**kwargs, "hidden_states": block_output(block, args, kwargs)})
                      for args, kwargs in inputs]
        args, dtype = weight_args(variant), getattr(torch, variant.dtype)
        for name, layer in targets.items():
            if name not in qparams:
                layer.weight.data, *qparams[name] = round_to_nearest(layer.weight.data, args, dtype)
    return qparams


class _BlockReached(Exception):
    """Stops the model's forward at the first block once its inputs are recorded."""


def capture_block_inputs(model: nn.Module, first_block: nn.Module, batches: Iterable[dict]) -> BlockInputs:
    """The arguments the first decoder block is called with, one entry per calibration batch."""
    captured: BlockInputs = []

    def record(module, args, kwargs):
        captured.append((args, kwargs))
        raise _BlockReached

    device = next(model.parameters()).device
    no_cache = {"use_cache": False} if getattr(model.config, "use_cache", None) is not None else {}
    handle = first_block.register_forward_pre_hook(record, with_kwargs=True)
    try:
        for batch in batches:
            inputs = {key: value.to(device) for key, value in batch.items() if key != "labels"}
            try:
                model(**inputs, **no_cache)
            except _BlockReached:
                pass
    finally:
        handle.remove()
    if not captured:
        raise HfCompressError("gptq: the calibration batches were empty")
    return captured


def input_hessians(block: nn.Module, layers: dict[str, nn.Module], inputs: BlockInputs) -> dict[str, torch.Tensor]:
    """H = 2/n sum x x^T over every input row x of each layer, running the block on every calibration batch."""
    hessians = {name: torch.zeros(weight_matrix(layer).shape[1], weight_matrix(layer).shape[1])
                for name, layer in layers.items()}
    counts = dict.fromkeys(layers, 0)

    def accumulate(name):
        def hook(module, layer_inputs, output):
            rows = layer_inputs[0].reshape(-1, layer_inputs[0].shape[-1]).float()
            total = counts[name] + len(rows)
            hessians[name] *= counts[name] / total
            rows = rows * math.sqrt(2 / total)
            hessians[name] += rows.T @ rows
            counts[name] = total
        return hook

    handles = [layer.register_forward_hook(accumulate(name)) for name, layer in layers.items()]
    try:
        for args, kwargs in inputs:
            block(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return hessians


def block_output(block: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    output = block(*args, **kwargs)
    return output[0] if isinstance(output, tuple) else output


def weight_matrix(layer: nn.Module) -> torch.Tensor:
    """The (out, in) weight: nn.Linear stores it so, GPT-2's Conv1D transposed."""
    return layer.weight.data.T if isinstance(layer, Conv1D) else layer.weight.data


def set_weight_matrix(layer: nn.Module, weight: torch.Tensor) -> None:
    layer.weight.data = (weight.T if isinstance(layer, Conv1D) else weight).contiguous().to(layer.weight.dtype)
