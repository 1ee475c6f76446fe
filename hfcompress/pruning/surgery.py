"""Physically remove attention heads, feed-forward neurons and whole blocks, and rewrite the config to match.

Every function works in place on a bare model or a task model (classifier, causal LM) and returns it. Indices
always refer to the model as it is now (after any earlier pruning), and every request is checked before
anything is changed, so a refused request leaves the model untouched.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from huggingface_hub.errors import StrictDataclassError
from torch import nn
from transformers import PreTrainedModel

from ..errors import HfCompressError
from .adapters import ArchitectureAdapter, AttentionParts, adapter_for
from .slicing import in_features, keep_inputs, keep_outputs, unit_features
from .structure import ORIGINAL_INDEX_ATTRIBUTE, record_structure

PER_LAYER_CONFIG_LISTS = ("layer_types", "mlp_layer_types")


@dataclass(frozen=True)
class HeadPlan:
    kept_heads: list[int]  # query heads, ascending
    kept_kv_heads: list[int]  # key/value heads (= groups), ascending


def prune_heads(model: PreTrainedModel, heads: Mapping[int, Iterable[int]]) -> PreTrainedModel:
    """Remove attention heads: `{layer: [query head, ...]}`.

    With grouped-query attention, every key/value group must keep the same number of query heads (a group that
    keeps none loses its key/value head too): remove whole groups, or the same number of heads from every group.
    """
    adapter = adapter_for(model)
    layers = adapter.layers(model)
    plans = {
        index: _plan_heads(index, *adapter.head_counts(adapter.attention(layers[index])), removed)
        for index, removed in _checked_layers(heads, len(layers)).items()
    }
    for index, plan in plans.items():
        _keep_heads(adapter, adapter.attention(layers[index]), plan)
    sync_config(model, adapter)
    return model


def prune_ffn(model: PreTrainedModel, neurons: Mapping[int, Iterable[int]]) -> PreTrainedModel:
    """Remove feed-forward neurons (intermediate features): `{layer: [neuron, ...]}`."""
    adapter = adapter_for(model)
    layers = adapter.layers(model)
    kept_by_layer = {}
    for index, removed in _checked_layers(neurons, len(layers)).items():
        size = in_features(adapter.ffn(layers[index]).output)
        _check_indices(removed, size, f"layer {index}: neuron")
        if len(removed) == size:
            raise HfCompressError(f"layer {index}: cannot prune all {size} feed-forward neurons; drop the layer")
        kept_by_layer[index] = [neuron for neuron in range(size) if neuron not in removed]
    for index, kept in kept_by_layer.items():
        parts = adapter.ffn(layers[index])
        features = torch.tensor(kept, dtype=torch.long)
        for module in parts.inputs:
            keep_outputs(module, features)
        keep_inputs(parts.output, features)
        adapter.set_ffn_size(parts, len(kept))
    sync_config(model, adapter)
    return model


def prune_layers(model: PreTrainedModel, layers_to_drop: Iterable[int]) -> PreTrainedModel:
    """Remove whole transformer blocks; the remaining ones are renumbered 0..n-1 (cache slots, layer_types)."""
    adapter = adapter_for(model)
    layers = adapter.layers(model)
    drop = set(layers_to_drop)
    _check_indices(drop, len(layers), "layer")
    if len(drop) == len(layers):
        raise HfCompressError(f"cannot drop all {len(layers)} layers")
    if not drop:
        return model
    adapter.check_can_drop_layers(model.config)

    kept = [index for index in range(len(layers)) if index not in drop]
    for index, layer in enumerate(layers):
        if not hasattr(layer, ORIGINAL_INDEX_ATTRIBUTE):
            setattr(layer, ORIGINAL_INDEX_ATTRIBUTE, index)
    adapter.set_layers(model, nn.ModuleList([layers[index] for index in kept]))
    for new_index, layer in enumerate(adapter.layers(model)):
        _renumber(layer, new_index)

    config = model.config
    for name in PER_LAYER_CONFIG_LISTS:
        values = getattr(config, name, None)
        if isinstance(values, list) and len(values) == len(layers):
            setattr(config, name, [values[index] for index in kept])
    config.num_hidden_layers = len(kept)
    adapter.after_layers_dropped(model)
    sync_config(model, adapter)
    return model


def _plan_heads(layer: int, num_heads: int, num_kv_heads: int, removed: set[int]) -> HeadPlan:
    """Which query and key/value heads remain after removing `removed`; refuses shapes attention cannot run."""
    _check_indices(removed, num_heads, f"layer {layer}: head")
    kept = [head for head in range(num_heads) if head not in removed]
    if not kept:
        raise HfCompressError(
            f"layer {layer}: cannot prune all {num_heads} attention heads; drop the layer instead (prune_layers)"
        )
    group_size = num_heads // num_kv_heads
    kept_per_group = {group: [h for h in kept if h // group_size == group] for group in range(num_kv_heads)}
    kept_groups = [group for group, members in kept_per_group.items() if members]
    if len({len(kept_per_group[group]) for group in kept_groups}) > 1:
        counts = {group: len(kept_per_group[group]) for group in kept_groups}
        raise HfCompressError(
            f"layer {layer}: grouped-query attention needs the same number of query heads in every key/value group, "
            f"but removing heads {sorted(removed)} would leave {counts} (group size {group_size}): remove whole "
            "groups or the same number of heads from every group"
        )
    return HeadPlan(kept, kept_groups)


def sync_config(model: PreTrainedModel, adapter: ArchitectureAdapter | None = None) -> None:
    """Write the shapes all blocks share into the config, wherever the config can express them.

    Shapes that differ between blocks (or head counts of BERT-style configs, which would change the head size)
    go into `config.pruning_structure` instead, and the model gets the class that saves its modeling code with it
    (see structure.py).
    """
    adapter = adapter or adapter_for(model)
    layers = adapter.layers(model)
    shapes = [adapter.layer_shape(layer) for layer in layers]
    ffn_sizes = {shape.ffn_size for shape in shapes}
    if len(ffn_sizes) == 1:
        _update_if_valid(model.config, {adapter.ffn_size_attribute: ffn_sizes.pop()})
    head_counts = {(shape.heads, shape.kv_heads) for shape in shapes}
    if adapter.config_has_head_dim and len(head_counts) == 1:
        heads, kv_heads = head_counts.pop()
        head_size = adapter.attention(layers[0]).head_size
        _update_if_valid(
            model.config,
            {"head_dim": head_size, "num_attention_heads": heads, adapter.kv_heads_attribute: kv_heads},
        )
    record_structure(model)


def _keep_heads(adapter: ArchitectureAdapter, parts: AttentionParts, plan: HeadPlan) -> None:
    query_features = unit_features(plan.kept_heads, parts.head_size)
    key_value_features = unit_features(plan.kept_kv_heads, parts.head_size)
    adapter.keep_qkv_outputs(parts, query_features, key_value_features)
    keep_inputs(parts.output, query_features)
    adapter.set_head_counts(parts, len(plan.kept_heads), len(plan.kept_kv_heads))


def _update_if_valid(config, updates: dict) -> bool:
    """Apply `updates` to the config only if the resulting config passes transformers' own validation."""
    candidate = copy.deepcopy(config)
    for name, value in updates.items():
        setattr(candidate, name, value)
    try:
        if hasattr(candidate, "validate"):
            candidate.validate()
    except (ValueError, StrictDataclassError):
        return False
    for name, value in updates.items():
        setattr(config, name, value)
    return True


def _renumber(layer: nn.Module, index: int) -> None:
    """Blocks and their attention modules carry `layer_idx` for cache slots and per-layer masks."""
    for module in layer.modules():
        if hasattr(module, "layer_idx"):
            module.layer_idx = index


def _checked_layers(requests: Mapping[int, Iterable[int]], num_layers: int) -> dict[int, set[int]]:
    checked = {int(layer): {int(index) for index in indices} for layer, indices in requests.items()}
    _check_indices(set(checked), num_layers, "layer")
    return {layer: indices for layer, indices in checked.items() if indices}


def _check_indices(indices: set[int], size: int, what: str) -> None:
    bad = sorted(index for index in indices if not 0 <= index < size)
    if bad:
        raise HfCompressError(f"{what} index {bad[0]} is out of range (there are {size})")
