"""Hidden-size pruning: removing residual channels equals zeroing them, tied weights stay tied, checkpoints reload.

The reference is the full model with the removed channels forced to zero by forward hooks wherever the residual
stream is produced (embedding lookups, the projections that write it, the norms' outputs) and in the task head's
hidden-wide dense layers, spelled out per architecture here, independently of the library's adapters. The pruned
model then computes the reference's kept channels exactly, up to the norms' statistics:
- RMSNorm (Llama, Qwen2): exact once the norm weights carry the measured correction (sqrt(d / d') per norm when the
  removed channels are zero), and off by that factor without it;
- LayerNorm (BERT, RoBERTa, DistilBERT, GPT-2): its mean and variance over the channels cannot be matched exactly,
  so the exact comparison replaces LayerNorm by its affine part (x * weight + bias) in both models; with the real
  statistics, the correction brings the outputs closer than leaving the norms alone.
"""

from __future__ import annotations

import copy
import json
from contextlib import ExitStack, contextmanager

import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
)

import hfcompress
from hfcompress.errors import HfCompressError
from hfcompress.pruning import (
    STRUCTURE_KEY,
    hidden_importance,
    hidden_size_multiple,
    layer_shapes,
    needs_structure_record,
    norm_corrections,
    prune_heads,
    prune_hidden,
    select_ffn,
    select_heads,
    select_hidden,
)

from test_pruning import ARCHS, BY_NAME, HIDDEN, VOCAB, Arch, build, make_batch

REMOVED = [1, 4, 5, 6, 11, 17, 20, 30]  # 8 of the 32 channels: a kept width of 24 = 3 heads of 8
KEPT = [channel for channel in range(HIDDEN) if channel not in REMOVED]
TOLERANCE = {"atol": 2e-5, "rtol": 2e-5}
# Per architecture, the modules (suffixes of their names) whose outputs are written into the hidden channels, and
# the task head's hidden-wide dense layers whose outputs the next layer reads.
WRITERS = {
    "bert": ("attention.output.dense", "output.dense", "pooler.dense"),
    "roberta": ("attention.output.dense", "output.dense", "classifier.dense"),
    "distilbert": ("attention.out_lin", "ffn.lin2", "pre_classifier"),
    "gpt2": ("attn.c_proj", "mlp.c_proj"),
    "llama": ("self_attn.o_proj", "mlp.down_proj"),
    "qwen2": ("self_attn.o_proj", "mlp.down_proj"),
}
LAYER_NORM_ARCHS = [arch for arch in ARCHS if arch.name in ("bert", "roberta", "distilbert", "gpt2")]
RMS_NORM_ARCHS = [arch for arch in ARCHS if arch.name in ("llama", "qwen2")]


def is_norm(module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")


def zero_removed_channels(arch: Arch, model) -> ExitStack:
    """Hooks that zero the removed channels of every embedding lookup, norm output and writer output."""
    stack = ExitStack()

    def zero(module, args, output):
        output = output.clone()
        output[..., REMOVED] = 0
        return output

    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) or is_norm(module) or name.endswith(WRITERS[arch.name]):
            stack.callback(module.register_forward_hook(zero).remove)
    return stack


@contextmanager
def affine_layer_norms():
    """LayerNorm without its statistics: x * weight + bias."""
    forward = nn.LayerNorm.forward
    nn.LayerNorm.forward = lambda self, x: x * self.weight + self.bias
    try:
        yield
    finally:
        nn.LayerNorm.forward = forward


