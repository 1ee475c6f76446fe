"""Structured pruning is exact: removing a part gives the outputs of the model with that part zeroed or skipped.

The references here are built without the pruning code: forward hooks zero a head's slice of the output
projection's input (or a neuron's activation), or pass a block's input straight through. Module paths are spelled
out per architecture below, independently of the library's adapters.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
)

import hfcompress
from hfcompress.errors import HfCompressError
from hfcompress.pruning import (
    STRUCTURE_KEY,
    ffn_importance,
    head_importance,
    layer_importance,
    layer_shapes,
    load_pruned,
    needs_structure_record,
    prune_ffn,
    prune_heads,
    prune_layers,
    save_pruned,
    select_ffn,
    select_heads,
    select_layers,
)

VOCAB, HIDDEN, LAYERS, HEADS, FFN = 100, 32, 3, 4, 48
HEAD_SIZE = HIDDEN // HEADS
TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}


@dataclass(frozen=True)
class Arch:
    name: str
    build: Callable[[], torch.nn.Module]
    auto_class: type
    layers: str  # from the base model to the blocks
    attention_output: str  # from a block to the projection whose input holds the heads
    ffn_output: str  # from a block to the projection whose input holds the neurons
    qkv_bias: bool
    ffn_inputs: int  # projections producing each neuron (gate and up for Llama)
    ffn_bias: bool
    kv_heads: int = HEADS
    causal: bool = False


def _llama_like(config_class, model_class, kv_heads=2):
    config = config_class(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=kv_heads, max_position_embeddings=64,
        bos_token_id=0, eos_token_id=0,
    )
    return model_class(config)


ARCHS = [
    Arch(
        "bert",
        lambda: BertForSequenceClassification(BertConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            intermediate_size=FFN, max_position_embeddings=64, num_labels=2,
        )),
        AutoModelForSequenceClassification, "encoder.layer", "attention.output.dense", "output.dense", True, 1, True,
    ),
    Arch(
        "roberta",
        lambda: RobertaForSequenceClassification(RobertaConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            intermediate_size=FFN, max_position_embeddings=64, num_labels=2, pad_token_id=1,
        )),
        AutoModelForSequenceClassification, "encoder.layer", "attention.output.dense", "output.dense", True, 1, True,
    ),
    Arch(
        "distilbert",
        lambda: DistilBertForSequenceClassification(DistilBertConfig(
            vocab_size=VOCAB, dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, hidden_dim=FFN,
            max_position_embeddings=64, num_labels=2,
        )),
        AutoModelForSequenceClassification, "transformer.layer", "attention.out_lin", "ffn.lin2", True, 1, True,
    ),
    Arch(
        "gpt2",
        lambda: GPT2LMHeadModel(GPT2Config(
            vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=FFN, n_positions=64,
            bos_token_id=0, eos_token_id=0,
        )),
        AutoModelForCausalLM, "h", "attn.c_proj", "mlp.c_proj", True, 1, True, causal=True,
    ),
    Arch(
        "llama",
        lambda: _llama_like(LlamaConfig, LlamaForCausalLM),
        AutoModelForCausalLM, "layers", "self_attn.o_proj", "mlp.down_proj", False, 2, False, kv_heads=2, causal=True,
    ),
    Arch(
        "qwen2",
        lambda: _llama_like(Qwen2Config, Qwen2ForCausalLM),
        AutoModelForCausalLM, "layers", "self_attn.o_proj", "mlp.down_proj", True, 2, False, kv_heads=2, causal=True,
    ),
]
BY_NAME = {arch.name: arch for arch in ARCHS}
parametrize_archs = pytest.mark.parametrize("arch", ARCHS, ids=[arch.name for arch in ARCHS])

# Valid for multi-head and for grouped-query attention with groups {0, 1} and {2, 3}: layer 0 loses one whole
# group, layer 2 loses one head from each group, layer 1 is untouched.
HEADS_TO_REMOVE = {0: [2, 3], 2: [0, 3]}


def build(arch: Arch):
    torch.manual_seed(0)
    return arch.build().eval()


def make_batch(arch: Arch) -> dict:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, VOCAB, (2, 7), generator=generator)
    attention_mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    labels = input_ids.masked_fill(attention_mask == 0, -100) if arch.causal else torch.tensor([0, 1])
    example_index = torch.arange(2)  # bookkeeping key the data module adds; importance must not pass it on
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "example_index": example_index}


def outputs(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The task head's logits and the base model's last hidden state."""
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask")}
    with torch.no_grad():
        return model(**inputs).logits, model.base_model(**inputs).last_hidden_state


