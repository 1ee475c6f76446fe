"""Where each architecture family keeps its transformer blocks (shared with the pruning adapters).

Every family's config answers to `num_hidden_layers` (transformers' `attribute_map` maps it onto GPT-2's
`n_layer` and DistilBERT's `n_layers`), so the block list is the only thing that differs.
"""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedModel

from ..errors import HfCompressError
from ..pruning.adapters import ADAPTERS

# Config lists with one entry per block (e.g. full vs sliding-window attention); they follow the kept blocks.
PER_LAYER_CONFIG_LISTS = ("layer_types", "mlp_layer_types")


def layer_list_path(model: PreTrainedModel) -> str:
    """The blocks' state-dict prefix, e.g. "bert.encoder.layer" or "model.layers" (from the pruning adapters,
    which know where each family keeps its blocks)."""
    model_type = model.config.model_type
    if model_type not in ADAPTERS:
        raise HfCompressError(
            f"distillation does not know where {model_type!r} models keep their layers "
            f"(supported: {', '.join(sorted(ADAPTERS))})"
        )
    is_wrapped = model.base_model is not model  # a task model (…ForSequenceClassification) around the base model
    prefix = model.base_model_prefix + "." if is_wrapped else ""
    return prefix + ADAPTERS[model_type].layers_path


def transformer_layers(model: PreTrainedModel) -> nn.ModuleList:
    return model.get_submodule(layer_list_path(model))


def select_per_layer_lists(config, teacher_layers: list[int]) -> None:
    """Make per-block config lists describe the student's blocks, taken from the given teacher blocks."""
    for name in PER_LAYER_CONFIG_LISTS:
        values = getattr(config, name, None)
        if isinstance(values, list) and len(values) != config.num_hidden_layers:
            setattr(config, name, [values[index] for index in teacher_layers])