def outputs(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask")}
    with torch.no_grad():
        return model(**inputs).logits, model.base_model(**inputs).last_hidden_state


def assert_kept_channels_match(pruned, reference, batch, **tolerance):
    (logits, hidden), (reference_logits, reference_hidden) = outputs(pruned, batch), outputs(reference, batch)
    torch.testing.assert_close(logits, reference_logits, **(tolerance or TOLERANCE))
    torch.testing.assert_close(hidden, reference_hidden[..., KEPT], **(tolerance or TOLERANCE))


def zeroed_reference(arch: Arch):
    """The model, and a copy of it whose removed channels are held at zero (hooks stay on for the test)."""
    model = build(arch)
    reference = copy.deepcopy(model)
    return model, reference, zero_removed_channels(arch, reference)


# ---- removing channels equals zeroing them ---------------------------------------------------------------------


@pytest.mark.parametrize("arch", LAYER_NORM_ARCHS, ids=[arch.name for arch in LAYER_NORM_ARCHS])
def test_removing_channels_equals_zeroing_them_up_to_layer_norm_statistics(arch):
    model, reference, hooks = zeroed_reference(arch)
    batch = make_batch(arch)
    with hooks, affine_layer_norms():
        prune_hidden(model, REMOVED)
        assert model.config.hidden_size == len(KEPT)
        assert_kept_channels_match(model, reference, batch)


@pytest.mark.parametrize("arch", LAYER_NORM_ARCHS, ids=[arch.name for arch in LAYER_NORM_ARCHS])
def test_the_layer_norm_correction_brings_the_outputs_closer(arch):
    batch = make_batch(arch)
    errors = {}
    for corrected in (False, True):
        model, reference, hooks = zeroed_reference(arch)
        with hooks:
            corrections = norm_corrections(reference, [batch], REMOVED) if corrected else None
            prune_hidden(model, REMOVED, corrections)
            errors[corrected] = (outputs(model, batch)[1] - outputs(reference, batch)[1][..., KEPT]).abs().mean()
    assert errors[True] < 0.7 * errors[False]


@pytest.mark.parametrize("arch", RMS_NORM_ARCHS, ids=[arch.name for arch in RMS_NORM_ARCHS])
def test_with_the_rms_norm_correction_removing_channels_equals_zeroing_them(arch):
    model, reference, hooks = zeroed_reference(arch)
    batch = make_batch(arch)
    for norm in [*model.modules(), *reference.modules()]:  # exact up to epsilon: these activations are ~1e-2
        if is_norm(norm):
            norm.variance_epsilon = 1e-12
    with hooks:
        corrections = norm_corrections(reference, [batch], REMOVED)
        # with the removed channels at zero, the kept ones' RMS is sqrt(d / d') times the full RMS, every token
        assert [c.scale for c in corrections] == pytest.approx([(HIDDEN / len(KEPT)) ** 0.5] * len(corrections))
        uncorrected = copy.deepcopy(model)
        prune_hidden(model, REMOVED, corrections)
        prune_hidden(uncorrected, REMOVED)
        assert_kept_channels_match(model, reference, batch)
        with pytest.raises(AssertionError):
            assert_kept_channels_match(uncorrected, reference, batch)


# ---- tied weights, configs, checkpoints -------------------------------------------------------------------------


@pytest.mark.parametrize("arch", [BY_NAME["gpt2"], BY_NAME["llama"]], ids=["gpt2", "llama"])
def test_tied_embeddings_stay_tied_and_reload_with_plain_transformers(arch, tmp_path):
    model, batch = build(arch), make_batch(arch)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    if arch.name == "gpt2":  # its config derives the head size as hidden_size / heads: 24 channels hold 3 heads of 8
        prune_heads(model, {layer: [0] for layer in range(len(layer_shapes(model)))})
    prune_hidden(model, REMOVED)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    model.save_pretrained(tmp_path)

    config = json.loads((tmp_path / "config.json").read_text())
    assert config["hidden_size" if arch.name == "llama" else "n_embd"] == len(KEPT)
    assert STRUCTURE_KEY not in config and "auto_map" not in config  # a plain transformers checkpoint
    reloaded = arch.auto_class.from_pretrained(tmp_path).eval()
    assert reloaded.get_output_embeddings().weight.data_ptr() == reloaded.get_input_embeddings().weight.data_ptr()
    for actual, expected in zip(outputs(reloaded, batch), outputs(model, batch), strict=True):
        torch.testing.assert_close(actual, expected)


def test_gpt2_keeps_its_ffn_width_when_the_config_derived_it_from_the_hidden_size(tmp_path):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_inner=None))
    assert {shape.ffn_size for shape in layer_shapes(model)} == {4 * HIDDEN}  # GPT-2's own configs say 4 x hidden
    prune_heads(model, {0: [0], 1: [0]})
    prune_hidden(model, REMOVED)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert {shape.ffn_size for shape in layer_shapes(reloaded)} == {4 * HIDDEN}


def test_bert_with_as_many_heads_as_the_hidden_size_holds_is_a_plain_checkpoint(tmp_path):
    """BERT derives the head size from hidden_size / num_attention_heads: 24 channels and 3 heads of 8 in every
    layer is a config transformers builds by itself."""
    arch = BY_NAME["bert"]
    model, batch = build(arch), make_batch(arch)
    prune_heads(model, {layer: [0] for layer in range(len(layer_shapes(model)))})
    prune_hidden(model, REMOVED)
    assert (model.config.hidden_size, model.config.num_attention_heads) == (24, 3)
    assert not needs_structure_record(model)
    model.save_pretrained(tmp_path)
    reloaded = arch.auto_class.from_pretrained(tmp_path).eval()
    for actual, expected in zip(outputs(reloaded, batch), outputs(model, batch), strict=True):
        torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("arch", [BY_NAME[name] for name in ("bert", "distilbert", "gpt2")],
                         ids=["bert", "distilbert", "gpt2"])
