"""Where the prunable parts of each architecture family live.

One small adapter per family names the transformer blocks, the attention projections, the feed-forward
projections, the module attributes the forward pass reads, and the config attributes that describe the shapes.
The slicing itself is shared (see `surgery.py`); an adapter only says *where* and *what to update*.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from ..errors import HfCompressError
from .slicing import in_features, keep_outputs, out_features


@dataclass(frozen=True)
class AttentionParts:
    module: nn.Module  # the attention module whose head-count attributes the forward pass reads
    query: nn.Module
    key: nn.Module
    value: nn.Module
    output: nn.Module  # its input holds the heads side by side, head_size features each
    head_size: int


@dataclass(frozen=True)
class FfnParts:
    module: nn.Module
    inputs: tuple[nn.Module, ...]  # projections whose output features are the neurons
    output: nn.Module  # the projection whose input features are the neurons


@dataclass(frozen=True)
class ResidualParts:
    """Everything whose weights carry the residual stream's channels (the hidden size)."""

    embeddings: tuple[nn.Embedding, ...]  # word, position and token-type tables: one column per channel
    norms: tuple[nn.Module, ...]  # LayerNorm / RMSNorm over the channels
    readers: tuple[nn.Module, ...]  # projections whose input features are the channels
    writers: tuple[nn.Module, ...]  # projections whose output features are the channels


@dataclass(frozen=True)
class LayerShape:
    heads: int  # query heads
    kv_heads: int  # key/value heads (equal to `heads` without grouped-query attention)
    ffn_size: int


class ArchitectureAdapter:
    layers_path: str  # dotted path from the base model to the ModuleList of blocks
    ffn_size_attribute: str  # config attribute holding the feed-forward width
    kv_heads_attribute: str | None = None  # config attribute holding the key/value head count (GQA models)
    # True when the config names the head size (`head_dim`), so a new head count keeps the head size.
    # BERT-style configs derive it as hidden_size / num_attention_heads, so their head counts cannot change.
    config_has_head_dim: bool = False
    # Residual stream: embedding tables and norms outside the blocks (paths from the base model, absent ones
    # skipped), the norms inside each block, and projections outside the blocks that map the stream to itself
    # (BERT's pooler): the config sizes both their sides with hidden_size.
    embedding_paths: tuple[str, ...] = ()
    outer_norm_paths: tuple[str, ...] = ()
    block_norm_paths: tuple[str, ...] = ()
    outer_square_paths: tuple[str, ...] = ()

    def attention(self, layer: nn.Module) -> AttentionParts:
        raise NotImplementedError

    def ffn(self, layer: nn.Module) -> FfnParts:
        raise NotImplementedError

    def set_head_counts(self, parts: AttentionParts, heads: int, kv_heads: int) -> None:
        """Update the attributes the attention forward reads after its projections were sliced."""
        raise NotImplementedError

    def set_ffn_size(self, parts: FfnParts, size: int) -> None:
        """Update attributes that mirror the feed-forward width (most modules keep none)."""

    def check_can_drop_layers(self, config) -> None:
        """Raise HfCompressError when dropping blocks would change what the remaining ones compute."""

    def after_layers_dropped(self, model: PreTrainedModel) -> None:
        """Update model attributes that mirror the number or kinds of blocks."""

    # Shared behaviour -------------------------------------------------------------------------------------

    def layers(self, model: PreTrainedModel) -> nn.ModuleList:
        return model.base_model.get_submodule(self.layers_path)

    def set_layers(self, model: PreTrainedModel, layers: nn.ModuleList) -> None:
        parent_path, _, name = self.layers_path.rpartition(".")
        setattr(model.base_model.get_submodule(parent_path), name, layers)

    def head_counts(self, parts: AttentionParts) -> tuple[int, int]:
        return in_features(parts.output) // parts.head_size, out_features(parts.key) // parts.head_size

    def keep_qkv_outputs(self, parts: AttentionParts, query: torch.Tensor, key_value: torch.Tensor) -> None:
        """Keep the given output features of the query projection, and of the key and value projections."""
        keep_outputs(parts.query, query)
        keep_outputs(parts.key, key_value)
        keep_outputs(parts.value, key_value)

    def layer_shape(self, layer: nn.Module) -> LayerShape:
        heads, kv_heads = self.head_counts(self.attention(layer))
        return LayerShape(heads, kv_heads, in_features(self.ffn(layer).output))

    def config_layer_shape(self, config) -> LayerShape:
        """The shape every block gets when the model is built from `config`."""
        heads = config.num_attention_heads
        kv_heads = getattr(config, self.kv_heads_attribute) if self.kv_heads_attribute else heads
        return LayerShape(heads, kv_heads, getattr(config, self.ffn_size_attribute))

    def residual_parts(self, model: PreTrainedModel) -> ResidualParts:
        """The modules that read, write or carry the hidden channels: the base model's (named by the adapter) and
        the task head's (every projection and norm outside the base model whose side is hidden_size wide)."""
        base, hidden = model.base_model, model.config.hidden_size
        readers, writers = [], []
        for layer in self.layers(model):
            attention, ffn = self.attention(layer), self.ffn(layer)
            readers += dict.fromkeys([attention.query, attention.key, attention.value, *ffn.inputs])  # GPT-2: one
            writers += [attention.output, ffn.output]
        squares = _present(self.outer_square_paths, base)
        head_norms, head_readers, head_writers = _task_head_parts(model, hidden)
        return ResidualParts(
            embeddings=_present(self.embedding_paths, base),
            norms=(*_present(self.outer_norm_paths, base),
                   *(norm for layer in self.layers(model) for norm in _present(self.block_norm_paths, layer)),
                   *head_norms),
            readers=(*readers, *squares, *head_readers),
            writers=(*writers, *squares, *head_writers),
        )


