"""What every quantization backend is: one class that owns its format end to end.

A backend class (one file each, registered with `@register_backend`, like transformers' `quantizers/`) has
- `options_model`: the typed options of a variant (`{backend: NAME, ...}` in a recipe),
- `default_name()`: the variant's folder-safe name (bnb-nf4, onnx-int8, gguf-q8_0, ...),
- `check(model)`: the refusals that depend on the model's shape, run by `hfcompress validate` on the meta device,
- `quantize` / `save` / `load`: the format itself,
- `estimated_size(model)`: bytes on disk from the shapes alone (for the plan and the search),
- `requirements`: the packages it needs at run time; `runtime_packages` what a user needs to load the checkpoint,
- `loading_arguments` / `usage_notes` / `usage_code`: what the model card says about loading it.

A backend instance is bound to one variant's options: `BitsAndBytesBackend(options).quantize(folder, ...)`.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from transformers import AutoConfig

from ..errors import HfCompressError
from ..evaluation import memory_footprint, size_on_disk  # noqa: F401  (re-exported)
from ..fileio import read_json, write_json
from ..modeling_hfcompress import STRUCTURE_KEY
from ..pruning import load_pruned, save_pruned  # noqa: F401  (save_pruned is shared with the backends)

RECORD_FILE = "quantization.json"


class OptionError(HfCompressError):
    """A variant's option that cannot work with the model; `option` names it, so the plan can point at its line."""

    def __init__(self, option: str, problem: str):
        super().__init__(f"{option}: {problem}")
        self.option, self.problem = option, problem


class VariantOptions(BaseModel):
    """What every variant has: its backend's name and, optionally, a name that replaces the derived one."""

    model_config = ConfigDict(extra="forbid")

    backend: str
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

    def options_given(self, keys: Iterable[str]) -> list[str]:
        """The keys among `keys` set to something other than their default (a resolved recipe writes every field,
        so a key left at its default is harmless where it does not apply)."""
        fields = type(self).model_fields
        return [key for key in keys if key in self.model_fields_set and getattr(self, key) != fields[key].default]


@dataclass(frozen=True)
class Requirement:
    """A package a backend imports at run time: its module name and what to `pip install` for it."""

    module: str
    pip_name: str

    def is_available(self) -> bool:
        try:
            importlib.import_module(self.module)
        except ImportError:
            return False
        return True


