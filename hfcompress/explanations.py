"""Explanation fidelity: does a compressed model decide for the same words as its teacher?

For a fixed, seeded sample of test examples, each model's word attributions for the class the *teacher* predicted
are computed with captum's perturbation methods and compared with the teacher's: the overlap of the top-k words and
the Spearman rank correlation, per example, averaged.

Method: `FeatureAblation` over whole words (default) or `ShapleyValueSampling`. Both only call the model forward,
so they work for every row the evaluate stage scores: torch, quantized (bitsandbytes, quanto, half) and ONNX Runtime
models alike. The attributed quantity is the log-odds of the teacher's class, log p / (1 - p): it does not saturate
near p = 1 the way a probability does, so small effects stay resolved, and within an example it ranks words exactly
as the probability would.

Baseline (what an ablated word becomes): "remove" (default) masks the word's tokens out of attention (as padding
is), so the model reads the sentence without the word while the other tokens keep their positions; this needs no
[MASK] token (GPT-style and SentencePiece tokenizers have none) and shows the model nothing it never saw. "mask"
replaces the word's tokens with the tokenizer's mask token instead (the model still sees that something is there).
Re-tokenizing the sentence without the word would be exact deletion, but shifts every later token and cannot be
batched by captum.

Words, not tokens: a word is a run of word characters (with inner apostrophes, "isn't") or of punctuation, found in
the text itself; each model's tokenizer (they differ after vocabulary pruning) maps its tokens to those words through
its character offsets, and a word's tokens are ablated together. So two models are compared word by word however their
tokenizers split the words. A token spanning two words belongs to the first; words cut off by truncation get 0.
"""

from __future__ import annotations

import re
import zlib
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from captum.attr import FeatureAblation, ShapleyValueSampling
from pydantic import Field
from scipy.stats import spearmanr

from .errors import HfCompressError
from .fidelity import load_predictions, save_predictions
from .recipe_schema import StrictModel

WORD = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]+")
ROWS_PER_FORWARD = 64  # examples x ablations stacked into one forward call
SHOWN_EXAMPLES = 4  # sample texts kept in the row for the picture of a card
SHOWN_WORDS = (6, 24)  # ... of this many words: long enough to say something, short enough for one or two lines


class ExplanationOptions(StrictModel):
    """Word attributions of the teacher's predicted class on a fixed sample of the evaluated split."""

    enabled: bool = Field(True, description="classification only; causal LMs get no word attributions")
    num_examples: int = Field(100, ge=1, description="test examples in the seeded sample (the teacher's sample is kept)")
    top_k: int = Field(3, ge=1, description="words compared by overlap")
    method: Literal["feature-ablation", "shapley-sampling"] = "feature-ablation"
    baseline: Literal["remove", "mask"] = Field("remove", description="remove: the word's tokens are masked out of "
                                                                      "attention; mask: replaced by the mask token")
    shapley_samples: int = Field(10, ge=1, description="permutations per example (shapley-sampling only)")
    seed: int | None = Field(None, description="default: the recipe's seed")


# ---------------------------------------------------------------------------------------------- words


