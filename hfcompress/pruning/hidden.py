"""Hidden-size (residual width) pruning: remove channels of the residual stream from every part that carries it.

    scores = hidden_importance(model, calibration_batches)              # Tensor [hidden_size]
    channels = select_hidden(scores, size=256, multiple=32)             # the channels to remove
    corrections = norm_corrections(model, calibration_batches, channels)  # optional, see below
    prune_hidden(model, channels, corrections)

A channel goes from the embedding tables (word, position, token type), from the input of every projection that
reads the stream (attention query/key/value, FFN inputs, pooler, classifier, LM head), the output of every
projection that writes it (attention output, FFN output, pooler), and from every norm; tied embeddings stay tied.
Head sizes and FFN widths are unchanged. Minitron (Muralidharan et al. 2024) prunes this axis ("embedding
channels") ranked by the magnitude of the LayerNorm outputs on calibration data, which `method="activation"` does.

Exactness: the pruned model computes what the full model computes with the removed channels zeroed everywhere,
except for the norms' statistics, which the removed channels no longer enter. For RMSNorm that difference is one
factor per token, sqrt(mean square over the kept channels / over all of them): `norm_corrections` measures its mean
on calibration data and folds it into the norm's weight, which is exact when the removed channels carry nothing
(up to the norm's epsilon). LayerNorm also subtracts a mean over the channels; its correction folds the mean ratio
of the standard deviations into the weight and the mean shift of the centre into the bias, which is a first-order
match, not exact.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from huggingface_hub.errors import StrictDataclassError

from ..errors import HfCompressError
from .adapters import ArchitectureAdapter, ResidualParts, adapter_for
from .importance import LossFn, _batch_loss, _evaluating, _model_inputs, _on_device
from .slicing import keep_inputs, keep_outputs
from .surgery import sync_config

HIDDEN_METHODS = ("activation", "gradient")
# Integer attributes of modules that mirror the hidden size (LlamaMLP.hidden_size, GPT2Model.embed_dim,
# DistilBERT attention .dim); none of the supported forwards reads them, but they should not lie.
MIRRORED_ATTRIBUTES = ("hidden_size", "embed_dim", "dim")


@dataclass(frozen=True)
class NormCorrection:
    """How one norm's parameters change so its output over the kept channels matches the full model's."""

    scale: float  # multiplies the weight: mean ratio of the kept channels' RMS (LayerNorm: std) to all channels'
    centre_shift: float = 0.0  # LayerNorm: mean of (centre over kept - centre over all) / std over all, times weight


# ------------------------------------------------------------------------------------------------ importance


def hidden_importance(model: PreTrainedModel, dataloader: Iterable[dict], method: str = "activation",
                      loss_fn: LossFn | None = None) -> torch.Tensor:
    """One score per hidden channel (Tensor [hidden_size]); low means the channel can go.

    "activation" (Minitron): the mean |output| of every norm over the non-padded tokens, summed over the norms.
    "gradient": expected |d loss / d gate| of one gate per channel that multiplies the outputs of every norm (what
    every reader of the stream sees), as head importance does for heads.
    """
    if method not in HIDDEN_METHODS:
        raise HfCompressError(f"hidden_importance: unknown method {method!r} (use one of {', '.join(HIDDEN_METHODS)})")
    norms = adapter_for(model).residual_parts(model).norms
    if not norms:
        raise HfCompressError(f"hidden_importance: {type(model).__name__} has no norms to measure the channels at")
    if method == "activation":
        return _norm_output_magnitudes(model, norms, dataloader)
    return _norm_output_gradients(model, norms, dataloader, loss_fn)


def _norm_output_magnitudes(model, norms: Sequence[nn.Module], dataloader) -> torch.Tensor:
    totals = torch.zeros(model.config.hidden_size)

    def measure(norm, output, weights):
        totals.add_((output.abs() * weights.unsqueeze(-1)).flatten(0, -2).sum(0).cpu())

    return totals / _over_calibration_tokens(model, norms, dataloader, measure, at_input=False)


def _over_calibration_tokens(model, norms: Sequence[nn.Module], dataloader, measure, at_input: bool) -> float:
    """Run the batches, calling `measure(norm, hidden, token_weights)` with each norm's input (or output) in
    float32 and 1/0 weights for real/padding tokens; returns how many real tokens there were."""
    mask = {}

    def hook(module, args, output=None):
        hidden = (args[0] if at_input else output).detach().float()
        measure(module, hidden, _token_weights(mask["current"], hidden))

    tokens = 0.0
    with _evaluating(model), torch.no_grad(), _hooked(norms, hook, pre=at_input):
        for batch in dataloader:
            batch = _on_device(batch, model.device)
            mask["current"] = batch.get("attention_mask")
            model(**_model_inputs(batch, with_labels=False))
            tokens += _token_count(batch)
    if tokens == 0:
        raise HfCompressError("hidden channels: the calibration dataloader yielded no tokens")
    return tokens


def _norm_output_gradients(model, norms: Sequence[nn.Module], dataloader, loss_fn) -> torch.Tensor:
    dtype = next(model.parameters()).dtype
    gate = torch.ones(model.config.hidden_size, dtype=dtype, device=model.device, requires_grad=True)
    total = torch.zeros(model.config.hidden_size, device=model.device)
    batches = 0

    def gated(module, args, output):
        return output * gate

    with _evaluating(model), _hooked(norms, gated):
        for batch in dataloader:
            (gradient,) = torch.autograd.grad(_batch_loss(model, batch, loss_fn), [gate])
            total += gradient.abs().float()
            batches += 1
    if batches == 0:
        raise HfCompressError("importance: the calibration dataloader yielded no batches")
    return (total / batches).cpu()


def _token_weights(attention_mask: torch.Tensor | None, hidden: torch.Tensor) -> torch.Tensor:
    """1 for real tokens, 0 for padding, shaped like `hidden` [batch, tokens, channels] without its channels."""
    if attention_mask is None or tuple(hidden.shape[:-1]) != tuple(attention_mask.shape):
        return torch.ones(hidden.shape[:-1], device=hidden.device)
    return attention_mask.to(device=hidden.device, dtype=torch.float32)


def _token_count(batch: dict) -> float:
    mask = batch.get("attention_mask")
    return float(mask.sum()) if mask is not None else float(batch["input_ids"].numel())


@contextmanager
def _hooked(modules: Sequence[nn.Module], hook, pre: bool = False):
    register = (lambda module: module.register_forward_pre_hook(hook)) if pre else \
        (lambda module: module.register_forward_hook(hook))
    handles = [register(module) for module in dict.fromkeys(modules)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# ------------------------------------------------------------------------------------------------ selection


def select_hidden(scores, size: int | None = None, sparsity: float | None = None, multiple: int = 1) -> list[int]:
    """The channels to remove (ascending): the lowest-scored ones, keeping `size` channels, or removing `sparsity`
    of them with the kept width rounded to the nearest multiple of `multiple`."""
    scores = torch.as_tensor(scores, dtype=torch.float32).flatten()
    width = len(scores)
    if (size is None) == (sparsity is None):
        raise HfCompressError("give exactly one of size or sparsity")
    if not torch.isfinite(scores).all():
        raise HfCompressError("importance scores contain NaN or infinite values")
    kept = size if size is not None else rounded_width(width - math.floor(sparsity * width), width, multiple)
    if not 0 < kept < width:
        raise HfCompressError(f"size {kept} must be between 1 and the current hidden size {width} (exclusive)")
    if kept % multiple:
        raise HfCompressError(f"size {kept} is not a multiple of {multiple}")
    return sorted(torch.argsort(scores, stable=True)[:width - kept].tolist())


def rounded_width(width: int, limit: int, multiple: int) -> int:
    """`width` rounded to the nearest multiple of `multiple` (ties upwards), at least one multiple, at most `limit`
    rounded down."""
    nearest = max(multiple, multiple * math.floor(width / multiple + 0.5))
    return min(nearest, limit // multiple * multiple)


# ------------------------------------------------------------------------------------------------ norm statistics


def norm_corrections(model: PreTrainedModel, dataloader: Iterable[dict], channels: Iterable[int]) -> list[NormCorrection]:
    """For every norm of the residual stream (in `residual_parts` order), the correction that makes its output over
    the kept channels match the full model's on average, measured on the norm's inputs over the non-padded tokens."""
    norms = adapter_for(model).residual_parts(model).norms
    kept = _kept(channels, model.config.hidden_size).to(model.device)
    sums = {id(norm): torch.zeros(2, dtype=torch.float64) for norm in norms}

    def measure(norm, x, weights):
        scale, shift = _token_ratios(x, kept, isinstance(norm, nn.LayerNorm))
        sums[id(norm)] += torch.stack([(scale * weights).sum(), (shift * weights).sum()]).double().cpu()

    tokens = _over_calibration_tokens(model, norms, dataloader, measure, at_input=True)
    return [NormCorrection(float(sums[id(norm)][0] / tokens), float(sums[id(norm)][1] / tokens)) for norm in norms]


def _token_ratios(x: torch.Tensor, kept: torch.Tensor, centred: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: the kept channels' spread over all channels' (RMS, or std when `centred`), and for LayerNorm the
    shift of the centre in units of the full std."""
    part = x.index_select(-1, kept)
    if not centred:
        ratio = part.pow(2).mean(-1).sqrt() / x.pow(2).mean(-1).sqrt().clamp_min(1e-12)
        return ratio, torch.zeros_like(ratio)
    full_std = x.var(-1, unbiased=False).sqrt().clamp_min(1e-12)
    ratio = part.var(-1, unbiased=False).sqrt() / full_std
    return ratio, (part.mean(-1) - x.mean(-1)) / full_std