def assert_same_outputs(model, reference, batch):
    for actual, expected in zip(outputs(model, batch), outputs(reference, batch), strict=True):
        torch.testing.assert_close(actual, expected, **TOLERANCE)


def blocks(arch: Arch, model):
    return model.base_model.get_submodule(arch.layers)


def count_parameters(model) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def zero_input_slices(module, slices: list[slice]):
    """A forward pre-hook that zeroes parts of the module's input (a head's features, a neuron)."""

    def hook(module, args):
        hidden = args[0].clone()
        for part in slices:
            hidden[..., part] = 0
        return (hidden, *args[1:])

    return module.register_forward_pre_hook(hook)


def skip_block(block):
    """A forward hook that makes a block return its input unchanged."""

    def hook(module, args, kwargs, output):
        return args[0] if args else kwargs["hidden_states"]

    return block.register_forward_hook(hook, with_kwargs=True)


# ---- removing parts equals zeroing them ------------------------------------------------------------------------


@parametrize_archs
def test_removing_heads_equals_zeroing_their_output(arch):
    model, batch = build(arch), make_batch(arch)
    reference = copy.deepcopy(model)
    for layer, heads in HEADS_TO_REMOVE.items():
        output_projection = blocks(arch, reference)[layer].get_submodule(arch.attention_output)
        zero_input_slices(output_projection, [slice(h * HEAD_SIZE, (h + 1) * HEAD_SIZE) for h in heads])
    before = count_parameters(model)

    assert prune_heads(model, HEADS_TO_REMOVE) is model
    assert_same_outputs(model, reference, batch)

    group = HEADS // arch.kv_heads
    if group == 1:
        expected_shapes = [(2, 2), (4, 4), (2, 2)]
    else:  # layer 0 lost group {2, 3}; layer 2 kept one head in each of its two groups
        expected_shapes = [(2, 1), (4, 2), (2, 2)]
    assert [(shape.heads, shape.kv_heads) for shape in layer_shapes(model)] == expected_shapes
    query_heads_removed = 4
    kv_heads_removed = arch.kv_heads * LAYERS - sum(kv for _, kv in expected_shapes)
    projection = HIDDEN * HEAD_SIZE + (HEAD_SIZE if arch.qkv_bias else 0)  # one head's rows of q, k or v
    per_query_head = projection + HEAD_SIZE * HIDDEN  # its q rows and its output-projection columns
    assert before - count_parameters(model) == query_heads_removed * per_query_head + kv_heads_removed * 2 * projection


@parametrize_archs
def test_removing_ffn_neurons_equals_zeroing_them(arch):
    model, batch = build(arch), make_batch(arch)
    neurons = {0: [0, 5, 7], 1: [FFN - 1]}
    reference = copy.deepcopy(model)
    for layer, removed in neurons.items():
        ffn_output = blocks(arch, reference)[layer].get_submodule(arch.ffn_output)
        zero_input_slices(ffn_output, [slice(n, n + 1) for n in removed])
    before = count_parameters(model)

    prune_ffn(model, neurons)

    assert_same_outputs(model, reference, batch)
    assert [shape.ffn_size for shape in layer_shapes(model)] == [FFN - 3, FFN - 1, FFN]
    per_neuron = arch.ffn_inputs * (HIDDEN + (1 if arch.ffn_bias else 0)) + HIDDEN
    assert before - count_parameters(model) == 4 * per_neuron


