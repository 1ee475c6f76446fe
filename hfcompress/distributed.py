"""Several processes: what the main process does alone, and (below) how training is sharded."""

from __future__ import annotations

import contextlib

import torch.distributed


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