# ------------------------------------------------------------------------------------------------ surgery


def prune_hidden(model: PreTrainedModel, channels: Iterable[int],
                 corrections: Sequence[NormCorrection] | None = None) -> PreTrainedModel:
    """Remove hidden channels (indices into the current hidden size) everywhere, in place; `corrections` (from
    `norm_corrections`, measured with the same channels) adjust the norms. Rewrites config.hidden_size (and, where
    the config derives the head size from it, num_attention_heads) and keeps the pruning structure up to date."""
    adapter = adapter_for(model)
    width = model.config.hidden_size
    removed = {int(channel) for channel in channels}
    bad = sorted(channel for channel in removed if not 0 <= channel < width)
    if bad:
        raise HfCompressError(f"hidden channel index {bad[0]} is out of range (there are {width})")
    if len(removed) == width:
        raise HfCompressError(f"cannot prune all {width} hidden channels")
    if not removed:
        return model
    size = width - len(removed)
    head_size = _head_size(adapter, model)
    if not adapter.config_has_head_dim and size % head_size:
        raise HfCompressError(f"{model.config.model_type} derives the head size from hidden_size / "
                              f"num_attention_heads: the hidden size must stay a multiple of the head size "
                              f"{head_size}, not {size}")
    refusal = _config_refusal(model.config, _config_updates(adapter, size, head_size))
    if refusal:
        raise HfCompressError(f"hidden size {size}: {type(model.config).__name__} refuses it: {refusal}")
    parts = adapter.residual_parts(model)
    if corrections is not None and len(corrections) != len(parts.norms):
        raise HfCompressError(f"{len(corrections)} norm corrections for {len(parts.norms)} norms")
    pinned_ffn = adapter.config_layer_shape(model.config).ffn_size  # GPT-2 derives it from the hidden size
    _slice_residual(model, parts, _kept(removed, width), corrections)
    _mirror_width(model, width, size)
    _sync_hidden_config(model, adapter, size, head_size, pinned_ffn)
    return model