def word_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the words (and punctuation runs) of a text."""
    return [match.span() for match in WORD.finditer(text)]


def token_words(offsets, spans: list[tuple[int, int]], text_length: int) -> list[int]:
    """For each token (character offsets from a fast tokenizer), the index of the word it belongs to, or -1 for
    special tokens and padding."""
    word_at = np.full(text_length + 1, -1)
    for index, (start, end) in enumerate(spans):
        word_at[start:end] = index
    words = []
    for start, end in offsets:
        inside = [word_at[c] for c in range(start, end) if word_at[c] >= 0] if end > start else []
        words.append(int(inside[0]) if inside else -1)
    return words


def shown_examples(texts: list[str], sample: np.ndarray) -> list[dict]:
    """The first few sampled texts of a readable length, with their position in the sample, for pictures."""
    chosen = [(position, texts[index]) for position, index in enumerate(sample)
              if SHOWN_WORDS[0] <= len(word_spans(texts[index])) <= SHOWN_WORDS[1]]
    return [{"position": position, "text": text} for position, text in chosen[:SHOWN_EXAMPLES]]


def sample_indices(num_texts: int, num_examples: int, seed: int) -> np.ndarray:
    """A fixed sample of example indices, sorted."""
    rng = np.random.default_rng([seed, zlib.crc32(b"explanations")])
    return np.sort(rng.choice(num_texts, size=min(num_examples, num_texts), replace=False))


# ---------------------------------------------------------------------------------------------- attributions


def log_odds(logits: torch.Tensor) -> torch.Tensor:
    """Per class c: log p_c / (1 - p_c) = logit_c - logsumexp of the other logits ([N, C] -> [N, C])."""
    logits = logits.float()
    classes = logits.shape[-1]
    others = logits.unsqueeze(1).expand(-1, classes, -1).masked_fill(torch.eye(classes, dtype=torch.bool), -torch.inf)
    return logits - others.logsumexp(-1)


class WordForward:
    """The forward function captum perturbs: `presence` [N, words] (1 kept, 0 ablated) switches whole words of the
    tokenized examples off; returns the model's log-odds per class."""

    def __init__(self, model, baseline: str, mask_token_id: int | None):
        self.model = model
        self.baseline = baseline
        self.mask_token_id = mask_token_id

    @torch.no_grad()
    def __call__(self, presence, input_ids, attention_mask, word_of_token):
        kept = presence.gather(1, word_of_token.clamp(min=0)).masked_fill(word_of_token < 0, 1) > 0.5
        if self.baseline == "mask":
            input_ids = input_ids.masked_fill(~kept, self.mask_token_id)
        else:
            attention_mask = attention_mask * kept.long()
        return log_odds(self.model(input_ids=input_ids, attention_mask=attention_mask).logits)


def word_attributions(model, tokenizer, texts: list[str], targets, options: ExplanationOptions, max_length: int,
                      seed: int) -> list[np.ndarray]:
    """Per text, one attribution per word (`word_spans`): how much the log-odds of its target class drops when the
    word is ablated (feature ablation), or the word's sampled Shapley value."""
    if not getattr(tokenizer, "is_fast", False):
        raise HfCompressError("evaluate.explanations: word attributions need a fast tokenizer (character offsets); "
                              "set explanations.enabled: false for this model")
    mask_token_id = getattr(tokenizer, "mask_token_id", None)
    if options.baseline == "mask" and mask_token_id is None:
        raise HfCompressError("evaluate.explanations.baseline: 'mask' needs a tokenizer with a mask token; use 'remove'")
    forward = WordForward(model, options.baseline, mask_token_id)
    spans = [word_spans(text) for text in texts]
    order = np.argsort([-len(s) for s in spans], kind="stable")  # similar word counts share a batch
    results: list[np.ndarray | None] = [None] * len(texts)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for batch in _batches(order, spans):
            values = _attribute_batch(forward, tokenizer, [texts[i] for i in batch], [spans[i] for i in batch],
                                      torch.as_tensor(np.asarray(targets)[batch]), options, max_length)
            for i, value in zip(batch, values):
                results[i] = value
    return results


def _batches(order: np.ndarray, spans: list) -> list[list[int]]:
    """Examples in groups whose ablations fill about ROWS_PER_FORWARD rows per forward call."""
    batches, current = [], []
    for index in order:
        current.append(int(index))
        if len(current) * max(1, len(spans[current[0]])) >= 4 * ROWS_PER_FORWARD:
            batches.append(current)
            current = []
    return batches + ([current] if current else [])


