"""The interface every quantization backend implements, and what they share: the record file, the task head, sizes."""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig

from ..errors import HfCompressError
from ..fileio import read_json, write_json
from ..evaluation import memory_footprint, size_on_disk  # noqa: F401  (re-exported)
from ..pruning.checkpoint import save_pruned  # noqa: F401  (shared with the backends)
from ..pruning.structure import STRUCTURE_KEY, read_legacy_structure
from .options import variant_name

RECORD_FILE = "quantization.json"


class QuantizationBackend(ABC):
    """One way of quantizing a transformers checkpoint (one module per backend, like transformers' `quantizers/`)."""

    name: str
    package: str | None = None  # the module it imports; a missing one is a user-facing error, not an ImportError
    pip_name: str | None = None  # what to `pip install` for it
    quantized_types: tuple[str, ...] = ()  # class names of the modules it puts in place of float ones

    @abstractmethod
    def quantize(self, model_dir: Path, model_class, variant, calibration_batches: Iterable[dict] | None) -> nn.Module:
        """Load the full-precision `save_pretrained` folder `model_dir` as a quantized model."""

    @abstractmethod
    def save(self, model: nn.Module, out_dir: Path, variant) -> None:
        """Write a checkpoint of the quantized model (the record file included) that `load` restores."""

    @abstractmethod
    def load(self, path: Path, model_class) -> nn.Module:
        """Reload a checkpoint that `save` wrote."""

    def estimated_size(self, model: nn.Module, variant, skip: list[str]) -> int | None:
        """Bytes of the weights `save` would write for `model` (on the meta device: shapes only), modules matching
        `skip` kept in full precision; None where this backend cannot say before it runs."""
        return None

    def require_package(self) -> None:
        if self.package is None:
            return
        try:
            importlib.import_module(self.package)
        except ImportError as error:
            raise HfCompressError(f"quantization backend {self.name!r} needs the {self.package!r} package, which "
                                  f"cannot be imported here ({error}); pip install {self.pip_name}") from None


def write_record(out_dir: Path, variant, **extra) -> None:
    """quantization.json: the variant's options at top level (backend, bits / weights / dtype, ...) plus `extra`."""
    write_json(Path(out_dir) / RECORD_FILE, {**variant.model_dump(mode="json"), "name": variant_name(variant), **extra})


def read_record(path: Path) -> dict:
    record = Path(path) / RECORD_FILE
    if not record.is_file():
        raise HfCompressError(f"{path}: no {RECORD_FILE}, so this is not a checkpoint hfcompress quantized")
    return read_json(record)


def task_head_names(model_dir: Path, model_class) -> list[str]:
    """The top-level modules outside the base model (BERT's `classifier`, Llama's `lm_head` or `score`).

    They stay in full precision: they are small, sensitive, and bitsandbytes cannot quantize a head that the
    checkpoint lacks (a freshly initialised classifier fails at its first forward).
    """
    config = AutoConfig.from_pretrained(str(model_dir))
    with torch.device("meta"):
        return task_heads(model_class.from_config(config))


def task_heads(model: nn.Module) -> list[str]:
    """The top-level modules with parameters outside `model`'s base model (see `task_head_names`)."""
    return [
        name for name, child in model.named_children()
        if name != model.base_model_prefix and any(True for _ in child.parameters())
    ]


def in_modules(name: str, module_names: Iterable[str]) -> bool:
    """Whether the module `name` is one of `module_names` or inside one of them."""
    return any(name == other or name.startswith(f"{other}.") for other in module_names)


def estimate_checkpoint_bytes(model: nn.Module, quantized_bytes, float_bytes: int = 4) -> int:
    """Bytes of a checkpoint of `model` (shapes only): each module `quantized_bytes(name, module)` prices (an int)
    at that price, every other parameter at `float_bytes` per value; tied parameters once."""
    seen, total = set(), 0
    for name, module in model.named_modules():
        own = [parameter for parameter in module.parameters(recurse=False) if id(parameter) not in seen]
        price = quantized_bytes(name, module)
        seen.update(id(parameter) for parameter in own)
        total += price if price is not None else sum(parameter.numel() * float_bytes for parameter in own)
    return total


def modules_of_types(model: nn.Module, types: Iterable[str]) -> dict[str, str]:
    """Module name -> class name, for the modules whose class is one of `types`."""
    types = set(types)
    return {name: type(module).__name__ for name, module in model.named_modules() if type(module).__name__ in types}


# ------------------------------------------------------------------------------------------------ pruned checkpoints
# A pruned model whose blocks differ in shape carries `pruning_structure` in config.json (see hfcompress.pruning), and
# only the `Compressed<Class>` of hfcompress/modeling_hfcompress.py builds it. Every backend loads such a model through
# `load_pruned` and saves it with `save_pruned`, which keeps the record and the modeling code with the checkpoint.


def is_pruned(folder: Path) -> bool:
    """Whether the checkpoint's blocks differ in shape: config.json carries a pruning structure (or an older
    checkpoint its `pruning_structure.json`). Formats with one shape for every block cannot hold such a model."""
    config = Path(folder) / "config.json"
    return bool(config.is_file() and read_json(config).get(STRUCTURE_KEY)) or read_legacy_structure(folder) is not None


def load_full_precision(model_dir: Path, model_class, **kwargs) -> nn.Module:
    """`from_pretrained` (its keywords included) of a checkpoint, pruned into blocks of different shapes or not."""
    from ..pruning import load_pruned

    return load_pruned(model_dir, model_class, **kwargs)