@parametrize_archs
def test_dropping_a_layer_equals_skipping_it(arch):
    model, batch = build(arch), make_batch(arch)
    reference = copy.deepcopy(model)
    skip_block(blocks(arch, reference)[1])
    before, dropped = count_parameters(model), count_parameters(blocks(arch, model)[1])

    prune_layers(model, [1])

    assert_same_outputs(model, reference, batch)
    assert before - count_parameters(model) == dropped
    assert model.config.num_hidden_layers == len(blocks(arch, model)) == LAYERS - 1
    if getattr(model.config, "layer_types", None) is not None:
        assert len(model.config.layer_types) == LAYERS - 1


def test_dropping_layers_keeps_each_remaining_layers_attention_type(tmp_path):
    """Qwen2 with a sliding window from layer 1 on: layer_types must follow the blocks that remain."""
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=2, use_sliding_window=True, sliding_window=3,
        max_window_layers=1,
    )
    model, batch = Qwen2ForCausalLM(config).eval(), make_batch(BY_NAME["qwen2"])
    assert model.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    reference = copy.deepcopy(model)
    skip_block(reference.model.layers[0])

    prune_layers(model, [0])

    assert model.config.layer_types == ["sliding_attention", "sliding_attention"]
    assert_same_outputs(model, reference, batch)
    save_pruned(model, tmp_path)
    assert_same_outputs(AutoModelForCausalLM.from_pretrained(tmp_path).eval(), reference, batch)


@pytest.mark.parametrize("arch", [BY_NAME["gpt2"], BY_NAME["llama"], BY_NAME["qwen2"]], ids=["gpt2", "llama", "qwen2"])
def test_generation_with_a_cache_works_after_dropping_layers(arch):
    model, batch = build(arch), make_batch(arch)
    reference = copy.deepcopy(model)
    skip_block(blocks(arch, reference)[0])
    skip_block(blocks(arch, reference)[1])
    prune_layers(model, [0, 1])
    prompt = batch["input_ids"][:1]

    generated = model.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=True, pad_token_id=0)
    expected = reference.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=False, pad_token_id=0)

    assert torch.equal(generated, expected)


@pytest.mark.parametrize("arch", [BY_NAME["bert"], BY_NAME["llama"]], ids=["bert", "llama"])
def test_bare_models_prune_like_the_task_models_around_them(arch, tmp_path):
    task_model, batch = build(arch), make_batch(arch)
    bare = copy.deepcopy(task_model.base_model)
    for model in (task_model, bare):
        prune_heads(model, HEADS_TO_REMOVE)
        prune_ffn(model, {1: [3, 4]})
        prune_layers(model, [2])
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask")}

    with torch.no_grad():
        expected = task_model.base_model(**inputs).last_hidden_state
        torch.testing.assert_close(bare(**inputs).last_hidden_state, expected, **TOLERANCE)
        save_pruned(bare, tmp_path)
        reloaded = load_pruned(tmp_path, AutoModel)
        torch.testing.assert_close(reloaded(**inputs).last_hidden_state, expected, **TOLERANCE)
    assert bare.config.num_hidden_layers == 2


# ---- refusals ----------------------------------------------------------------------------------------------------


def test_pruning_every_head_of_a_layer_is_refused_and_changes_nothing():
    model = build(BY_NAME["bert"])
    before = count_parameters(model)

    with pytest.raises(HfCompressError, match="drop the layer"):
        prune_heads(model, {0: [0], 1: [0, 1, 2, 3]})

    assert count_parameters(model) == before
    with pytest.raises(HfCompressError, match="out of range"):
        prune_heads(model, {0: [4]})
    with pytest.raises(HfCompressError, match="cannot drop all"):
        prune_layers(model, range(LAYERS))


