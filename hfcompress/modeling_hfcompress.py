"""Modeling code for checkpoints compressed by hfcompress: load them with transformers alone.

This file is published beside the weights of a checkpoint whose shapes transformers' own classes cannot build
(blocks pruned to different numbers of heads or feed-forward neurons) or whose weights are optimum-quanto
tensors. config.json names it in `auto_map`, so

    AutoModelForSequenceClassification.from_pretrained(repo_id, trust_remote_code=True)

builds `Compressed<TransformersClass>`: the transformers class itself, with two additions.

- config.json `pruning_structure` (per-layer shapes, one entry per block):
      {"format_version": 1, "layers_kept": [original index of each block],
       "attention_heads": [...], "key_value_heads": [...], "ffn_sizes": [...]}
  The model is built from the config as usual, then each block's projections are cut to these sizes before the
  weights load. The config's own `num_attention_heads` / `intermediate_size` are the largest sizes (after
  hidden-size pruning of a BERT-style config, num_attention_heads is hidden_size / head size, which sets the head
  size, and blocks may keep more heads than that).
- config.json `quanto_quantization` ({"quantization_map", "group_size", "float_outputs"}): the weights were
  quantized with optimum-quanto, which transformers cannot load pre-quantized; `from_pretrained` rebuilds the
  quantized modules with `optimum.quanto.requantize` (pip install optimum-quanto) and loads the saved tensors.
- config.json `quantized_input_embeddings` (a file name): the word embeddings are bitsandbytes 8/4-bit embeddings,
  which transformers' BitsAndBytesConfig does not cover, saved in that file; `from_pretrained` loads the rest as
  usual, then puts them in place.

It imports only torch and transformers (optimum-quanto or bitsandbytes only for checkpoints quantized with them).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import torch
import transformers
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_utils import load_state_dict
from transformers.pytorch_utils import Conv1D
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, cached_file

try:  # transformers 5; earlier versions kept it in modeling_utils
    from transformers.initialization import no_init_weights
except ImportError:
    from transformers.modeling_utils import no_init_weights

CLASS_PREFIX = "Compressed"
STRUCTURE_KEY = "pruning_structure"
QUANTO_KEY = "quanto_quantization"
EMBEDDINGS_KEY = "quantized_input_embeddings"
REMOTE_CODE_KEYS = (STRUCTURE_KEY, QUANTO_KEY, EMBEDDINGS_KEY)  # config fields only this file's classes can load
STRUCTURE_FORMAT_VERSION = 1
HUB_KEYWORDS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder", "token")
AUTO_CLASS_BY_SUFFIX = (  # transformers class name ending -> the Auto class that loads it
    ("ForSequenceClassification", "AutoModelForSequenceClassification"),
    ("ForTokenClassification", "AutoModelForTokenClassification"),
    ("ForQuestionAnswering", "AutoModelForQuestionAnswering"),
    ("ForMaskedLM", "AutoModelForMaskedLM"),
    ("ForCausalLM", "AutoModelForCausalLM"),
    ("LMHeadModel", "AutoModelForCausalLM"),
    ("Model", "AutoModel"),
)


# ------------------------------------------------------------------------------------------- where the parts are
@dataclass(frozen=True)
class Family:
    """Where a family keeps its blocks and projections (paths from the base model, then from one block)."""

    layers: str
    attention: str  # the module whose head-count attributes the attention forward reads
    query: str
    key: str
    value: str
    attention_output: str
    ffn_inputs: tuple[str, ...]  # projections whose outputs are the feed-forward neurons
    ffn_output: str
    head_size: str  # attribute of the attention module


def _bert_heads(attention, heads, kv_heads):
    attention.num_attention_heads = heads
    attention.all_head_size = heads * attention.attention_head_size


def _distilbert_heads(attention, heads, kv_heads):
    attention.n_heads = heads


def _gpt2_heads(attention, heads, kv_heads):
    attention.num_heads = heads
    attention.split_size = heads * attention.head_dim  # c_attn's output is [q | k | v], split_size wide each


def _llama_heads(attention, heads, kv_heads):
    attention.num_key_value_groups = heads // kv_heads


BERT = Family("encoder.layer", "attention.self", "attention.self.query", "attention.self.key",
              "attention.self.value", "attention.output.dense", ("intermediate.dense",), "output.dense",
              "attention_head_size")
DISTILBERT = Family("transformer.layer", "attention", "attention.q_lin", "attention.k_lin", "attention.v_lin",
                    "attention.out_lin", ("ffn.lin1",), "ffn.lin2", "attention_head_size")
GPT2 = Family("h", "attn", "attn.c_attn", "attn.c_attn", "attn.c_attn", "attn.c_proj", ("mlp.c_fc",), "mlp.c_proj",
              "head_dim")
LLAMA = Family("layers", "self_attn", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", "head_dim")
FAMILIES = {  # model_type -> (family, what sets the head counts)
    "bert": (BERT, _bert_heads),
    "roberta": (BERT, _bert_heads),
    "distilbert": (DISTILBERT, _distilbert_heads),
    "gpt2": (GPT2, _gpt2_heads),
    "llama": (LLAMA, _llama_heads),
    "mistral": (LLAMA, _llama_heads),
    "qwen2": (LLAMA, _llama_heads),
}


# ------------------------------------------------------------------------------------------- per-layer shapes
def apply_pruning_structure(model: PreTrainedModel, structure: dict) -> None:
    """Cut each block's projections to the recorded head counts and feed-forward width (before weights load).

    The first heads / neurons are kept: which ones does not matter, the saved weights replace them all.
    """
    if structure.get("format_version") != STRUCTURE_FORMAT_VERSION:
        raise ValueError(f"config.json {STRUCTURE_KEY}: unsupported format_version {structure.get('format_version')!r}")
    model_type = model.config.model_type
    if model_type not in FAMILIES:
        raise ValueError(f"config.json {STRUCTURE_KEY}: model type {model_type!r} is not supported")
    family, set_head_counts = FAMILIES[model_type]
    layers = model.base_model.get_submodule(family.layers)
    columns = [structure[key] for key in ("attention_heads", "key_value_heads", "ffn_sizes")]
    if any(len(column) != len(layers) for column in columns):
        raise ValueError(f"config.json {STRUCTURE_KEY}: {[len(c) for c in columns]} entries for {len(layers)} layers")
    for layer, heads, kv_heads, ffn_size in zip(layers, *columns):
        _cut_attention(layer, family, set_head_counts, heads, kv_heads)
        for name in family.ffn_inputs:
            _keep_first(layer.get_submodule(name), outputs=ffn_size)
        _keep_first(layer.get_submodule(family.ffn_output), inputs=ffn_size)
        mlp = layer.get_submodule(family.ffn_output.rpartition(".")[0])
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = ffn_size


def _cut_attention(layer: nn.Module, family: Family, set_head_counts, heads: int, kv_heads: int) -> None:
    attention = layer.get_submodule(family.attention)
    head_size = getattr(attention, family.head_size)
    if family.query == family.key:  # GPT-2: one fused projection [q | k | v]
        _keep_first(layer.get_submodule(family.query), outputs=heads * head_size, blocks=3)
    else:
        _keep_first(layer.get_submodule(family.query), outputs=heads * head_size)
        _keep_first(layer.get_submodule(family.key), outputs=kv_heads * head_size)
        _keep_first(layer.get_submodule(family.value), outputs=kv_heads * head_size)
    _keep_first(layer.get_submodule(family.attention_output), inputs=heads * head_size)
    set_head_counts(attention, heads, kv_heads)


def _keep_first(module: nn.Module, outputs: int | None = None, inputs: int | None = None, blocks: int = 1) -> None:
    """Give the module `outputs` output features (in each of `blocks` equal blocks) and `inputs` input features: the
    first ones where it has more, new uninitialised ones where it has fewer (a block can keep more heads than the
    config's head count builds when hidden-size pruning lowered that count).

    nn.Linear stores its weight as [out, in], GPT-2's Conv1D as [in, out].
    """
    is_conv1d = isinstance(module, Conv1D)
    out_dim, in_dim = (1, 0) if is_conv1d else (0, 1)
    weight, bias = module.weight, module.bias
    if outputs is not None:
        weight = torch.cat([_resized(block, out_dim, outputs) for block in weight.chunk(blocks, dim=out_dim)],
                           dim=out_dim)
        if bias is not None:
            bias = torch.cat([_resized(block, 0, outputs) for block in bias.chunk(blocks)])
    if inputs is not None:
        weight = _resized(weight, in_dim, inputs)
    module.weight = nn.Parameter(weight.clone(), requires_grad=module.weight.requires_grad)
    if bias is not None:
        module.bias = nn.Parameter(bias.clone(), requires_grad=module.bias.requires_grad)
    if is_conv1d:
        module.nx, module.nf = weight.shape
    else:
        module.out_features, module.in_features = weight.shape


def _resized(tensor: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """The first `size` entries along `dim`, padded with uninitialised ones (the saved weights replace them)."""
    if size <= tensor.shape[dim]:
        return tensor.narrow(dim, 0, size)
    shape = list(tensor.shape)
    shape[dim] = size - tensor.shape[dim]
    return torch.cat([tensor, torch.empty(shape, dtype=tensor.dtype, device=tensor.device)], dim=dim)


# ------------------------------------------------------------------------------------------- optimum-quanto
def load_quanto_weights(model: nn.Module, state_dict: dict, quanto: dict) -> nn.Module:
    """Put optimum-quanto modules where the quantization map says, then load their saved int weights and scales."""
    try:
        from optimum.quanto import requantize
    except ImportError as error:
        raise ImportError("this checkpoint's weights are optimum-quanto tensors: pip install optimum-quanto") from error

    requantize(model, {}, quanto["quantization_map"], device=torch.device("cpu"))
    # requantize would build int4/int2 weights with quanto's default group size: set the saved one, then load.
    set_weight_group_size(model, quanto.get("group_size"))
    model.load_state_dict(state_dict, strict=False)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    missing = sorted(set(model.state_dict()) - set(state_dict) - tied)
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    model.tie_weights()
    for name in quanto.get("float_outputs", []):  # outputs that calibration left in float
        model.get_submodule(name).disable_output_quantization()
    return model.eval()


def set_weight_group_size(model: nn.Module, group_size: int | None) -> None:
    """Quantize (or load) the int4/int2 weights of quanto modules in groups of `group_size` input features."""
    if not group_size:
        return
    try:
        from optimum.quanto import QModuleMixin
    except ImportError as error:
        raise ImportError("this checkpoint's weights are optimum-quanto tensors: pip install optimum-quanto") from error

    for name, module in model.named_modules():
        if isinstance(module, QModuleMixin) and module.weight_qtype is not None and module.weight_qtype.bits < 8:
            in_features = module.weight.numel() // module.weight.shape[0]
            if in_features % group_size:
                raise ValueError(f"group_size {group_size} does not divide the {in_features} input features of {name}")
            module.weight_group_size = group_size


def _read_weights(name_or_path, hub_kwargs: dict) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors: model.safetensors, or every shard its index names (downloaded if needed)."""
    single = cached_file(name_or_path, SAFE_WEIGHTS_NAME, _raise_exceptions_for_missing_entries=False, **hub_kwargs)
    if single is not None:
        return load_state_dict(single)
    with open(cached_file(name_or_path, SAFE_WEIGHTS_INDEX_NAME, **hub_kwargs), encoding="utf-8") as index:
        shards = sorted(set(json.load(index)["weight_map"].values()))
    weights = {}
    for shard in shards:
        weights.update(load_state_dict(cached_file(name_or_path, shard, **hub_kwargs)))
    return weights


# ------------------------------------------------------------------------------------------- 8/4-bit word embeddings
def embedding_from_tensors(tensors: dict[str, torch.Tensor], like: nn.Embedding) -> nn.Embedding:
    """A bitsandbytes Embedding8bit / Embedding4bit holding saved tensors (int8 rows + `weight.SCB` row scales, or
    packed 4-bit data + its `weight.*` quantization state), shaped and typed like the placeholder `like`."""
    try:
        import bitsandbytes as bnb
    except ImportError as error:
        raise ImportError("this checkpoint's word embeddings are bitsandbytes tensors: pip install bitsandbytes") \
            from error

    tensors = dict(tensors)
    num_embeddings, dim = like.num_embeddings, like.embedding_dim
    data = tensors.pop("weight")
    if data.dtype == torch.int8:
        embedding = bnb.nn.Embedding8bit(num_embeddings, dim, device="meta")
        embedding.weight = bnb.nn.Int8Params(data, requires_grad=False, has_fp16_weights=False,
                                             CB=data, SCB=tensors["weight.SCB"])
    else:
        embedding = bnb.nn.Embedding4bit(num_embeddings, dim, device="meta")
        quant_state = {key.removeprefix("weight."): value for key, value in tensors.items()}
        embedding.weight = bnb.nn.Params4bit.from_prequantized(data, quant_state, device="cpu", module=embedding)
    embedding.dtype = like.weight.dtype  # what lookups return
    return embedding


def attach_input_embeddings(model: PreTrainedModel, tensors: dict[str, torch.Tensor]) -> None:
    """Replace the model's (placeholder) word embeddings by the saved bitsandbytes ones, on the model's device."""
    placeholder = model.get_input_embeddings()
    device = placeholder.weight.device if placeholder.weight.device.type != "meta" else torch.device("cpu")
    model.set_input_embeddings(embedding_from_tensors(tensors, like=placeholder).to(device))


def compute_4bit_as_configured(model: nn.Module) -> None:
    """Turn off bitsandbytes' AVX512-BF16 CPU path for 4-bit layers.

    On CPUs with AVX512-BF16, bitsandbytes (0.50) repacks 4-bit weights at the first forward and then multiplies
    in bfloat16 whatever `compute_dtype` says; saving after that writes the per-block scales transposed, so the
    reloaded model is wrong. With this path off, 4-bit layers compute in `compute_dtype`, give the same outputs on
    every CPU and save correctly; they are ~15% slower.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


# ------------------------------------------------------------------------------------------- the classes
class CompressedModelMixin:
    """Put in front of a transformers model class: applies `pruning_structure` before the weights load, restores
    optimum-quanto weights and 8/4-bit word embeddings after."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        structure = getattr(config, STRUCTURE_KEY, None)
        if structure:
            apply_pruning_structure(self, structure)
        if getattr(config, EMBEDDINGS_KEY, None):  # not in model.safetensors: from_pretrained loads them apart
            name = next(name for name, module in self.named_modules() if module is self.get_input_embeddings())
            self._keys_to_ignore_on_load_missing = [*(self._keys_to_ignore_on_load_missing or []),
                                                    rf"(^|\.){re.escape(name)}\.weight$"]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        hub_kwargs = {key: kwargs[key] for key in HUB_KEYWORDS if key in kwargs}
        config = kwargs.get("config")
        if not isinstance(config, transformers.PretrainedConfig):
            config = cls.config_class.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        quanto = getattr(config, QUANTO_KEY, None)
        if quanto:
            return cls._from_quanto_checkpoint(pretrained_model_name_or_path, config, quanto, kwargs)
        loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # (model, info) with output_loading_info
        embeddings_file = getattr(config, EMBEDDINGS_KEY, None)
        if embeddings_file:
            attach_input_embeddings(model, load_state_dict(cached_file(pretrained_model_name_or_path,
                                                                       embeddings_file, **hub_kwargs)))
        if getattr(config, "quantization_config", None):
            compute_4bit_as_configured(model)
        return loaded

    @classmethod
    def _from_quanto_checkpoint(cls, name_or_path, config, quanto: dict, kwargs: dict):
        hub_kwargs = {key: kwargs.pop(key) for key in HUB_KEYWORDS if key in kwargs}
        for ignored in ("config", "trust_remote_code", "adapter_kwargs", "_from_auto", "code_revision"):
            kwargs.pop(ignored, None)
        if kwargs.pop("device_map", "cpu") not in ("cpu", None) or kwargs:
            raise ValueError(f"optimum-quanto checkpoints load on the CPU only, without {sorted(kwargs) or 'device_map'}"
                             "; move the model afterwards with .to(device)")
        with no_init_weights():  # every weight comes from the checkpoint
            model = cls(config)
        return load_quanto_weights(model, _read_weights(name_or_path, hub_kwargs), quanto)


def compressed_class(base: type[PreTrainedModel]) -> type[PreTrainedModel]:
    """`Compressed<base>`: `base` with CompressedModelMixin in front, saved with this file by `save_pretrained`."""
    if issubclass(base, CompressedModelMixin):
        return base
    name = CLASS_PREFIX + base.__name__
    if name not in globals():
        auto_class = next((auto for suffix, auto in AUTO_CLASS_BY_SUFFIX if base.__name__.endswith(suffix)), None)
        if auto_class is None:
            raise ValueError(f"no Auto class loads {base.__name__}")
        cls = type(name, (CompressedModelMixin, base), {"__module__": __name__, "__qualname__": name})
        cls.register_for_auto_class(auto_class)  # save_pretrained then copies this file and writes auto_map
        globals()[name] = cls
    return globals()[name]


def __getattr__(name: str):
    """`auto_map` names e.g. `modeling_hfcompress.CompressedBertForSequenceClassification`: made on first use."""
    base = getattr(transformers, name.removeprefix(CLASS_PREFIX), None) if name.startswith(CLASS_PREFIX) else None
    if isinstance(base, type) and issubclass(base, PreTrainedModel):
        return compressed_class(base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
