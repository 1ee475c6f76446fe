"""Robustness: how a model holds up when the test text is a little unlike its test split.

A fixed suite of label-preserving perturbations (no synonyms, no downloads), each a pure function of the text, the
perturbation's name, the seed and the example's index, so every model of a run reads exactly the same perturbed text:

- `typos`: a share (`rate`) of the words of 3+ letters get one typo: two neighbouring letters swapped, a letter
  dropped, doubled or replaced by a neighbour on a QWERTY keyboard,
- `uppercase` / `lowercase`: the whole text,
- `no_punctuation`: every punctuation character removed,
- `word_dropout`: a share of the words left out (at least one word stays),
- `word_swap`: a share of neighbouring word pairs swapped,
- `add_url`: an irrelevant link appended ("… https://t.co/Xy7pQ2"), as in scraped text.

Classification: accuracy on the perturbed split, the drop from clean accuracy (points), and the share of examples
whose prediction flipped. Only examples whose tokens the perturbation changed are run again (an uncased tokenizer
reads `uppercase` as the clean text). Causal LMs: each test block is decoded, perturbed and tokenized again, and the
perplexity of the perturbed text is set beside that of the clean text read the same way.
"""

from __future__ import annotations

import re
import unicodedata
import zlib
from typing import Literal

import numpy as np
from pydantic import Field

from .recipe_schema import StrictModel

Perturbation = Literal["typos", "uppercase", "lowercase", "no_punctuation", "word_dropout", "word_swap", "add_url"]
DEFAULT_PERTURBATIONS = ["typos", "uppercase", "no_punctuation", "word_dropout"]
KEYBOARD_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")
WORD = re.compile(r"\S+")


class RobustnessOptions(StrictModel):
    """The perturbation suite each evaluated model is scored on (the main split)."""

    enabled: bool | None = Field(None, description="default: on for classification; off for causal LMs, where each "
                                                   "perturbation is another pass over the test text")
    perturbations: list[Perturbation] = Field(default_factory=lambda: list(DEFAULT_PERTURBATIONS), min_length=1)
    rate: float = Field(0.1, gt=0, le=1, description="share of words a typo, dropout or swap touches")
    seed: int | None = Field(None, description="default: the recipe's seed")


# ---------------------------------------------------------------------------------------------- perturbations


def _neighbours() -> dict[str, str]:
    keys = {}
    for row_index, row in enumerate(KEYBOARD_ROWS):
        for column, key in enumerate(row):
            near = [row[c] for c in (column - 1, column + 1) if 0 <= c < len(row)]
            near += [KEYBOARD_ROWS[r][column] for r in (row_index - 1, row_index + 1)
                     if 0 <= r < len(KEYBOARD_ROWS) and column < len(KEYBOARD_ROWS[r])]
            keys[key] = "".join(near)
    return keys


NEIGHBOURS = _neighbours()


def _typo(word: str, rng: np.random.Generator) -> str:
    letters = [i for i, char in enumerate(word) if char.isalpha()]
    position = letters[int(rng.integers(len(letters)))]
    kind = int(rng.integers(4))
    if kind == 0 and position + 1 < len(word):
        return word[:position] + word[position + 1] + word[position] + word[position + 2:]
    if kind == 1:
        return word[:position] + word[position + 1:]
    if kind == 2:
        return word[:position] + word[position] + word[position:]
    near = NEIGHBOURS.get(word[position].lower(), "")
    if not near:
        return word[:position] + word[position + 1:]
    replacement = near[int(rng.integers(len(near)))]
    replacement = replacement.upper() if word[position].isupper() else replacement
    return word[:position] + replacement + word[position + 1:]


def typos(text: str, rng: np.random.Generator, rate: float) -> str:
    def replace(match):
        word = match.group(0)
        if sum(char.isalpha() for char in word) >= 3 and rng.random() < rate:
            return _typo(word, rng)
        return word
    return WORD.sub(replace, text)


def no_punctuation(text: str, rng: np.random.Generator, rate: float) -> str:
    kept = "".join(char for char in text if not unicodedata.category(char).startswith("P"))
    return re.sub(r"\s+", " ", kept).strip()


def word_dropout(text: str, rng: np.random.Generator, rate: float) -> str:
    words = text.split()
    kept = [word for word in words if rng.random() >= rate]
    return " ".join(kept or [words[int(rng.integers(len(words)))]]) if words else text


def word_swap(text: str, rng: np.random.Generator, rate: float) -> str:
    words = text.split()
    index = 0
    while index + 1 < len(words):
        if rng.random() < rate:
            words[index], words[index + 1] = words[index + 1], words[index]
            index += 1
        index += 1
    return " ".join(words)


def add_url(text: str, rng: np.random.Generator, rate: float) -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    slug = "".join(alphabet[i] for i in rng.integers(len(alphabet), size=7))
    return f"{text} https://t.co/{slug}"


PERTURBATIONS = {
    "typos": typos,
    "uppercase": lambda text, rng, rate: text.upper(),
    "lowercase": lambda text, rng, rate: text.lower(),
    "no_punctuation": no_punctuation,
    "word_dropout": word_dropout,
    "word_swap": word_swap,
    "add_url": add_url,
}


def perturb(texts: list[str], name: str, seed: int, rate: float) -> list[str]:
    """The texts under one perturbation; example i's text depends on (seed, name, i) only."""
    function = PERTURBATIONS[name]
    key = zlib.crc32(name.encode())
    return [function(text, np.random.default_rng([seed, key, index]), rate) for index, text in enumerate(texts)]


# ---------------------------------------------------------------------------------------------- scores


def classification_robustness(clean_log_probs: np.ndarray, perturbed_log_probs: np.ndarray, labels: np.ndarray,
                              changed: np.ndarray) -> dict:
    """Accuracy under the perturbation, its drop from clean accuracy in points, the share of predictions that
    flipped, and the share of examples the perturbation changed."""
    clean, perturbed = clean_log_probs.argmax(-1), perturbed_log_probs.argmax(-1)
    accuracy = float(np.mean(perturbed == labels))
    return {"accuracy": accuracy, "drop": 100 * (float(np.mean(clean == labels)) - accuracy),
            "flipped": float(np.mean(clean != perturbed)), "changed": float(np.mean(changed))}


def perplexity_robustness(clean_nll: np.ndarray, clean_tokens: np.ndarray, nll: np.ndarray, tokens: np.ndarray) -> dict:
    """Perplexity of the perturbed text beside that of the clean text (both re-tokenized), and their ratio."""
    clean = float(np.exp(clean_nll.sum() / clean_tokens.sum()))
    perturbed = float(np.exp(nll.sum() / tokens.sum()))
    return {"perplexity": perturbed, "clean_perplexity": clean, "increase": perturbed / clean - 1}
