"""The structure record: per-layer shapes that a pruned model's config cannot express.

After global head pruning, for example, BERT layers keep different numbers of heads, but its config has one
`num_attention_heads` (which also sets the head size). Such a checkpoint carries `pruning_structure.json` beside
config.json; the config keeps the shapes a fresh model is built with, and the record says how to slice each block
before the weights are loaded.
"""

from __future__ import annotations

from transformers import PreTrainedModel

from ..errors import HfCompressError
from .adapters import LayerShape, adapter_for, is_supported
from .surgery import original_layer_indices, prune_ffn, prune_heads, set_original_layer_indices

STRUCTURE_FILE = "pruning_structure.json"
FORMAT_VERSION = 1


def layer_shapes(model: PreTrainedModel) -> list[LayerShape]:
    """Heads, key/value heads and feed-forward width of every block, read from the weights themselves."""
    adapter = adapter_for(model)
    return [adapter.layer_shape(layer) for layer in adapter.layers(model)]


def needs_structure_record(model: PreTrainedModel) -> bool:
    """True when a model built from `model.config` would not have this model's block shapes.

    Models of architectures that pruning does not support never need one (nothing here pruned them).
    """
    if not is_supported(model):
        return False
    expected = adapter_for(model).config_layer_shape(model.config)
    return any(shape != expected for shape in layer_shapes(model))


def structure_record(model: PreTrainedModel) -> dict:
    shapes = layer_shapes(model)
    return {
        "format_version": FORMAT_VERSION,
        "layers_kept": original_layer_indices(model),
        "attention_heads": [shape.heads for shape in shapes],
        "key_value_heads": [shape.kv_heads for shape in shapes],
        "ffn_sizes": [shape.ffn_size for shape in shapes],
    }


def apply_structure(model: PreTrainedModel, record: dict) -> PreTrainedModel:
    """Slice a model freshly built from its config down to the recorded shapes (weights are loaded afterwards).

    Which heads and neurons are cut does not matter here: the saved weights overwrite all that remains.
    """
    current = layer_shapes(model)
    targets = _recorded_shapes(record, len(current))
    heads_to_remove, neurons_to_remove = {}, {}
    for index, (shape, target) in enumerate(zip(current, targets, strict=True)):
        _check_fits(index, shape, target)
        heads_to_remove[index] = _heads_beyond(shape, target)
        neurons_to_remove[index] = range(target.ffn_size, shape.ffn_size)
    prune_heads(model, heads_to_remove)
    prune_ffn(model, neurons_to_remove)
    set_original_layer_indices(model, record["layers_kept"])
    return model


def _recorded_shapes(record: dict, num_layers: int) -> list[LayerShape]:
    if record.get("format_version") != FORMAT_VERSION:
        raise HfCompressError(f"{STRUCTURE_FILE}: unsupported format_version {record.get('format_version')!r}")
    columns = [record[key] for key in ("attention_heads", "key_value_heads", "ffn_sizes", "layers_kept")]
    if any(len(column) != num_layers for column in columns):
        raise HfCompressError(f"{STRUCTURE_FILE}: its layer count differs from config.json's ({num_layers})")
    return [LayerShape(*shape) for shape in zip(*columns[:3], strict=True)]


def _check_fits(index: int, shape: LayerShape, target: LayerShape) -> None:
    fits = (
        target.heads <= shape.heads
        and target.kv_heads <= shape.kv_heads
        and target.ffn_size <= shape.ffn_size
        and target.heads % target.kv_heads == 0
        and target.heads // target.kv_heads <= shape.heads // shape.kv_heads
    )
    if not fits:
        raise HfCompressError(f"{STRUCTURE_FILE}: layer {index} shape {target} does not fit config.json ({shape})")


def _heads_beyond(shape: LayerShape, target: LayerShape) -> list[int]:
    """Query heads to remove so that the first `target.kv_heads` groups keep `target` heads each."""
    group_size = shape.heads // shape.kv_heads
    kept_per_group = target.heads // target.kv_heads
    kept = {group * group_size + offset for group in range(target.kv_heads) for offset in range(kept_per_group)}
    return [head for head in range(shape.heads) if head not in kept]
