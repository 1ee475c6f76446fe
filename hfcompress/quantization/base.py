"""The interface every quantization backend implements, and what they share: the record file, the task head, sizes."""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig

from ..errors import HfCompressError
from ..fileio import read_json, write_json
from ..evaluation import memory_footprint, size_on_disk  # noqa: F401  (re-exported)
from ..pruning.structure import STRUCTURE_FILE
from ..pruning.checkpoint import read_weights  # noqa: F401  (shared with the backends)
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
# A pruned model whose blocks differ in shape carries STRUCTURE_FILE beside config.json (see hfcompress.pruning):
# config.json alone builds the wrong shapes, so `from_pretrained` cannot load it. Every backend therefore builds
# such a model through the record, quantizes it in memory, and saves the record with the quantized checkpoint.


def is_pruned(folder: Path) -> bool:
    """Whether the checkpoint folder carries a pruning structure record (its blocks differ from config.json's)."""
    return (Path(folder) / STRUCTURE_FILE).is_file()


def load_full_precision(model_dir: Path, model_class, **kwargs) -> nn.Module:
    """`from_pretrained` of a float checkpoint, or `load_pruned` when it carries a pruning structure record.

    `kwargs` are `from_pretrained` keywords; for a pruned checkpoint only `dtype` and a single-device `device_map`.
    """
    if is_pruned(model_dir):
        from ..pruning import load_pruned

        return load_pruned(model_dir, model_class, **kwargs)
    return model_class.from_pretrained(str(model_dir), **kwargs).eval()


def empty_model(folder: Path, model_class, config=None) -> nn.Module:
    """The checkpoint's model with its parameters on the meta device (buffers real), sliced to the recorded shapes.

    `config` defaults to the folder's config.json; the weights are the caller's to load (assign, not copy).
    """
    from ..pruning.structure import apply_structure

    config = config if config is not None else AutoConfig.from_pretrained(str(folder))
    with init_empty_weights():
        model = model_class.from_config(config)
    if is_pruned(folder):
        apply_structure(model, read_json(Path(folder) / STRUCTURE_FILE))
    return model


def save_pruning_structure(model: nn.Module, out_dir: Path) -> None:
    """Write the model's pruning structure record into `out_dir` when its config cannot describe its blocks (a
    stale record left by an earlier save is removed, like `save_pruned`)."""
    from ..pruning.adapters import is_supported
    from ..pruning.checkpoint import write_structure_record

    if is_supported(model):
        write_structure_record(model, out_dir)
    else:
        (Path(out_dir) / STRUCTURE_FILE).unlink(missing_ok=True)


def check_loaded(model: nn.Module, path: Path) -> None:
    """Raise when a parameter of a model built on the meta device got no weight from the checkpoint."""
    missing = sorted(name for name, parameter in model.named_parameters(remove_duplicate=False) if parameter.is_meta)
    if missing:
        raise HfCompressError(f"{path}: the checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
