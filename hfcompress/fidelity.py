"""Fidelity: what compression changed in a model's outputs, beyond its accuracy.

Pure functions on numpy arrays of test-split outputs: agreement with a reference model's predictions, the mean KL
divergence of the output distributions, expected calibration error, per-class F1, and the examples that flipped
between right and wrong. The evaluate stage saves each model's test outputs (see `save_predictions`), so a later
model is compared with earlier ones without reloading them.

Causal LMs: a full-vocabulary distribution per token is too big to keep, so each model keeps its top-k token
log-probabilities (`TOP_K_TOKENS`) per position. A later model is compared with a reference while it is evaluated:
its log-probabilities are read at the reference's top-k token ids, and the KL divergence is taken over those k
tokens plus one bin for all the other tokens. That is the KL of the two distributions coarsened to k + 1 outcomes,
a lower bound of the full KL that misses only differences inside the reference's low-probability tail.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file
from sklearn.metrics import f1_score

ECE_BINS = 15  # equal-width confidence bins, as in Guo et al. 2017
TOP_K_TOKENS = 64  # causal LM: token log-probabilities kept per position
FLIP_EXAMPLES = 3  # examples shown per direction of flip


def predictions_of(log_probs: np.ndarray) -> np.ndarray:
    return np.asarray(log_probs).argmax(-1)


def agreement(reference_predictions: np.ndarray, predictions: np.ndarray) -> float:
    """The fraction of examples (or token positions) where both models predict the same class (token)."""
    return float(np.mean(np.asarray(reference_predictions) == np.asarray(predictions)))


def mean_kl(reference_log_probs: np.ndarray, log_probs: np.ndarray) -> float:
    """Mean KL(reference || model) in nats over examples; the last axis holds log-probabilities of the same
    outcomes in both. When they cover part of the distribution (top-k tokens), the mass left over is one more
    outcome on each side."""
    reference = np.exp(np.asarray(reference_log_probs, dtype=np.float64))
    log_reference = np.asarray(reference_log_probs, dtype=np.float64)
    log_model = np.asarray(log_probs, dtype=np.float64)
    per_example = np.sum(reference * (log_reference - log_model), axis=-1)
    reference_rest = np.clip(1.0 - reference.sum(-1), 0.0, 1.0)
    model_rest = np.clip(1.0 - np.exp(log_model).sum(-1), 0.0, 1.0)
    has_rest = reference_rest > 1e-6  # below that, float rounding of a full distribution, not a tail
    tail = np.where(has_rest, reference_rest * (np.log(np.maximum(reference_rest, 1e-12)) - np.log(np.maximum(model_rest, 1e-12))), 0.0)
    return float(np.mean(per_example + tail))


def expected_calibration_error(confidences: np.ndarray, correct: np.ndarray, num_bins: int = ECE_BINS) -> float:
    """Σ_bins (examples in bin / all) · |accuracy in bin − mean confidence in bin|, over equal-width bins of the
    confidence (the predicted class's probability); a confidence of exactly 0 goes in the first bin."""
    confidences = np.asarray(confidences, dtype=np.float64).ravel()
    correct = np.asarray(correct, dtype=np.float64).ravel()
    bins = np.clip(np.ceil(confidences * num_bins).astype(int) - 1, 0, num_bins - 1)
    error = 0.0
    for index in range(num_bins):
        members = bins == index
        if members.any():
            error += members.mean() * abs(correct[members].mean() - confidences[members].mean())
    return float(error)


def classification_ece(log_probs: np.ndarray, labels: np.ndarray, num_bins: int = ECE_BINS) -> float:
    probabilities = np.exp(np.asarray(log_probs, dtype=np.float64))
    return expected_calibration_error(probabilities.max(-1), probabilities.argmax(-1) == np.asarray(labels), num_bins)


def causal_lm_ece(outputs: dict, num_bins: int = ECE_BINS) -> float:
    """Calibration of the most likely next token: its probability against whether it is the actual next token."""
    confidences = np.exp(outputs["top_k_log_probs"][..., 0].astype(np.float64))
    return expected_calibration_error(confidences, outputs["top_k_indices"][..., 0] == outputs["targets"], num_bins)


def per_class_f1(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> list[float]:
    """F1 of each class (0 for a class never predicted nor present)."""
    scores = f1_score(labels, predictions, labels=list(range(num_classes)), average=None, zero_division=0)
    return [float(score) for score in scores]


def flips(reference_predictions: np.ndarray, predictions: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the examples the reference got right and the model gets wrong, and the other way round."""
    reference_right = np.asarray(reference_predictions) == np.asarray(labels)
    right = np.asarray(predictions) == np.asarray(labels)
    return np.flatnonzero(reference_right & ~right), np.flatnonzero(~reference_right & right)


# ---------------------------------------------------------------------------------------------- one model vs another


def classification_fidelity(reference: dict, current: dict, label_names: list[str], texts: list[str] | None) -> dict:
    """How `current` differs from `reference` (both `{"log_probs", "labels"}` of the same test examples)."""
    labels = current["labels"]
    reference_predictions, predictions = predictions_of(reference["log_probs"]), predictions_of(current["log_probs"])
    right_to_wrong, wrong_to_right = flips(reference_predictions, predictions, labels)
    reference_f1 = per_class_f1(reference_predictions, labels, len(label_names))
    current_f1 = per_class_f1(predictions, labels, len(label_names))
    examples = [
        {"flip": direction, "text": _clip(texts[i]) if texts else None, "label": label_names[labels[i]],
         "reference": label_names[reference_predictions[i]], "prediction": label_names[predictions[i]]}
        for direction, indices in (("right_to_wrong", right_to_wrong), ("wrong_to_right", wrong_to_right))
        for i in indices[:FLIP_EXAMPLES]
    ]
    return {
        "agreement": agreement(reference_predictions, predictions),
        "kl": mean_kl(reference["log_probs"], current["log_probs"]),
        "right_to_wrong": int(len(right_to_wrong)),
        "wrong_to_right": int(len(wrong_to_right)),
        "f1_change": {name: after - before for name, before, after in zip(label_names, reference_f1, current_f1)},
        "examples": examples,
    }


def causal_lm_fidelity(reference: dict, current: dict, reference_key: str) -> dict:
    """Top-1 token agreement and KL against a reference; `current[reference_key]` holds the current model's
    log-probabilities at the reference's top-k token ids (read while the current model was evaluated)."""
    return {
        "top1_agreement": agreement(reference["top_k_indices"][..., 0], current["top_k_indices"][..., 0]),
        "kl": mean_kl(reference["top_k_log_probs"], current[reference_key]),
        "kl_over": f"top-{reference['top_k_indices'].shape[-1]} tokens of the reference + the rest",
    }


def _clip(text: str, length: int = 200) -> str:
    return text if len(text) <= length else text[: length - 1] + "…"


# ---------------------------------------------------------------------------------------------- files


def save_predictions(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write a model's test outputs next to its metrics (atomically: a reader never sees half a file)."""
    temporary = path.with_name(f".{path.name}.tmp")
    save_file({name: np.ascontiguousarray(array) for name, array in arrays.items()}, str(temporary))
    temporary.replace(path)


def load_predictions(path: Path) -> dict[str, np.ndarray]:
    return load_file(str(path))