class BertAdapter(ArchitectureAdapter):
    """BERT and RoBERTa: encoder.layer[i].attention.{self.query/key/value, output.dense}, intermediate/output."""

    layers_path = "encoder.layer"
    ffn_size_attribute = "intermediate_size"
    embedding_paths = ("embeddings.word_embeddings", "embeddings.position_embeddings",
                       "embeddings.token_type_embeddings")
    outer_norm_paths = ("embeddings.LayerNorm",)
    block_norm_paths = ("attention.output.LayerNorm", "output.LayerNorm")
    outer_square_paths = ("pooler.dense",)

    def attention(self, layer):
        self_attention = layer.attention.self
        return AttentionParts(
            self_attention, self_attention.query, self_attention.key, self_attention.value,
            layer.attention.output.dense, self_attention.attention_head_size,
        )

    def ffn(self, layer):
        return FfnParts(layer.intermediate, (layer.intermediate.dense,), layer.output.dense)

    def set_head_counts(self, parts, heads, kv_heads):
        parts.module.num_attention_heads = heads
        parts.module.all_head_size = heads * parts.head_size


class DistilBertAdapter(ArchitectureAdapter):
    """DistilBERT: transformer.layer[i].attention.{q,k,v,out}_lin and ffn.lin1/lin2."""

    layers_path = "transformer.layer"
    ffn_size_attribute = "hidden_dim"
    embedding_paths = ("embeddings.word_embeddings", "embeddings.position_embeddings")
    outer_norm_paths = ("embeddings.LayerNorm",)
    block_norm_paths = ("sa_layer_norm", "output_layer_norm")

    def attention(self, layer):
        attention = layer.attention
        return AttentionParts(
            attention, attention.q_lin, attention.k_lin, attention.v_lin, attention.out_lin,
            attention.attention_head_size,
        )

    def ffn(self, layer):
        return FfnParts(layer.ffn, (layer.ffn.lin1,), layer.ffn.lin2)

    def set_head_counts(self, parts, heads, kv_heads):
        parts.module.n_heads = heads

    def after_layers_dropped(self, model):
        model.base_model.transformer.n_layers = len(self.layers(model))


