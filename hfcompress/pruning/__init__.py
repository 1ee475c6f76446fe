"""Structured pruning: remove attention heads, feed-forward neurons, whole blocks and hidden channels.

transformers 5 dropped `prune_heads` and head masks, so this package slices the weights itself, updates the
attributes the attention forward reads, rewrites the config, and saves checkpoints that reload.

    scores = head_importance(model, calibration_batches)          # Tensor [layers, heads]
    prune_heads(model, select_heads(scores, sparsity=0.3))         # {layer: [head, ...]}
    prune_ffn(model, select_ffn(ffn_importance(model, method="magnitude"), sparsity=0.2, scope="uniform"))
    prune_layers(model, select_layers(layer_importance(model, calibration_batches), drop=2))
    prune_hidden(model, select_hidden(hidden_importance(model, calibration_batches), size=256, multiple=32))
    model, tokenizer = prune_vocabulary(model, tokenizer, training_texts, min_frequency=1)   # embedding rows
    model.save_pretrained("out/")   # per-layer shapes the config cannot express: config.pruning_structure + modeling code
    model = hfcompress.from_pretrained("out/")   # or AutoModelFor...from_pretrained("out/", trust_remote_code=True)

Supported model types: see `ADAPTERS` (BERT, RoBERTa, DistilBERT, GPT-2, Llama, Mistral, Qwen2).
"""

from .adapters import ADAPTERS, LayerShape, adapter_for
from .checkpoint import load_pruned, save_pruned
from .hidden import (
    NormCorrection,
    hidden_importance,
    hidden_size_multiple,
    norm_corrections,
    prune_hidden,
    select_hidden,
)
from .importance import ffn_importance, head_importance, layer_importance
from .selection import select_ffn, select_heads, select_layers
from .structure import (
    STRUCTURE_KEY,
    layer_shapes,
    needs_structure_record,
    structure_of,
    structure_record,
)
from .surgery import prune_ffn, prune_heads, prune_layers
from .vocabulary import prune_vocabulary

__all__ = [
    "ADAPTERS",
    "STRUCTURE_KEY",
    "LayerShape",
    "NormCorrection",
    "adapter_for",
    "ffn_importance",
    "head_importance",
    "hidden_importance",
    "hidden_size_multiple",
    "layer_importance",
    "layer_shapes",
    "load_pruned",
    "needs_structure_record",
    "norm_corrections",
    "prune_ffn",
    "prune_heads",
    "prune_hidden",
    "prune_layers",
    "prune_vocabulary",
    "save_pruned",
    "select_ffn",
    "select_heads",
    "select_hidden",
    "select_layers",
    "structure_of",
    "structure_record",
]