class QuantizationBackend:
    """One quantized or exported format (see the module docstring for what a backend owns)."""

    name: ClassVar[str]
    options_model: ClassVar[type[VariantOptions]]
    requirements: ClassVar[tuple[Requirement, ...]] = ()
    runtime_packages: ClassVar[tuple[str, ...]] = ()  # pip names a user needs to load a checkpoint of this format
    hub_tag: ClassVar[str | None] = None  # the Hub's library tag for the format, where it has one
    quantized_types: ClassVar[tuple[str, ...]] = ()  # class names of the modules it puts in place of float ones
    # Formats whose config has one shape for every block cannot hold a model pruned into blocks of different shapes.
    keeps_per_layer_shapes: ClassVar[bool] = True

    def __init__(self, options: VariantOptions):
        self.options = options

    # ------------------------------------------------------------------------------------------ naming

    @property
    def variant_name(self) -> str:
        return self.options.name or self.default_name()

    def default_name(self) -> str:
        raise NotImplementedError

    @property
    def bits(self) -> int | None:
        """Bits per quantized weight (None where the format does not have one number)."""
        return None

    # ------------------------------------------------------------------------------------------ the plan

    def check(self, model: nn.Module) -> None:
        """Raise an HfCompressError when this variant cannot be made of `model` (shapes only: on the meta device).
        The base checks the packages and, for formats with one shape per block, that the blocks share one."""
        self.require_packages()
        if not self.keeps_per_layer_shapes and getattr(model.config, STRUCTURE_KEY, None):
            raise HfCompressError(self._per_layer_refusal())

    def check_checkpoint(self, model_dir: Path) -> None:
        """The checks `check` makes that a checkpoint folder answers without building the model."""
        self.require_packages()
        if not self.keeps_per_layer_shapes and is_pruned_per_layer(model_dir):
            raise HfCompressError(f"{model_dir}: {self._per_layer_refusal()}")

    def _per_layer_refusal(self) -> str:
        return (f"{self.name} cannot hold this model: its blocks differ in shape (per-layer head counts or FFN "
                "widths, config.json `pruning_structure`) and the format has one shape for every block; prune "
                "with scope: uniform, or use backend quanto, bitsandbytes, half or onnx")

    def estimated_size(self, model: nn.Module) -> int | None:
        """Bytes of the weights `save` would write for `model` (shapes only); None where it cannot be said before
        the variant is made."""
        return None

    def unquantized_modules(self, model: nn.Module) -> list[str]:
        """Modules kept in full precision: the task head, and the variant's `skip_modules`."""
        return task_heads(model) + list(getattr(self.options, "skip_modules", []))

    def unquantized_modules_of(self, model_dir: Path, model_class) -> list[str]:
        """`unquantized_modules` of a checkpoint, before its weights are loaded (built on the meta device)."""
        with torch.device("meta"):
            return self.unquantized_modules(model_class.from_config(AutoConfig.from_pretrained(str(model_dir))))

    # ------------------------------------------------------------------------------------------ the format

    def quantize(self, model_dir: Path, model_class, calibration_batches: Iterable[dict] | None = None) -> nn.Module:
        """The full-precision `save_pretrained` folder `model_dir`, quantized."""
        raise NotImplementedError

    def save(self, model: nn.Module, out_dir: Path) -> None:
        """Write a checkpoint of the quantized model (the record file included) that `load` restores."""
        raise NotImplementedError

    def load(self, path: Path, model_class) -> nn.Module:
        raise NotImplementedError

    def require_packages(self) -> None:
        for requirement in self.requirements:
            if not requirement.is_available():
                raise HfCompressError(f"quantization backend {self.name!r} needs the {requirement.module!r} package, "
                                      f"which cannot be imported here; pip install {requirement.pip_name}")

    def write_record(self, out_dir: Path, **extra) -> None:
        """quantization.json: the variant's options at top level (backend, bits / weights / dtype, ...) plus `extra`."""
        write_json(Path(out_dir) / RECORD_FILE,
                   {**self.options.model_dump(mode="json"), "name": self.variant_name, **extra})

    # ------------------------------------------------------------------------------------------ the model card

    def loading_arguments(self, record: dict[str, Any]) -> list[str]:
        """Keyword arguments `from_pretrained` needs for this format, as code (e.g. 'device_map="cpu"')."""
        return []

    def usage_notes(self, record: dict[str, Any]) -> list[str]:
        """Sentences for the card's "How to use" section."""
        return []

    def usage_code(self, repo_id: str, task_type: str, record: dict[str, Any]) -> list[str] | None:
        """Loading code of its own (lines of Python), where transformers' `from_pretrained` is not how it runs."""
        return None


def read_record(path: Path) -> dict:
    record = Path(path) / RECORD_FILE
    if not record.is_file():
        raise HfCompressError(f"{path}: no {RECORD_FILE}, so this is not a checkpoint hfcompress quantized")
    return read_json(record)


def task_heads(model: nn.Module) -> list[str]:
    """The top-level modules with parameters outside the base model (BERT's `classifier`, Llama's `lm_head` or
    `score`). They stay in full precision: they are small, sensitive, and bitsandbytes cannot quantize a head that
    the checkpoint lacks (a freshly initialised classifier fails at its first forward)."""
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


def is_pruned_per_layer(folder: Path) -> bool:
    """Whether a checkpoint's blocks differ in shape (config.json carries a pruning structure)."""
    config = Path(folder) / "config.json"
    return bool(config.is_file() and read_json(config).get(STRUCTURE_KEY))


def load_full_precision(model_dir: Path, model_class, **kwargs) -> nn.Module:
    """`from_pretrained` (its keywords included) of a checkpoint, pruned into blocks of different shapes or not."""
    return load_pruned(model_dir, model_class, **kwargs)