def _slice_residual(model, parts: ResidualParts, kept: torch.Tensor, corrections) -> None:
    embedding, output = model.get_input_embeddings(), model.get_output_embeddings()
    tied = output is not None and output.weight is embedding.weight
    for table in parts.embeddings:
        _check_plain(table, nn.Embedding)
        table.weight = _sliced(table.weight, 1, kept)
        table.embedding_dim = len(kept)
    for index, norm in enumerate(parts.norms):
        correction = corrections[index] if corrections is not None else None
        _slice_norm(norm, kept, correction)
    for module in parts.readers:
        keep_inputs(module, kept)
    for module in parts.writers:
        keep_outputs(module, kept)
    if tied:
        output.weight = embedding.weight


def _slice_norm(norm: nn.Module, kept: torch.Tensor, correction: NormCorrection | None) -> None:
    weight = norm.weight.index_select(0, kept.to(norm.weight.device))
    bias = norm.bias.index_select(0, kept.to(norm.bias.device)) if getattr(norm, "bias", None) is not None else None
    if correction is not None:
        if bias is not None:
            bias = bias + weight * correction.centre_shift
        weight = weight * correction.scale
    norm.weight = nn.Parameter(weight.detach().clone(), requires_grad=norm.weight.requires_grad)
    if bias is not None:
        norm.bias = nn.Parameter(bias.detach().clone(), requires_grad=norm.bias.requires_grad)
    if isinstance(norm, nn.LayerNorm):
        norm.normalized_shape = (len(kept),)