class Gpt2Adapter(ArchitectureAdapter):
    """GPT-2: h[i].attn.c_attn is one Conv1D whose output is [q | k | v]; c_proj; mlp.c_fc/c_proj."""

    layers_path = "h"
    ffn_size_attribute = "n_inner"
    embedding_paths = ("wte", "wpe")
    outer_norm_paths = ("ln_f",)
    block_norm_paths = ("ln_1", "ln_2")

    def attention(self, layer):
        attention = layer.attn
        return AttentionParts(
            attention, attention.c_attn, attention.c_attn, attention.c_attn, attention.c_proj, attention.head_dim
        )

    def ffn(self, layer):
        return FfnParts(layer.mlp, (layer.mlp.c_fc,), layer.mlp.c_proj)

    def head_counts(self, parts):
        heads = in_features(parts.output) // parts.head_size
        return heads, heads

    def keep_qkv_outputs(self, parts, query, key_value):
        block = parts.module.split_size  # width of each of the q, k and v column blocks
        keep_outputs(parts.query, torch.cat([query, block + key_value, 2 * block + key_value]))

    def set_head_counts(self, parts, heads, kv_heads):
        parts.module.num_heads = heads
        parts.module.split_size = heads * parts.head_size

    def config_layer_shape(self, config):
        heads = config.num_attention_heads
        return LayerShape(heads, heads, config.n_inner or 4 * config.hidden_size)

    def check_can_drop_layers(self, config):
        if config.scale_attn_by_inverse_layer_idx:
            raise HfCompressError(
                "cannot drop GPT-2 layers when scale_attn_by_inverse_layer_idx is set: "
                "each layer's attention scale depends on its position"
            )


class LlamaAdapter(ArchitectureAdapter):
    """Llama, Mistral, Qwen2 (and SmolLM): layers[i].self_attn.{q,k,v,o}_proj with grouped-query attention,
    mlp.gate_proj/up_proj/down_proj."""

    layers_path = "layers"
    ffn_size_attribute = "intermediate_size"
    kv_heads_attribute = "num_key_value_heads"
    config_has_head_dim = True
    embedding_paths = ("embed_tokens",)
    outer_norm_paths = ("norm",)
    block_norm_paths = ("input_layernorm", "post_attention_layernorm")

    def attention(self, layer):
        attention = layer.self_attn
        return AttentionParts(
            attention, attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj, attention.head_dim
        )

    def ffn(self, layer):
        mlp = layer.mlp
        return FfnParts(mlp, (mlp.gate_proj, mlp.up_proj), mlp.down_proj)

    def set_head_counts(self, parts, heads, kv_heads):
        parts.module.num_key_value_groups = heads // kv_heads

    def set_ffn_size(self, parts, size):
        parts.module.intermediate_size = size

    def after_layers_dropped(self, model):
        base = model.base_model
        if hasattr(base, "has_sliding_layers"):  # Qwen2 builds the sliding-window mask only when a layer needs it
            base.has_sliding_layers = "sliding_attention" in model.config.layer_types


ADAPTERS: dict[str, type[ArchitectureAdapter]] = {
    "bert": BertAdapter,
    "roberta": BertAdapter,
    "distilbert": DistilBertAdapter,
    "gpt2": Gpt2Adapter,
    "llama": LlamaAdapter,
    "mistral": LlamaAdapter,
    "qwen2": LlamaAdapter,
}


def _present(paths: tuple[str, ...], root: nn.Module) -> tuple[nn.Module, ...]:
    """The modules at `paths` under `root`, leaving out those this model does not have (e.g. BERT's pooler)."""
    found = []
    for path in paths:
        try:
            found.append(root.get_submodule(path))
        except AttributeError:
            continue
    return tuple(found)


def _task_head_parts(model: PreTrainedModel, hidden: int) -> tuple[list, list, list]:
    """Norms, readers and writers of the hidden channels outside the base model (classifier, pooler-like dense
    layers, LM head): a projection with hidden_size inputs reads them, one with hidden_size outputs writes them."""
    inside = {id(module) for module in model.base_model.modules()}
    norms, readers, writers = [], [], []
    for module in model.modules():
        if id(module) in inside:
            continue
        if isinstance(module, (nn.Linear, Conv1D)):
            if in_features(module) == hidden:
                readers.append(module)
            if out_features(module) == hidden:
                writers.append(module)
        elif is_norm(module) and module.weight is not None and module.weight.shape == (hidden,):
            norms.append(module)
    return norms, readers, writers


def is_norm(module: nn.Module) -> bool:
    """LayerNorm or an RMSNorm (transformers has one class per model: LlamaRMSNorm, Qwen2RMSNorm...)."""
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")


def is_supported(model: PreTrainedModel) -> bool:
    return model.config.model_type in ADAPTERS


def adapter_for(model: PreTrainedModel) -> ArchitectureAdapter:
    model_type = model.config.model_type
    if model_type not in ADAPTERS:
        raise HfCompressError(
            f"structured pruning does not support model type {model_type!r} (supported: {', '.join(sorted(ADAPTERS))})"
        )
    return ADAPTERS[model_type]()