def test_gpt2_refuses_dropping_layers_when_attention_scale_depends_on_position():
    model = build(BY_NAME["gpt2"])
    model.config.scale_attn_by_inverse_layer_idx = True
    with pytest.raises(HfCompressError, match="scale_attn_by_inverse_layer_idx"):
        prune_layers(model, [0])


def test_grouped_query_attention_refuses_uneven_groups():
    model = build(BY_NAME["llama"])
    with pytest.raises(HfCompressError, match="same number of query heads"):
        prune_heads(model, {0: [3]})  # group {2, 3} would keep one head, group {0, 1} two
    assert [shape.heads for shape in layer_shapes(model)] == [HEADS] * LAYERS


@pytest.mark.parametrize("strategy, expected", [("whole_groups", (2, 1)), ("heads_per_group", (2, 2))])
def test_grouped_query_selection_keeps_groups_consistent(strategy, expected):
    arch = BY_NAME["llama"]
    model, batch = build(arch), make_batch(arch)
    scores = head_importance(model, [batch])
    group_size = HEADS // arch.kv_heads
    heads = select_heads(scores, sparsity=0.5, scope="uniform", group_size=group_size, group_strategy=strategy)
    reference = copy.deepcopy(model)
    for layer, removed in heads.items():
        output_projection = blocks(arch, reference)[layer].get_submodule(arch.attention_output)
        zero_input_slices(output_projection, [slice(h * HEAD_SIZE, (h + 1) * HEAD_SIZE) for h in removed])

    prune_heads(model, heads)

    assert {(shape.heads, shape.kv_heads) for shape in layer_shapes(model)} == {expected}
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == expected
    assert_same_outputs(model, reference, batch)


# ---- saving and reloading ------------------------------------------------------------------------------------------


@parametrize_archs
def test_uniform_shapes_reload_with_plain_from_pretrained(arch, tmp_path):
    model, batch = build(arch), make_batch(arch)
    prune_ffn(model, {0: [1, 2], 1: [3, 4], 2: [5, 6]})
    prune_layers(model, [1])
    if arch.kv_heads < HEADS:  # one head from each group in every layer: 2 heads, 2 key/value heads
        prune_heads(model, {0: [1, 3], 1: [0, 2]})

    model.save_pretrained(tmp_path)

    assert not needs_structure_record(model)
    config = json.loads((tmp_path / "config.json").read_text())
    assert STRUCTURE_KEY not in config and "auto_map" not in config  # a plain checkpoint: no remote code
    assert not (tmp_path / "modeling_hfcompress.py").exists()
    reloaded = arch.auto_class.from_pretrained(tmp_path).eval()
    assert_same_outputs(reloaded, model, batch)
    assert reloaded.config.num_hidden_layers == 2
    if arch.kv_heads < HEADS:
        assert (reloaded.config.num_attention_heads, reloaded.config.num_key_value_heads) == (2, 2)


@parametrize_archs
def test_per_layer_shapes_survive_plain_save_pretrained_and_reload(arch, tmp_path):
    model, batch = build(arch), make_batch(arch)
    prune_heads(model, HEADS_TO_REMOVE)
    prune_ffn(model, {0: [0, 1, 2]})
    prune_layers(model, [1])
    shapes = layer_shapes(model)

    model.save_pretrained(tmp_path)  # the habitual save: config.json carries the per-layer shapes

    config = json.loads((tmp_path / "config.json").read_text())
    record = config[STRUCTURE_KEY]
    assert record["layers_kept"] == [0, 2]
    assert record["attention_heads"] == [2, 2]
    assert record["ffn_sizes"] == [FFN - 3, FFN]
    assert config["auto_map"] == {arch.auto_class.__name__: f"modeling_hfcompress.Compressed{arch.build().__class__.__name__}"}
    assert (tmp_path / "modeling_hfcompress.py").is_file()
    for reloaded in (hfcompress.from_pretrained(tmp_path),
                     arch.auto_class.from_pretrained(tmp_path, trust_remote_code=True).eval()):
        assert layer_shapes(reloaded) == shapes
        assert_same_outputs(reloaded, model, batch)


