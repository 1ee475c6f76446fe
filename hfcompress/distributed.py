"""Several processes: what the main process does alone, and (below) how training is sharded."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.distributed
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.fsdp import FSDPModule


@contextlib.contextmanager
def main_process_alone(active: bool = True):
    """Run a main-process-only stage as if there were no process group.

    The other processes wait at a barrier meanwhile, so nothing in here may start a collective: libraries that
    branch on `torch.distributed.is_initialized()` (compressed-tensors broadcasts its offloading map when loading
    or compressing a model) take their single-process path instead of waiting forever for peers.
    """
    if not active:
        yield
        return
    is_initialized = torch.distributed.is_initialized
    torch.distributed.is_initialized = lambda: False
    try:
        yield
    finally:
        torch.distributed.is_initialized = is_initialized


def full_state_dict(accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights, on CPU, on the main process (other processes may get an empty dict).

    Call it on every process: a sharded model (FSDP2, whoever applied it; DeepSpeed ZeRO-3) is gathered.
    """
    if isinstance(model, FSDPModule):
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return accelerator.get_state_dict(model)


def load_full_state_dict(accelerator, model: torch.nn.Module, path: Path) -> None:
    """Load weights saved from `full_state_dict` into `model` on every process (a sharded model takes its shards)."""
    if isinstance(model, FSDPModule):  # the main process reads the file and sends every process its shards
        weights = torch.load(path, map_location="cpu", weights_only=True) if accelerator.is_main_process else {}
        set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    else:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
