"""The distillation library: students built from teachers, the registered losses, the teacher-logit cache."""

from __future__ import annotations

import copy

import pytest
import torch
from pydantic import ValidationError
from torch.utils.data import DataLoader
from transformers import (
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
)

from hfcompress.distillation import (
    LOSSES,
    DistillationLoss,
    DistillationLossOptions,
    TeacherCache,
    cache_teacher_logits,
    cached_teacher_logits,
    check_same_vocabulary,
    distillation_compute_loss,
    layers_to_keep,
    soft_target_kl,
    student_from_config,
    student_from_layers,
    teacher_fingerprint,
    top_k_soft_target_kl,
    transformer_layers,
)
from hfcompress.distillation.architectures import layer_list_path
from hfcompress.distillation.losses import LossInputs, ce_loss
from hfcompress.errors import HfCompressError

VOCAB = 200
DISTILLATION_LOSSES = ["kl", "hidden_mse", "hidden_cosine", "attention_kl"]


def tiny_bert(seed=0, **overrides):
    torch.manual_seed(seed)
    settings = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                    max_position_embeddings=64, num_labels=3, attn_implementation="eager")
    return BertForSequenceClassification(BertConfig(**{**settings, **overrides})).eval()


def tiny_distilbert(seed=0):
    torch.manual_seed(seed)
    config = DistilBertConfig(
        vocab_size=VOCAB, dim=32, n_layers=4, n_heads=4, hidden_dim=64, max_position_embeddings=64, num_labels=3
    )
    return DistilBertForSequenceClassification(config).eval()


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=4, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config).eval()


def tiny_llama(seed=0, **overrides):
    """Grouped-query attention: 4 query heads share 2 key/value heads."""
    torch.manual_seed(seed)
    settings = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=64, attn_implementation="eager")
    return LlamaForCausalLM(LlamaConfig(**{**settings, **overrides})).eval()


TEACHERS = {"bert": tiny_bert, "distilbert": tiny_distilbert, "gpt2": tiny_gpt2, "llama": tiny_llama}