def test_the_package_loader_reads_pruned_checkpoints(tmp_path):
    model, batch = build(BY_NAME["bert"]), make_batch(BY_NAME["bert"])
    prune_heads(model, {1: [0]})
    save_pruned(model, tmp_path)

    reloaded = hfcompress.from_pretrained(tmp_path)

    assert isinstance(reloaded, BertForSequenceClassification)
    assert_same_outputs(reloaded, model, batch)


def test_a_label_set_given_at_load_goes_to_the_config_as_from_pretrained_does(tmp_path):
    model, batch = build(BY_NAME["bert"]), make_batch(BY_NAME["bert"])
    prune_heads(model, {1: [0]})
    save_pruned(model, tmp_path)

    labels = {"num_labels": 2, "id2label": {0: "rotten", 1: "fresh"}, "label2id": {"rotten": 0, "fresh": 1}}
    reloaded = load_pruned(tmp_path, AutoModelForSequenceClassification, **labels)

    assert reloaded.config.id2label == {0: "rotten", 1: "fresh"}
    assert_same_outputs(reloaded, model, batch)


def test_uniform_heads_the_config_cannot_validate_fall_back_to_the_record(tmp_path):
    """Llama requires hidden_size % num_attention_heads == 0: 3 heads of 8 in a 32-wide model is not expressible."""
    torch.manual_seed(0)
    model = _llama_like(LlamaConfig, LlamaForCausalLM, kv_heads=HEADS).eval()
    batch = make_batch(BY_NAME["llama"])
    prune_heads(model, {layer: [3] for layer in range(LAYERS)})

    save_pruned(model, tmp_path)

    assert model.config.num_attention_heads == HEADS
    assert json.loads((tmp_path / "config.json").read_text())[STRUCTURE_KEY]["attention_heads"] == [3] * LAYERS
    assert_same_outputs(load_pruned(tmp_path, AutoModelForCausalLM), model, batch)


def test_weights_that_disagree_with_the_config_are_named_in_one_line(tmp_path):
    model = build(BY_NAME["bert"])
    prune_heads(model, {0: [1]})
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config[STRUCTURE_KEY]  # e.g. edited by hand: the weights no longer fit the model the config builds
    (tmp_path / "config.json").write_text(json.dumps(config))

    with pytest.raises(HfCompressError) as error:
        hfcompress.from_pretrained(tmp_path)

    assert str(error.value) == (
        f"{tmp_path}: config.json and the weights disagree: bert.encoder.layer.0.attention.output.dense.weight is "
        f"[{HIDDEN}, {HIDDEN - HEAD_SIZE}] in the checkpoint but [{HIDDEN}, {HIDDEN}] in the model config.json builds")


def test_a_malformed_structure_is_a_one_line_error(tmp_path):
    model = build(BY_NAME["bert"])
    prune_heads(model, {0: [1]})
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config[STRUCTURE_KEY]["ffn_sizes"] = [FFN]  # one entry for three layers
    (tmp_path / "config.json").write_text(json.dumps(config))

    with pytest.raises(HfCompressError, match=f"^{tmp_path}: config.json {STRUCTURE_KEY}: .* for 3 layers$"):
        hfcompress.from_pretrained(tmp_path)


def test_unpruning_shapes_make_the_model_plain_again(tmp_path):
    model = build(BY_NAME["llama"])
    prune_heads(model, {0: [0, 1]})  # one group less in layer 0 only: per-layer shapes
    assert type(model).__name__ == "CompressedLlamaForCausalLM" and needs_structure_record(model)
    prune_heads(model, {1: [0, 1], 2: [0, 1]})  # now every layer keeps the same group: the config expresses it
    assert type(model) is LlamaForCausalLM and not hasattr(model.config, STRUCTURE_KEY)


