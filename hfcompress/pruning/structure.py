"""The pruning structure: per-layer shapes that a pruned model's config cannot otherwise express.

After global head pruning, for example, BERT layers keep different numbers of heads, but its config has one
`num_attention_heads` (which also sets the head size). The pruning functions then record every block's shape in
the config itself, as `config.pruning_structure`, and give the model the `Compressed<Class>` class of
`hfcompress/modeling_hfcompress.py`, so that any `save_pretrained` writes the record into config.json and ships that
modeling file with `auto_map`: `AutoModel*.from_pretrained(folder, trust_remote_code=True)` then rebuilds the
shapes with transformers alone, and `hfcompress.from_pretrained` with its own copy of the same code.

    "pruning_structure": {"format_version": 1, "layers_kept": [0, 2, 4], "attention_heads": [12, 8, 10],
                          "key_value_heads": [12, 8, 10], "ffn_sizes": [1536, 1200, 1536]}

The config keeps the shapes a fresh model is built with (the largest ones); `layers_kept` names the original index
of each remaining block.
"""

from __future__ import annotations


from transformers import PreTrainedModel

from ..errors import HfCompressError
from ..modeling_hfcompress import (
    STRUCTURE_FORMAT_VERSION,
    REMOTE_CODE_KEYS,
    STRUCTURE_KEY,
    CompressedModelMixin,
    compressed_class,
)
from .adapters import LayerShape, adapter_for, is_supported

# Set on each block the first time blocks are dropped, so a saved structure can say which original layers remain.
ORIGINAL_INDEX_ATTRIBUTE = "hfcompress_original_index"


def layer_shapes(model: PreTrainedModel) -> list[LayerShape]:
    """Heads, key/value heads and feed-forward width of every block, read from the weights themselves."""
    adapter = adapter_for(model)
    return [adapter.layer_shape(layer) for layer in adapter.layers(model)]


def needs_structure_record(model: PreTrainedModel) -> bool:
    """True when a model built from the config's shared sizes would not have this model's block shapes.

    Models of architectures that pruning does not support never need one (nothing here pruned them).
    """
    if not is_supported(model):
        return False
    expected = adapter_for(model).config_layer_shape(model.config)
    return any(shape != expected for shape in layer_shapes(model))


def structure_record(model: PreTrainedModel) -> dict:
    shapes = layer_shapes(model)
    return {
        "format_version": STRUCTURE_FORMAT_VERSION,
        "layers_kept": original_layer_indices(model),
        "attention_heads": [shape.heads for shape in shapes],
        "key_value_heads": [shape.kv_heads for shape in shapes],
        "ffn_sizes": [shape.ffn_size for shape in shapes],
    }


def record_structure(model: PreTrainedModel) -> None:
    """Keep `config.pruning_structure` and the model's class in step with its blocks' shapes.

    Blocks of different shapes: the record goes into the config and the model becomes `Compressed<Class>` (whose
    `save_pretrained` also writes the modeling file and `auto_map`). Shapes the config expresses: neither.
    """
    if is_supported(model) and needs_structure_record(model):
        setattr(model.config, STRUCTURE_KEY, structure_record(model))
        model.__class__ = compressed_class(type(model))
        return
    if hasattr(model.config, STRUCTURE_KEY):
        delattr(model.config, STRUCTURE_KEY)
    if isinstance(model, CompressedModelMixin) and not needs_remote_code(model.config):
        model.__class__ = plain_class(type(model))


def plain_class(cls: type) -> type:
    """The transformers class a `Compressed<Class>` extends (the class itself when it is not one)."""
    return next(base for base in cls.__mro__ if not issubclass(base, CompressedModelMixin))


def needs_remote_code(config) -> bool:
    """Whether the config has fields only `Compressed<Class>` loads (pruned shapes, quanto or 8/4-bit embeddings)."""
    return any(getattr(config, key, None) for key in REMOTE_CODE_KEYS)


def structure_of(config) -> dict | None:
    """The pruning structure a config carries, or None."""
    return getattr(config, STRUCTURE_KEY, None) or None


def original_layer_indices(model: PreTrainedModel) -> list[int]:
    """For each remaining block, its index in the model before any layers were dropped."""
    layers = adapter_for(model).layers(model)
    return [getattr(layer, ORIGINAL_INDEX_ATTRIBUTE, index) for index, layer in enumerate(layers)]


def set_original_layer_indices(model: PreTrainedModel, indices: list[int]) -> None:
    layers = adapter_for(model).layers(model)
    if len(indices) != len(layers):
        raise HfCompressError(f"{STRUCTURE_KEY}: layers_kept has {len(indices)} entries for {len(layers)} layers")
    for layer, index in zip(layers, indices, strict=True):
        setattr(layer, ORIGINAL_INDEX_ATTRIBUTE, index)