def _attribute_batch(forward: WordForward, tokenizer, texts, spans, targets, options, max_length) -> list[np.ndarray]:
    encoded = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_offsets_mapping=True,
                        return_tensors="pt")
    word_of_token = torch.tensor([token_words(offsets.tolist(), text_spans, len(text))
                                  for offsets, text_spans, text in zip(encoded["offset_mapping"], spans, texts)])
    num_words = max(1, int(word_of_token.max()) + 1)  # words cut off by truncation get no column (and 0)
    presence = torch.ones(len(texts), num_words)
    arguments = (encoded["input_ids"], encoded["attention_mask"], word_of_token)
    per_eval = max(1, ROWS_PER_FORWARD // len(texts))
    if options.method == "shapley-sampling":
        attributions = ShapleyValueSampling(forward).attribute(
            presence, baselines=0.0, target=targets, additional_forward_args=arguments,
            n_samples=options.shapley_samples, perturbations_per_eval=per_eval)
    else:
        attributions = FeatureAblation(forward).attribute(
            presence, baselines=0.0, target=targets, additional_forward_args=arguments, perturbations_per_eval=per_eval)
    values = torch.zeros(len(texts), max(num_words, max(len(s) for s in spans)))
    values[:, :num_words] = attributions
    return [values[row, : len(text_spans)].double().numpy() for row, text_spans in enumerate(spans)]


# ---------------------------------------------------------------------------------------------- comparison


def top_k_overlap(reference: np.ndarray, current: np.ndarray, k: int) -> float:
    """The share of the reference's k words of largest |attribution| that are among the model's (ties: earlier
    word first); k shrinks to the number of words."""
    k = min(k, len(reference))
    if k == 0:
        return float("nan")
    top = lambda values: set(np.argsort(-np.abs(values), kind="stable")[:k].tolist())
    return len(top(reference) & top(current)) / k


def rank_correlation(reference: np.ndarray, current: np.ndarray) -> float:
    """Spearman's rho of the two attributions over an example's words; 0 when the model's are all equal (it ranks
    no word above another), nan when the reference's are (nothing to agree with) or there is a single word."""
    if len(reference) < 2 or np.ptp(reference) == 0:
        return float("nan")
    if np.ptp(current) == 0:
        return 0.0
    return float(spearmanr(reference, current).statistic)


def compare_attributions(reference: list[np.ndarray], current: list[np.ndarray], k: int) -> dict:
    """Mean top-k overlap and mean Spearman correlation over the examples (those where each is defined)."""
    overlaps = [top_k_overlap(r, c, k) for r, c in zip(reference, current)]
    correlations = [rank_correlation(r, c) for r, c in zip(reference, current)]
    return {"top_k_overlap": _nanmean(overlaps), "spearman": _nanmean(correlations),
            "examples": int(np.sum(~np.isnan(correlations)))}


def _nanmean(values: list[float]) -> float | None:
    values = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(values)) if np.any(~np.isnan(values)) else None


# ---------------------------------------------------------------------------------------------- files


def save_attributions(path: Path, example_indices: np.ndarray, targets: np.ndarray, attributions: list[np.ndarray],
                      spans: list[list[tuple[int, int]]]) -> None:
    """One model's word attributions on the sample, flattened (`word_offsets` cuts them per example), with the words'
    character spans so a report can show them."""
    counts = np.array([len(values) for values in attributions])
    save_predictions(path, {
        "example_index": np.asarray(example_indices, dtype=np.int64),
        "target": np.asarray(targets, dtype=np.int64),
        "word_offsets": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        "attributions": np.concatenate([*attributions, np.zeros(0)]).astype(np.float32),
        "word_spans": np.asarray([span for example in spans for span in example], dtype=np.int64).reshape(-1, 2),
    })


def load_attributions(path: Path) -> dict:
    """`save_attributions`' file as example_index, target, attributions (a list per example) and spans."""
    arrays = load_predictions(path)
    cuts = arrays["word_offsets"]
    per_example = lambda name: [arrays[name][start:end] for start, end in zip(cuts[:-1], cuts[1:])]
    return {"example_index": arrays["example_index"], "target": arrays["target"],
            "attributions": [values.astype(np.float64) for values in per_example("attributions")],
            "spans": [[tuple(span) for span in spans.tolist()] for spans in per_example("word_spans")]}