# ---- importance --------------------------------------------------------------------------------------------------


def zero_output_columns(module, features: slice) -> None:
    """Zero the weights that read the given input features (Linear: columns; GPT-2 Conv1D: rows)."""
    with torch.no_grad():
        if isinstance(module, torch.nn.Linear):
            module.weight[:, features] = 0
        else:
            module.weight[features, :] = 0


@parametrize_archs
def test_head_importance_scores_a_silenced_head_zero(arch):
    model, batch = build(arch), make_batch(arch)
    output_projection = blocks(arch, model)[0].get_submodule(arch.attention_output)
    zero_output_columns(output_projection, slice(1 * HEAD_SIZE, 2 * HEAD_SIZE))
    model.train()

    scores = head_importance(model, [batch, batch])

    assert model.training  # the measurement ran in eval mode and restored the mode
    assert scores.shape == (LAYERS, HEADS)
    assert torch.isfinite(scores).all() and (scores >= 0).all()
    assert scores[0, 1] == 0 and scores.argmin() == 1
    torch.testing.assert_close(scores.norm(dim=1), torch.ones(LAYERS))


@pytest.mark.parametrize("method", ["gradient", "magnitude"])
@pytest.mark.parametrize("arch", [BY_NAME["bert"], BY_NAME["gpt2"], BY_NAME["qwen2"]], ids=["bert", "gpt2", "qwen2"])
def test_ffn_importance_scores_a_silenced_neuron_zero(arch, method):
    model, batch = build(arch), make_batch(arch)
    zero_output_columns(blocks(arch, model)[1].get_submodule(arch.ffn_output), slice(5, 6))

    scores = ffn_importance(model, [batch], method=method)

    assert [len(layer) for layer in scores] == [FFN] * LAYERS
    assert all(torch.isfinite(layer).all() and (layer >= 0).all() for layer in scores)
    assert scores[1][5] == 0 and scores[1].argmin() == 5


def make_block_an_identity(arch: Arch, model, layer: int) -> None:
    """Pre-norm residual blocks whose attention and FFN write nothing pass their input through exactly."""
    block = blocks(arch, model)[layer]
    with torch.no_grad():
        for path in (arch.attention_output, arch.ffn_output):
            projection = block.get_submodule(path)
            projection.weight.zero_()
            if projection.bias is not None:
                projection.bias.zero_()


@pytest.mark.parametrize("arch", [BY_NAME["gpt2"], BY_NAME["llama"]], ids=["gpt2", "llama"])
def test_block_influence_of_an_identity_block_is_lowest(arch):
    model, batch = build(arch), make_batch(arch)
    make_block_an_identity(arch, model, 1)

    scores = layer_importance(model, [batch], method="block_influence")

    assert scores.shape == (LAYERS,)
    assert scores[1] < 1e-6 and scores.argmin() == 1
    assert (scores[[0, 2]] > 1e-3).all()


def test_loss_importance_of_an_identity_block_is_zero():
    arch = BY_NAME["llama"]
    model, batch = build(arch), make_batch(arch)
    make_block_an_identity(arch, model, 1)

    scores = layer_importance(model, [batch], method="loss")

    assert abs(float(scores[1])) < 1e-6
    assert (scores[[0, 2]].abs() > 1e-4).all()


def test_bare_models_need_a_loss_function():
    arch = BY_NAME["bert"]
    model, batch = build(arch), make_batch(arch)
    with pytest.raises(HfCompressError, match="loss_fn"):
        head_importance(model.base_model, [batch])
    mean_square = lambda outputs, batch: outputs.last_hidden_state.pow(2).mean()  # noqa: E731
    assert head_importance(model.base_model, [batch], loss_fn=mean_square).shape == (LAYERS, HEADS)