def _mirror_width(model: nn.Module, old: int, new: int) -> None:
    for module in model.modules():
        for name in MIRRORED_ATTRIBUTES:
            if type(getattr(module, name, None)) is int and getattr(module, name) == old:
                setattr(module, name, new)


def _sync_hidden_config(model, adapter: ArchitectureAdapter, size: int, head_size: int, ffn_size: int) -> None:
    config = model.config
    if getattr(config, adapter.ffn_size_attribute, None) is None:
        setattr(config, adapter.ffn_size_attribute, ffn_size)
    for name, value in _config_updates(adapter, size, head_size).items():
        setattr(config, name, value)
    sync_config(model, adapter)


def _config_updates(adapter: ArchitectureAdapter, size: int, head_size: int) -> dict:
    """The config after the cut: the new hidden size, and the head size kept (written where the config names it,
    else through the head count that hidden_size / num_attention_heads makes it)."""
    if adapter.config_has_head_dim:
        return {"hidden_size": size, "head_dim": head_size}
    return {"hidden_size": size, "num_attention_heads": size // head_size}


def _config_refusal(config, updates: dict) -> str | None:
    """transformers' own validation of the config with `updates`: its message, or None when it passes."""
    candidate = copy.deepcopy(config)
    try:
        for name, value in updates.items():
            setattr(candidate, name, value)
        if hasattr(candidate, "validate"):
            candidate.validate()
    except (ValueError, StrictDataclassError) as error:  # a strict config's says which validator, then why
        return str(error).strip().splitlines()[-1].strip()
    return None


def hidden_size_multiple(model: PreTrainedModel) -> int:
    """What every hidden size this model's config accepts is a multiple of: the head size where the config derives
    it as hidden_size / num_attention_heads (BERT, GPT-2), and the head count where the config class insists that it
    divides the hidden size although it names head_dim (transformers' LlamaConfig)."""
    adapter = adapter_for(model)
    config, head_size = model.config, _head_size(adapter, model)
    multiple = 1 if adapter.config_has_head_dim else head_size
    heads = config.num_attention_heads
    if multiple % heads and _config_refusal(config, _config_updates(adapter, multiple * (heads + 1), head_size)):
        multiple = math.lcm(multiple, heads)
    return multiple


def _head_size(adapter: ArchitectureAdapter, model) -> int:
    return adapter.attention(adapter.layers(model)[0]).head_size


def _kept(removed: Iterable[int], width: int) -> torch.Tensor:
    removed = set(removed)
    return torch.tensor([channel for channel in range(width) if channel not in removed], dtype=torch.long)


def _sliced(parameter: nn.Parameter, dim: int, kept: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(parameter.index_select(dim, kept.to(parameter.device)).clone(),
                        requires_grad=parameter.requires_grad)


def _check_plain(module: nn.Module, expected: type) -> None:
    if type(module) is not expected:
        raise HfCompressError(f"cannot slice a {type(module).__name__}: hidden-size pruning needs plain "
                              f"{expected.__name__} weights (prune before quantizing)")
