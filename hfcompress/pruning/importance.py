"""How much each head, feed-forward neuron and block matters, measured on a calibration set.

Batches are dicts of tensors (input_ids, attention_mask, labels) as the data module builds them; other keys
(e.g. example_index) are not passed to the model. The loss is the model's own `outputs.loss` unless
`loss_fn(outputs, batch)` is given. Gates are put in with forward pre-hooks on
the output projections (transformers 5 has no head masks): each one multiplies its input, unit by unit, by a
vector of ones, so the gradient of the loss with respect to that vector measures each unit.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from ..errors import HfCompressError
from .adapters import adapter_for
from .slicing import in_features, weight_as_out_by_in

LossFn = Callable[[object, dict], torch.Tensor]
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


def head_importance(model: PreTrainedModel, dataloader: Iterable[dict], loss_fn: LossFn | None = None):
    """Michel et al. (2019): expected |d loss / d gate| of a gate on each head's output, normalised per layer
    (L2 norm 1 across a layer's heads). As in the authors' code, the expectation is over batches.

    Returns a Tensor [num_layers, num_heads]; if earlier pruning left layers with different head counts, a list
    with one 1-D tensor per layer.
    """
    adapter = adapter_for(model)
    attentions = [adapter.attention(layer) for layer in adapter.layers(model)]
    outputs = [parts.output for parts in attentions]
    head_counts = [adapter.head_counts(parts)[0] for parts in attentions]
    scores = _gate_gradients(model, dataloader, loss_fn, outputs, head_counts, attentions[0].head_size)
    scores = [layer / (layer.norm() + 1e-20) for layer in scores]
    return torch.stack(scores) if len(set(head_counts)) == 1 else scores


def ffn_importance(
    model: PreTrainedModel, dataloader: Iterable[dict] | None = None, method: str = "gradient",
    loss_fn: LossFn | None = None,
) -> list[torch.Tensor]:
    """One score per feed-forward neuron, per layer.

    "gradient": expected |d loss / d gate| of a gate on each neuron's activation (needs `dataloader`).
    "magnitude": norm of the neuron's input weights (all input projections) times norm of its output weights.
    """
    adapter = adapter_for(model)
    ffns = [adapter.ffn(layer) for layer in adapter.layers(model)]
    if method == "magnitude":
        return [_neuron_magnitudes(parts.inputs, parts.output) for parts in ffns]
    if method != "gradient":
        raise HfCompressError(f"ffn_importance: unknown method {method!r} (use 'gradient' or 'magnitude')")
    if dataloader is None:
        raise HfCompressError("ffn_importance: method 'gradient' needs a calibration dataloader")
    outputs = [parts.output for parts in ffns]
    return _gate_gradients(model, dataloader, loss_fn, outputs, [in_features(module) for module in outputs], 1)


def layer_importance(
    model: PreTrainedModel, dataloader: Iterable[dict], method: str = "block_influence",
    loss_fn: LossFn | None = None,
) -> torch.Tensor:
    """One score per block: Tensor [num_layers]; low means the block can go.

    "block_influence" (ShortGPT, Men et al. 2024): 1 - cosine(block input, block output), averaged over the
    non-padded tokens. "loss": how much the calibration loss rises when the block is skipped.
    """
    if method not in ("block_influence", "loss"):
        raise HfCompressError(f"layer_importance: unknown method {method!r} (use 'block_influence' or 'loss')")
    layers = adapter_for(model).layers(model)
    with _evaluating(model), torch.no_grad():
        if method == "block_influence":
            return _block_influence(model, layers, dataloader)
        baseline = _mean_loss(model, dataloader, loss_fn)
        increases = []
        for layer in layers:
            with _skipped(layer):
                increases.append(_mean_loss(model, dataloader, loss_fn) - baseline)
        return torch.tensor(increases)


def _batch_loss(model: PreTrainedModel, batch: dict, loss_fn: LossFn | None) -> torch.Tensor:
    """The loss of one batch: `loss_fn(outputs, batch)`, or the model's own loss from the batch's labels."""
    batch = _on_device(batch, model.device)
    takes_labels = "labels" in inspect.signature(model.forward).parameters
    outputs = model(**_model_inputs(batch, with_labels=takes_labels))
    if loss_fn is not None:
        return loss_fn(outputs, batch)
    if getattr(outputs, "loss", None) is None:
        raise HfCompressError("importance: the model returned no loss; give task-model batches labels or pass loss_fn")
    return outputs.loss


def _gate_gradients(
    model, dataloader, loss_fn, modules: Sequence[nn.Module], unit_counts: Sequence[int], unit_size: int
) -> list[torch.Tensor]:
    """Mean over batches of |d loss / d gate| for gates on the inputs of `modules` (one gate per unit)."""
    dtype, device = next(model.parameters()).dtype, model.device
    gates = [torch.ones(count, dtype=dtype, device=device, requires_grad=True) for count in unit_counts]
    totals = [torch.zeros(count, device=device) for count in unit_counts]
    batches = 0
    with _evaluating(model), _gated_inputs(modules, gates, unit_size):
        for batch in dataloader:
            gradients = torch.autograd.grad(_batch_loss(model, batch, loss_fn), gates)
            for total, gradient in zip(totals, gradients, strict=True):
                total += gradient.abs().float()
            batches += 1
    if batches == 0:
        raise HfCompressError("importance: the calibration dataloader yielded no batches")
    return [(total / batches).cpu() for total in totals]


@contextmanager
def _gated_inputs(modules: Sequence[nn.Module], gates: Sequence[torch.Tensor], unit_size: int):
    def scale_by(gate):
        def hook(module, args):
            units = args[0].unflatten(-1, (len(gate), unit_size))
            return ((units * gate.unsqueeze(-1)).flatten(-2), *args[1:])

        return hook

    handles = [module.register_forward_pre_hook(scale_by(gate)) for module, gate in zip(modules, gates, strict=True)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _neuron_magnitudes(inputs: Sequence[nn.Module], output: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        in_norm = torch.stack([weight_as_out_by_in(module).float().pow(2).sum(1) for module in inputs]).sum(0).sqrt()
        out_norm = weight_as_out_by_in(output).float().norm(dim=0)
        return (in_norm * out_norm).cpu()


def _block_influence(model, layers: nn.ModuleList, dataloader) -> torch.Tensor:
    per_token = [None] * len(layers)  # each block's 1 - cosine for the current batch, [batch, tokens]

    def record(index):
        def hook(module, args, kwargs, output):
            before, after = _hidden_input(args, kwargs).float(), _hidden_output(output).float()
            per_token[index] = 1 - F.cosine_similarity(before, after, dim=-1)

        return hook

    handles = [layer.register_forward_hook(record(index), with_kwargs=True) for index, layer in enumerate(layers)]
    totals, tokens = torch.zeros(len(layers)), 0.0
    try:
        for batch in dataloader:
            batch = _on_device(batch, model.device)
            model(**_model_inputs(batch, with_labels=False))
            mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).float()
            totals += torch.stack([(influence * mask).sum() for influence in per_token]).cpu()
            tokens += float(mask.sum())
    finally:
        for handle in handles:
            handle.remove()
    if tokens == 0:
        raise HfCompressError("importance: the calibration dataloader yielded no tokens")
    return totals / tokens


def _mean_loss(model, dataloader, loss_fn) -> float:
    losses = [float(_batch_loss(model, batch, loss_fn)) for batch in dataloader]
    if not losses:
        raise HfCompressError("importance: the calibration dataloader yielded no batches")
    return sum(losses) / len(losses)


@contextmanager
def _skipped(layer: nn.Module):
    """Make a block pass its input through unchanged."""

    def pass_input_through(module, args, kwargs, output):
        hidden = _hidden_input(args, kwargs)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = layer.register_forward_hook(pass_input_through, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def _evaluating(model: nn.Module):
    """Eval mode (no dropout) for the measurement, then back to the mode the model was in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _hidden_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _hidden_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _on_device(batch: dict, device) -> dict:
    return {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}


def _model_inputs(batch: dict, with_labels: bool) -> dict:
    keys = (*MODEL_INPUT_KEYS, "labels") if with_labels else MODEL_INPUT_KEYS
    return {key: batch[key] for key in keys if key in batch}