def test_more_heads_than_the_hidden_size_holds_reload_through_the_structure_record(arch, tmp_path):
    model, batch = build(arch), make_batch(arch)
    prune_hidden(model, REMOVED)  # 24 channels: the config says 3 heads of 8, every block keeps its 4
    shapes = layer_shapes(model)
    assert model.config.num_attention_heads == 3 and {shape.heads for shape in shapes} == {4}
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())[STRUCTURE_KEY]["attention_heads"] == [4, 4, 4]
    for reloaded in (hfcompress.from_pretrained(tmp_path),
                     arch.auto_class.from_pretrained(tmp_path, trust_remote_code=True).eval()):
        assert layer_shapes(reloaded) == shapes
        for actual, expected in zip(outputs(reloaded, batch), outputs(model, batch), strict=True):
            torch.testing.assert_close(actual, expected)


def test_bert_refuses_a_hidden_size_that_is_not_a_multiple_of_its_head_size():
    model = build(BY_NAME["bert"])
    before = [tuple(p.shape) for p in model.parameters()]
    with pytest.raises(HfCompressError, match="multiple of the head size 8, not 28"):
        prune_hidden(model, REMOVED[:4])
    assert [tuple(p.shape) for p in model.parameters()] == before


def test_pruning_every_channel_or_a_channel_out_of_range_is_refused():
    model = build(BY_NAME["llama"])
    with pytest.raises(HfCompressError, match="cannot prune all 32 hidden channels"):
        prune_hidden(model, range(HIDDEN))
    with pytest.raises(HfCompressError, match="index 32 is out of range"):
        prune_hidden(model, [32])


# ---- importance and selection -------------------------------------------------------------------------------


def silence_channel(model, channel: int) -> None:
    """Make a channel carry nothing: its embedding columns, its writers' rows and its norm weights zero."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Embedding) or is_norm(module):
                module.weight[..., channel] = 0
                if getattr(module, "bias", None) is not None:
                    module.bias[channel] = 0
        for name, module in model.named_modules():
            if name.endswith(WRITERS["llama"]):
                module.weight[channel] = 0


@pytest.mark.parametrize("method", ["activation", "gradient"])
def test_hidden_importance_scores_a_silent_channel_lowest(method):
    arch = BY_NAME["llama"]
    model, batch = build(arch), make_batch(arch)
    silence_channel(model, 7)
    scores = hidden_importance(model, [batch], method)
    assert scores.shape == (HIDDEN,)
    assert scores[7] == 0 and (scores[[c for c in range(HIDDEN) if c != 7]] > 0).all()
    assert select_hidden(scores, size=HIDDEN - 1) == [7]


def test_hidden_selection_rounds_the_kept_width_to_the_multiple():
    scores = torch.arange(100, dtype=torch.float32)
    assert len(select_hidden(scores, sparsity=0.33, multiple=16)) == 100 - 64  # 67 kept -> 64
    assert len(select_hidden(scores, sparsity=0.2, multiple=16)) == 100 - 80
    assert select_hidden(scores, size=90) == list(range(10))  # the lowest scores go
    with pytest.raises(HfCompressError, match="not a multiple of 16"):
        select_hidden(scores, size=90, multiple=16)
    with pytest.raises(HfCompressError, match="between 1 and the current hidden size 100"):
        select_hidden(scores, size=100)


def test_rounded_selection_keeps_multiples_in_every_layer():
    scores = torch.rand(3, 100, generator=torch.Generator().manual_seed(0))
    for scope in ("global", "uniform"):
        removed = select_ffn(scores, sparsity=0.3, scope=scope, multiple=16)
        kept = [100 - len(removed.get(layer, [])) for layer in range(3)]
        assert all(width % 16 == 0 for width in kept) and sum(kept) == pytest.approx(210, abs=3 * 8)
        for layer, neurons in removed.items():  # still the lowest-scored neurons of each layer
            assert set(neurons) == set(torch.argsort(scores[layer])[:len(neurons)].tolist())
    heads = select_heads(torch.rand(2, 6, generator=torch.Generator().manual_seed(1)), sparsity=0.2, multiple=4)
    assert all(6 - len(removed_heads) == 4 for removed_heads in heads.values()) and len(heads) == 2


def test_a_width_no_cut_can_round_is_refused():
    with pytest.raises(HfCompressError, match="none of the widths"):
        select_heads(torch.rand(1, 6), sparsity=0.2, group_size=3, multiple=4)  # whole groups of 3: 6 or 3 kept


def test_hidden_sizes_the_config_refuses_are_refused_before_anything_changes():
    """transformers' LlamaConfig wants its head count to divide the hidden size, head_dim or not; BERT-style configs
    want the head size to; Qwen2's config asks neither."""
    llama, qwen2, bert = (build(BY_NAME[name]) for name in ("llama", "qwen2", "bert"))
    assert [hidden_size_multiple(model) for model in (llama, qwen2, bert)] == [4, 1, 8]
    before = [tuple(p.shape) for p in llama.parameters()]
    with pytest.raises(HfCompressError, match="hidden size 30: LlamaConfig refuses it: .*multiple of the number of"):
        prune_hidden(llama, [0, 1])
    assert [tuple(p.shape) for p in llama.parameters()] == before
    prune_hidden(qwen2, [0, 1])
    assert qwen2.config.hidden_size == 30