def token_batch(lengths=(8, 5, 3), seed=1, labels="tokens"):
    """Right-padded token ids; `labels` are class ids, or the tokens themselves with -100 on padding."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.randint(1, VOCAB, (len(lengths), width), generator=generator)
    attention_mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    input_ids = input_ids * attention_mask
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if labels == "tokens":
        batch["labels"] = input_ids.masked_fill(attention_mask == 0, -100)
    else:
        batch["labels"] = torch.randint(0, 3, (len(lengths),), generator=generator)
    return batch


def run(model, batch, **flags):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **flags)


# ------------------------------------------------------------------------------------------- students


@pytest.mark.parametrize("family", TEACHERS)
def test_student_from_layers_copies_the_kept_layers_exactly(family):
    teacher = TEACHERS[family]()
    student, layer_map = student_from_layers(teacher, layers=[0, 3])

    assert layer_map == {0: 0, 1: 3}
    assert len(transformer_layers(student)) == 2 and student.config.num_hidden_layers == 2
    teacher_weights, student_weights = teacher.state_dict(), student.state_dict()
    prefix = layer_list_path(teacher) + "."
    for key, tensor in student_weights.items():
        if key.startswith(prefix):
            index, rest = key[len(prefix):].split(".", 1)
            key = f"{prefix}{layer_map[int(index)]}.{rest}"
        assert torch.equal(tensor, teacher_weights[key]), key
    outputs = run(student, token_batch())
    assert torch.isfinite(outputs.logits).all()
    assert outputs.logits.shape == run(teacher, token_batch()).logits.shape


def test_config_keys_of_each_family_follow_the_student():
    gpt2, _ = student_from_layers(tiny_gpt2(), num_layers=2, strategy="first")
    distilbert, _ = student_from_layers(tiny_distilbert(), num_layers=2, strategy="last")
    assert gpt2.config.n_layer == 2 and len(gpt2.transformer.h) == 2
    assert distilbert.config.n_layers == 2 and len(distilbert.distilbert.transformer.layer) == 2


@pytest.mark.parametrize("family", TEACHERS)
def test_student_keeping_every_layer_computes_what_the_teacher_does(family):
    teacher = TEACHERS[family]()
    student, layer_map = student_from_layers(teacher, num_layers=4)
    batch = token_batch()
    assert layer_map == {0: 0, 1: 1, 2: 2, 3: 3}
    torch.testing.assert_close(run(student, batch).logits, run(teacher, batch).logits, atol=1e-6, rtol=0)


def test_decoder_student_renumbers_cache_slots_and_generates():
    student, _ = student_from_layers(tiny_llama(), layers=[1, 3])
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1]
    prompt = torch.randint(1, VOCAB, (1, 4))
    cached = student.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=True)
    uncached = student.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_per_layer_attention_types_follow_the_kept_layers():
    types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    torch.manual_seed(0)
    teacher = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, layer_types=types, use_sliding_window=True, sliding_window=4,
    ))
    student, _ = student_from_layers(teacher, layers=[1, 2])
    assert student.config.layer_types == ["sliding_attention", "full_attention"]


def test_layer_strategies():
    assert layers_to_keep(12, strategy="every_other") == [0, 2, 4, 6, 8, 10]
    assert layers_to_keep(12, num_layers=3, strategy="first") == [0, 1, 2]
    assert layers_to_keep(12, num_layers=3, strategy="last") == [9, 10, 11]
    assert layers_to_keep(12, num_layers=6, strategy="uniform") == [1, 3, 5, 7, 9, 11]
    assert layers_to_keep(6, num_layers=4) == [1, 2, 3, 5]
    assert layers_to_keep(12, layers=[5, 0]) == [0, 5]
    with pytest.raises(HfCompressError, match="out of range"):
        layers_to_keep(4, layers=[0, 4])
    with pytest.raises(HfCompressError, match="between 1 and 4"):
        layers_to_keep(4, num_layers=5)
    with pytest.raises(HfCompressError, match="unknown layer strategy 'middle'"):
        layers_to_keep(4, num_layers=2, strategy="middle")


def test_student_from_config_is_smaller_and_spaces_its_layers_over_the_teacher():
    teacher = tiny_bert()
    overrides = {"num_hidden_layers": 2, "hidden_size": 16, "intermediate_size": 32}
    student, layer_map = student_from_config(teacher.config, overrides, BertForSequenceClassification)

    expected = BertForSequenceClassification(BertConfig(**{**teacher.config.to_dict(), **overrides}))
    assert student.num_parameters() == expected.num_parameters() < teacher.num_parameters()
    assert layer_map == {0: 1, 1: 3}
    assert student.config.num_labels == 3 and teacher.config.hidden_size == 32  # the teacher's config is untouched
    with pytest.raises(HfCompressError, match="no setting 'num_layerz'"):
        student_from_config(teacher.config, {"num_layerz": 2}, BertForSequenceClassification)
    with pytest.raises(HfCompressError, match="cannot build a bert model: The hidden size \\(30\\)"):
        student_from_config(teacher.config, {"hidden_size": 30}, BertForSequenceClassification)


def test_student_from_config_initialised_from_a_checkpoint(tmp_path):
    teacher = tiny_bert()
    saved = tiny_bert(seed=5, num_hidden_layers=2)
    saved.save_pretrained(tmp_path)
    student, layer_map = student_from_config(teacher.config, {}, BertForSequenceClassification, init_from=str(tmp_path))
    assert layer_map == {0: 1, 1: 3}
    for key, tensor in saved.state_dict().items():
        assert torch.equal(student.state_dict()[key], tensor), key


def test_mismatched_vocabularies_are_refused(tokenizer):
    check_same_vocabulary(tokenizer, copy.deepcopy(tokenizer))
    other = copy.deepcopy(tokenizer)
    other.add_tokens(["<brand-new-token>"])
    with pytest.raises(HfCompressError, match="differs from the teacher's.*shared vocabulary"):
        check_same_vocabulary(tokenizer, other)
    with pytest.raises(HfCompressError, match=r"vocab_size \(100\) differs from the teacher's \(200\)"):
        check_same_vocabulary(tokenizer, tokenizer, tiny_llama().config, tiny_llama(vocab_size=100).config)


# --------------------------------------------------------------------------------------------- losses


def loss_value(name, student_outputs, teacher_outputs, batch, layer_map=None, temperature=2.0):
    layer_map = layer_map or {0: 0, 1: 1, 2: 2, 3: 3}
    inputs = LossInputs(student_outputs, teacher_outputs, batch, temperature, layer_map, lambda _, hidden: hidden)
    return LOSSES[name](inputs).item()


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_each_loss_is_zero_for_a_copy_of_the_teacher_and_positive_otherwise(family):
    teacher = TEACHERS[family]()
    batch = token_batch(labels="tokens" if family == "llama" else "classes")
    flags = {"output_hidden_states": True, "output_attentions": True}
    teacher_outputs = run(teacher, batch, **flags)
    same = run(student_from_layers(teacher, num_layers=4)[0], batch, **flags)
    other = run(TEACHERS[family](seed=1, initializer_range=0.5), batch, **flags)  # larger weights: sharper outputs
    for name in DISTILLATION_LOSSES:
        assert loss_value(name, same, teacher_outputs, batch) == pytest.approx(0, abs=1e-6), name
        assert loss_value(name, other, teacher_outputs, batch) > 1e-3, name


def test_hard_label_cross_entropy_matches_the_models_own_loss():
    llama, bert = tiny_llama(), tiny_bert()
    lm_batch, class_batch = token_batch(), token_batch(labels="classes")
    for model, batch in ((llama, lm_batch), (bert, class_batch)):
        outputs = model(**batch)
        inputs = LossInputs(outputs, None, batch, 1.0, {}, None)
        torch.testing.assert_close(ce_loss(inputs), outputs.loss, atol=1e-6, rtol=0)


def test_token_level_losses_ignore_padded_positions():
    teacher, student = tiny_llama(), tiny_llama(seed=1)
    batch = token_batch(lengths=(8, 5, 3))
    batch["labels"] = batch["input_ids"]  # as in packed language-model blocks: only attention_mask marks padding
    flags = {"output_hidden_states": True}
    teacher_outputs, student_outputs = run(teacher, batch, **flags), run(student, batch, **flags)
    padded = batch["attention_mask"] == 0

    changed = copy.copy(student_outputs)
    changed.logits = student_outputs.logits + 50 * torch.randn_like(student_outputs.logits) * padded[..., None]
    changed.hidden_states = tuple(h + 9 * padded[..., None] for h in student_outputs.hidden_states)

    def unchanged(name):
        before = loss_value(name, student_outputs, teacher_outputs, batch)
        return loss_value(name, changed, teacher_outputs, batch) == before

    assert unchanged("kl") and unchanged("hidden_mse") and unchanged("hidden_cosine")
    changed.logits = student_outputs.logits.clone()
    changed.logits[0, 0] += 5  # a real token
    assert not unchanged("kl")
    batch["labels"] = batch["labels"].clone()
    batch["labels"][0, 0] = -100  # ...unless its label says to ignore it
    assert unchanged("kl")


def test_kl_is_averaged_over_real_tokens_and_scaled_by_temperature_squared():
    student_logits, teacher_logits = torch.randn(2, 4, 7), torch.randn(2, 4, 7)
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    teacher_log_probs, student_log_probs = (teacher_logits / 3).log_softmax(-1), (student_logits / 3).log_softmax(-1)
    per_token = (teacher_log_probs.exp() * (teacher_log_probs - student_log_probs)).sum(-1)
    expected = per_token[mask.bool()].mean() * 9
    torch.testing.assert_close(soft_target_kl(student_logits, teacher_logits, 3.0, mask), expected)


def test_top_k_kl_over_the_whole_vocabulary_equals_the_full_kl():
    student_logits, teacher_logits = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    values, indices = teacher_logits.topk(11, dim=-1)
    full = soft_target_kl(student_logits, teacher_logits, 2.0, mask)
    torch.testing.assert_close(top_k_soft_target_kl(student_logits, values, indices, 2.0, mask), full)
    top3 = teacher_logits.topk(3, dim=-1)
    assert top_k_soft_target_kl(teacher_logits, *top3, 2.0, mask).item() == pytest.approx(0, abs=1e-6)


def test_narrower_student_is_compared_through_trained_projections_kept_out_of_the_student():
    teacher = tiny_bert()
    narrower = {"num_hidden_layers": 2, "hidden_size": 16, "intermediate_size": 32}
    student, layer_map = student_from_config(teacher.config, narrower, BertForSequenceClassification)
    options = {"weights": {"kl": 1.0, "hidden_mse": 1.0}}
    loss_fn = DistillationLoss.from_configs(options, student.config, teacher.config, layer_map)
    assert sorted(loss_fn.projections) == ["0", "1"]
    assert loss_fn.projections["0"].weight.shape == (32, 16)
    assert not any("projections" in key for key in student.state_dict())
    assert student.num_parameters() == sum(p.numel() for p in student.parameters())  # nothing attached to it

    batch = token_batch(labels="classes")
    compute_loss = distillation_compute_loss(loss_fn, teacher=teacher)
    loss, parts = compute_loss(student.train(), batch)
    loss.backward()
    assert set(parts) == {"kl", "hidden_mse", "loss"} and parts["hidden_mse"] > 0
    assert loss_fn.projections["1"].weight.grad.abs().sum() > 0


def test_same_width_needs_no_projection():
    teacher = tiny_bert()
    loss_fn = DistillationLoss.from_configs({"weights": {"hidden_cosine": 1.0}}, teacher.config, teacher.config, {0: 1})
    assert len(loss_fn.projections) == 0 and loss_fn.needs_hidden_states and not loss_fn.needs_attentions
    assert loss_fn.output_flags == {"output_hidden_states": True, "output_attentions": False}


def test_student_trained_on_the_kl_moves_toward_a_fixed_teacher():
    teacher = tiny_llama()
    with torch.no_grad():
        teacher.lm_head.weight.mul_(8)  # a confident teacher: far from a fresh student's near-uniform predictions
    student, layer_map = student_from_config(teacher.config, {"num_hidden_layers": 2}, LlamaForCausalLM)
    options = {"weights": {"kl": 1.0}, "temperature": 1.0}
    loss_fn = DistillationLoss.from_configs(options, student.config, teacher.config, layer_map)
    compute_loss = distillation_compute_loss(loss_fn, teacher=teacher)
    batches = [token_batch(lengths=(12, 12, 9, 6), seed=seed) for seed in range(2)]
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)

    def mean_kl():
        with torch.no_grad():
            return sum(compute_loss(student, batch)[1]["kl"] for batch in batches) / len(batches)

    before = mean_kl()
    student.train()
    for step in range(30):
        loss, _ = compute_loss(student, batches[step % len(batches)])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    student.eval()
    assert mean_kl() < 0.3 * before  # seen: 0.41 -> 0.05


def test_loss_options_are_validated():
    assert DistillationLossOptions().weights == {"kl": 0.5, "ce": 0.5}
    known = r"\(known: attention_kl, ce, hidden_cosine, hidden_mse, kl\)"
    with pytest.raises(ValidationError, match=r"unknown loss 'kld' " + known):
        DistillationLossOptions(weights={"kld": 1.0})
    with pytest.raises(ValidationError, match="must be >= 0"):
        DistillationLossOptions(weights={"kl": -1.0})
    with pytest.raises(ValidationError, match="at least one loss"):
        DistillationLossOptions(weights={"kl": 0.0})
    with pytest.raises(ValidationError, match="greater than 0"):
        DistillationLossOptions(temperature=0)
    with pytest.raises(ValidationError, match="Extra inputs"):
        DistillationLossOptions(temprature=2.0)


def test_losses_that_need_more_than_logits_say_what_is_missing():
    teacher, bert = tiny_bert(), tiny_bert()
    with pytest.raises(HfCompressError, match="needs a layer_map"):
        DistillationLoss({"weights": {"hidden_mse": 1.0}})
    with pytest.raises(HfCompressError, match="teacher layer 4 out of range"):
        DistillationLoss.from_configs({"weights": {"hidden_mse": 1.0}}, bert.config, teacher.config, {0: 4})
    with pytest.raises(HfCompressError, match=r"same number of attention heads .*\(2 vs 4\)"):
        DistillationLoss.from_configs({"weights": {"attention_kl": 1.0}}, tiny_bert(num_attention_heads=2).config,
                                      teacher.config, {0: 0})

    loss_fn = DistillationLoss({"weights": {"attention_kl": 1.0}}, layer_map={0: 0})
    sdpa = tiny_llama(attn_implementation="sdpa")
    batch = token_batch()
    with pytest.raises(HfCompressError, match='output_attentions=True and attn_implementation="eager"'):
        loss_fn(run(sdpa, batch, output_attentions=True), run(sdpa, batch, output_attentions=True), batch)
    loss_fn.prepare_models(sdpa)
    loss, _ = loss_fn(run(sdpa, batch, output_attentions=True), run(sdpa, batch, output_attentions=True), batch)
    assert loss.item() == pytest.approx(0, abs=1e-6)


# --------------------------------------------------------------------------------------- teacher cache


def examples(lengths, labels="tokens"):
    generator = torch.Generator().manual_seed(3)
    rows = []
    for index, length in enumerate(lengths):
        ids = torch.randint(1, VOCAB, (length,), generator=generator)
        label = ids if labels == "tokens" else torch.tensor(index % 3)
        rows.append({"input_ids": ids, "labels": label, "example_index": index})
    return rows


def right_padded(rows):
    width = max(len(row["input_ids"]) for row in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    per_token = rows[0]["labels"].ndim == 1
    labels = torch.full_like(input_ids, -100) if per_token else torch.stack([row["labels"] for row in rows])
    for i, row in enumerate(rows):
        input_ids[i, : len(row["input_ids"])] = row["input_ids"]
        attention_mask[i, : len(row["input_ids"])] = 1
        if per_token:
            labels[i, : len(row["labels"])] = row["labels"]
    example_index = torch.tensor([row["example_index"] for row in rows])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "example_index": example_index}


def loaders(rows):
    in_order = DataLoader(rows, batch_size=4, collate_fn=right_padded)
    generator = torch.Generator().manual_seed(0)
    shuffled = DataLoader(rows, batch_size=3, shuffle=True, collate_fn=right_padded, generator=generator)
    return in_order, shuffled


def test_cached_classifier_logits_are_the_teachers_and_follow_shuffled_batches():
    teacher = tiny_bert()
    in_order, shuffled = loaders(examples([9, 4, 6, 2, 7, 5, 8, 3, 6, 4], labels="classes"))
    cache = cache_teacher_logits(teacher, in_order)
    assert len(cache) == 10 and not cache.token_level
    for batch in in_order:
        assert torch.equal(cache.lookup(batch["example_index"]).logits, run(teacher, batch).logits)
    for batch in shuffled:
        cached = cache.lookup(batch["example_index"]).logits
        torch.testing.assert_close(cached, run(teacher, batch).logits, atol=1e-5, rtol=0)  # other padding, same logits


def test_cached_top_k_logits_match_the_live_teacher_token_by_token():
    teacher = tiny_llama()
    in_order, shuffled = loaders(examples([9, 4, 6, 2, 7, 5, 8, 3]))
    cache = cache_teacher_logits(teacher, in_order, top_k=5)
    assert cache.token_level and cache.top_k == 5 and cache.tensors["top_k_values"].dtype == torch.float16
    for batch in shuffled:
        cached = cache.lookup(batch["example_index"], batch["input_ids"].shape[1])
        live = run(teacher, batch).logits.topk(5, dim=-1)
        real = batch["attention_mask"].bool()
        assert cached.top_k_values.shape == (*batch["input_ids"].shape, 5)
        torch.testing.assert_close(cached.top_k_values[real], live.values[real], atol=2e-3, rtol=1e-3)
        assert torch.equal(cached.top_k_indices[real], live.indices[real])
        assert not cached.top_k_values[~real].any()  # padding beyond an example's length

    cropped = cache.lookup(torch.tensor([0, 1]), sequence_length=3)
    assert cropped.top_k_values.shape == (2, 3, 5)


def test_kl_against_a_top_k_cache_over_the_whole_vocabulary_equals_the_live_kl():
    teacher, student = tiny_llama(), tiny_llama(seed=1)
    in_order, shuffled = loaders(examples([9, 4, 6, 2, 7, 5]))
    cache = cache_teacher_logits(teacher, in_order, top_k=VOCAB)
    loss_fn = DistillationLoss({"weights": {"kl": 1.0}})
    from_cache = distillation_compute_loss(loss_fn, teacher_cache=cache)
    live = distillation_compute_loss(loss_fn, teacher=teacher)
    for batch in shuffled:
        assert from_cache(student, batch)[1]["kl"] == pytest.approx(live(student, batch)[1]["kl"], rel=1e-3)


def test_cache_is_saved_and_reused_only_while_its_fingerprint_matches(tmp_path):
    in_order, _ = loaders(examples([5, 3, 4], labels="classes"))
    path = tmp_path / "teacher_logits.safetensors"
    first = cached_teacher_logits(path, tiny_bert(), in_order, fingerprint="teacher-a")
    reloaded = TeacherCache.load(path)
    assert reloaded.fingerprint == "teacher-a" and torch.equal(reloaded.tensors["logits"], first.tensors["logits"])

    other_teacher = tiny_bert(seed=7)
    reused = cached_teacher_logits(path, other_teacher, in_order, fingerprint="teacher-a")
    assert torch.equal(reused.tensors["logits"], first.tensors["logits"])
    recomputed = cached_teacher_logits(path, other_teacher, in_order, fingerprint="teacher-b")
    assert not torch.equal(recomputed.tensors["logits"], first.tensors["logits"])
    assert TeacherCache.load(path).fingerprint == "teacher-b"

    with pytest.raises(HfCompressError, match="example_index 3 is not in the teacher cache"):
        reloaded.lookup(torch.tensor([0, 3]))


def test_fingerprint_changes_with_the_teacher_and_the_data_description():
    teacher = tiny_bert()
    fingerprint = teacher_fingerprint(teacher, "dataset-abc", 32)
    assert fingerprint == teacher_fingerprint(tiny_bert(), "dataset-abc", 32)
    assert fingerprint != teacher_fingerprint(teacher, "dataset-abd", 32)
    assert fingerprint != teacher_fingerprint(teacher, "dataset-abc", None)
    with torch.no_grad():
        teacher.classifier.bias[0] += 1e-3
    assert fingerprint != teacher_fingerprint(teacher, "dataset-abc", 32)


def test_cache_refuses_what_it_cannot_align():
    left_padded = right_padded(examples([4, 2]))
    left_padded["attention_mask"] = left_padded["attention_mask"].flip(1)
    with pytest.raises(HfCompressError, match="padded on the right"):
        cache_teacher_logits(tiny_llama(), [left_padded])
    with pytest.raises(HfCompressError, match=r"missing \[1\]"):
        cache_teacher_logits(tiny_bert(), [right_padded([examples([3, 3, 3], labels="classes")[i] for i in (0, 2)])])
    cache = cache_teacher_logits(tiny_bert(), [right_padded(examples([3, 3], labels="classes"))])
    with pytest.raises(HfCompressError, match="need the live teacher"):
        distillation_compute_loss(DistillationLoss({"weights": {"hidden_mse": 1.0}}, {0: 0}), teacher_cache=cache)
