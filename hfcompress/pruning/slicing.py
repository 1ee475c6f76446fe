"""Keep a subset of a projection's input or output features, in place.

Two kinds of projection occur in the supported models: `nn.Linear` (weight is [out, in]) and the GPT-2 `Conv1D`
(weight is [in, out]). Everything else in the pruning package goes through these functions, so neither layout
leaks out of this module.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import HfCompressError


def out_features(module: nn.Module) -> int:
    # Read from the attributes rather than the weight, so shapes can be read from quantized Linear subclasses too.
    return module.nf if isinstance(module, Conv1D) else module.out_features


def in_features(module: nn.Module) -> int:
    return module.nx if isinstance(module, Conv1D) else module.in_features


def weight_as_out_by_in(module: nn.Module) -> torch.Tensor:
    """The weight as an [out_features, in_features] matrix, whatever the module's own layout."""
    weight = _check(module).weight
    return weight if isinstance(module, nn.Linear) else weight.t()


def keep_outputs(module: nn.Module, indices: torch.Tensor) -> None:
    """Keep only the output features at `indices` (weight rows of a Linear, and the matching bias entries)."""
    _check(module)
    indices = indices.to(module.weight.device)
    _replace(module, "weight", module.weight.index_select(_output_dim(module), indices))
    if module.bias is not None:
        _replace(module, "bias", module.bias.index_select(0, indices))
    if isinstance(module, nn.Linear):
        module.out_features = len(indices)
    else:
        module.nf = len(indices)


def keep_inputs(module: nn.Module, indices: torch.Tensor) -> None:
    """Keep only the input features at `indices`; the bias belongs to the outputs and is unchanged."""
    _check(module)
    indices = indices.to(module.weight.device)
    _replace(module, "weight", module.weight.index_select(1 - _output_dim(module), indices))
    if isinstance(module, nn.Linear):
        module.in_features = len(indices)
    else:
        module.nx = len(indices)


def unit_features(units: list[int], unit_size: int) -> torch.Tensor:
    """Feature indices of whole units (e.g. heads of `unit_size` features each), in the order given."""
    starts = torch.tensor(units, dtype=torch.long).unsqueeze(1) * unit_size
    return (starts + torch.arange(unit_size)).flatten()


def _output_dim(module: nn.Module) -> int:
    return 0 if isinstance(module, nn.Linear) else 1


def _replace(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value.clone(), requires_grad=old.requires_grad))


def _check(module: nn.Module) -> nn.Module:
    if type(module) not in (nn.Linear, Conv1D):
        raise HfCompressError(
            f"cannot slice a {type(module).__name__}: structured pruning needs plain Linear/Conv1D weights "
            "(prune before quantizing)"
        )
    return module