def test_head_importance_after_uneven_pruning_is_one_row_per_layer():
    arch = BY_NAME["bert"]
    model, batch = build(arch), make_batch(arch)
    prune_heads(model, {0: [0]})

    scores = head_importance(model, [batch])

    assert [len(row) for row in scores] == [3, 4, 4]
    torch.testing.assert_close(torch.stack([row.norm() for row in scores]), torch.ones(LAYERS))
    prune_heads(model, select_heads(scores, count=2))
    assert sum(shape.heads for shape in layer_shapes(model)) == 3 + 4 + 4 - 2


# ---- selection -----------------------------------------------------------------------------------------------------

SCORES = torch.tensor([[0.1, 0.9, 0.5, 0.8], [0.2, 0.05, 0.7, 0.6]])


def test_global_selection_takes_the_lowest_scores_anywhere():
    assert select_heads(SCORES, count=3) == {0: [0], 1: [0, 1]}
    assert select_heads(SCORES, sparsity=0.5) == {0: [0, 2], 1: [0, 1]}


def test_uniform_selection_takes_the_same_share_from_every_layer():
    assert select_heads(SCORES, count=4, scope="uniform") == {0: [0, 2], 1: [0, 1]}
    assert select_heads(SCORES, sparsity=0.25, scope="uniform") == {0: [0], 1: [1]}


def test_selection_keeps_the_minimum_per_layer():
    scores = torch.tensor([[0.01, 0.02, 0.03, 0.04], [0.5, 0.6, 0.7, 0.8]])
    assert select_heads(scores, count=4) == {0: [0, 1, 2], 1: [0]}
    assert select_heads(scores, count=4, min_heads_per_layer=2) == {0: [0, 1], 1: [0, 1]}
    with pytest.raises(HfCompressError, match="drop the layer"):
        select_heads(scores, count=4, min_heads_per_layer=0)


def test_grouped_selection_moves_whole_groups_or_one_head_per_group():
    row = torch.tensor([[0.1, 0.9, 0.8, 0.2]])  # groups {0, 1} and {2, 3}; the least important of each: 0 and 3
    assert select_heads(torch.tensor([[0.1, 0.2, 0.9, 0.9]]), count=3, group_size=2) == {0: [0, 1]}
    assert select_heads(row, count=2, group_size=2, group_strategy="heads_per_group") == {0: [0, 3]}
    assert select_heads(row, count=3, group_size=2, group_strategy="heads_per_group") == {0: [0, 3]}
    two_layers = torch.tensor([[0.1, 0.2, 0.9, 0.9], [0.5, 0.6, 0.9, 0.9]])  # layer 1 has one head per group now
    assert select_heads(two_layers, count=3, group_size=[2, 1]) == {0: [0, 1], 1: [0]}


def test_ffn_and_layer_selection():
    scores = [torch.tensor([0.3, 0.1, 0.2]), torch.tensor([0.05, 0.9])]
    assert select_ffn(scores, count=2) == {0: [1], 1: [0]}
    assert select_ffn(scores, count=2, scope="uniform") == {0: [1], 1: [0]}
    assert select_ffn(scores, sparsity=0.6) == {0: [1, 2], 1: [0]}
    assert select_layers(torch.tensor([0.5, 0.1, 0.3, 0.9]), drop=2) == [1, 2]
    with pytest.raises(HfCompressError, match="keep at least one"):
        select_layers(torch.tensor([0.5, 0.1]), drop=2)


def test_selection_budget_must_be_given_exactly_once():
    with pytest.raises(HfCompressError, match="exactly one"):
        select_heads(SCORES)
    with pytest.raises(HfCompressError, match="exactly one"):
        select_heads(SCORES, sparsity=0.5, count=2)
    with pytest.raises(HfCompressError, match="sparsity"):
        select_ffn(SCORES, sparsity=1.5)
    with pytest.raises(HfCompressError, match="scope"):
        select_ffn(SCORES, count=1, scope="layerwise")
