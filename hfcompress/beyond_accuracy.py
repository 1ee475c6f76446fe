"""What an evaluate row measures besides accuracy: explanation fidelity to the teacher and robustness to
perturbed text (see `explanations` and `robustness`). Called by the evaluate stage for every evaluated model."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding

from .data import LengthGroupedBatchSampler
from .explanations import (
    ExplanationOptions,
    compare_attributions,
    load_attributions,
    sample_indices,
    save_attributions,
    shown_examples,
    word_attributions,
    word_spans,
)
from .fidelity import load_predictions
from .robustness import RobustnessOptions, classification_robustness, perplexity_robustness, perturb
from .run_dir import AttributionComparison, Explanations, Row


# ---------------------------------------------------------------------------------------------- explanations


def attribution_references(rows: list[Row], split: str) -> dict[str, Row]:
    """Earlier rows with word attributions on the split, by role: "teacher" (labelled so, else the first) and
    "previous" (the last)."""
    rows = [row for row in rows if row.attributions_file and row.metrics.get("split") == split]
    if not rows:
        return {}
    return {"teacher": next((row for row in rows if row.label == "teacher"), rows[0]), "previous": rows[-1]}


def explain_model(ctx, model, options: ExplanationOptions, split: str, log_probs: np.ndarray,
                  output_file: Path) -> Explanations:
    """Word attributions of the teacher's predicted class on the teacher's sample (this model's own prediction and a
    fresh sample when it is the first), saved to `output_file`, compared with the teacher's and the previous row's."""
    texts = ctx.data.texts[split]
    seed = ctx.recipe.seed if options.seed is None else options.seed
    references = {role: (row.label, load_attributions(Path(ctx.run_dir) / row.attributions_file))
                  for role, row in attribution_references(ctx.rows, split).items()}
    if "teacher" in references:
        indices, targets = references["teacher"][1]["example_index"], references["teacher"][1]["target"]
    else:
        indices = sample_indices(len(texts), options.num_examples, seed)
        targets = log_probs[indices].argmax(-1)
    sample = [texts[i] for i in indices]
    attributions = word_attributions(model, ctx.tokenizer, sample, targets, options, ctx.recipe.task.max_length, seed)
    save_attributions(output_file, indices, targets, attributions, [word_spans(text) for text in sample])
    compared = {role: AttributionComparison(label=label, **compare_attributions(reference["attributions"],
                                                                                  attributions, options.top_k))
                for role, (label, reference) in references.items()
                if np.array_equal(reference["example_index"], indices)}
    return Explanations(method=options.method, baseline=options.baseline, top_k=options.top_k,
                        num_examples=len(indices), shown=shown_examples(texts, indices), **compared)


# ---------------------------------------------------------------------------------------------- robustness


def robustness_of(ctx, model, options: RobustnessOptions, split: str, batch_size: int, predictions_file: Path) -> dict:
    """Each perturbation's scores (see `robustness`), keyed by its name."""
    seed = ctx.recipe.seed if options.seed is None else options.seed
    if ctx.task.type == "causal-lm":
        return _perplexity_under_perturbations(ctx, model, options, split, batch_size, seed)
    clean = load_predictions(predictions_file)
    clean_ids = [list(ids) for ids in ctx.data[split]["input_ids"]]
    results = {}
    for name in options.perturbations:
        texts = perturb(ctx.data.texts[split], name, seed, options.rate)
        encoded = ctx.tokenizer(texts, truncation=True, max_length=ctx.recipe.task.max_length)
        changed = np.array([ids != before for ids, before in zip(encoded["input_ids"], clean_ids)], dtype=bool)
        log_probs = clean["log_probs"].copy()
        if changed.any():
            rows = np.flatnonzero(changed)
            subset = {key: [values[i] for i in rows] for key, values in encoded.items()}
            outputs = ctx.task.predict(model, _loader(ctx.tokenizer, subset, clean["labels"][rows], batch_size))
            log_probs[rows] = outputs["log_probs"]
        results[name] = classification_robustness(clean["log_probs"], log_probs, clean["labels"], changed)
    return results


def _loader(tokenizer, encoded: dict, labels, batch_size: int, collate=None) -> DataLoader:
    """Batches of tokenized texts in the shape `Task.predict` reads (labels, example_index; longest first)."""
    columns = {**encoded, "labels": list(np.asarray(labels).tolist()),
               "example_index": list(range(len(encoded["input_ids"])))}
    dataset = datasets.Dataset.from_dict(columns)
    sampler = LengthGroupedBatchSampler([len(ids) for ids in encoded["input_ids"]], batch_size, shuffle=False)
    return DataLoader(dataset, batch_sampler=sampler,
                      collate_fn=collate or DataCollatorWithPadding(tokenizer, return_tensors="pt"))


def _perplexity_under_perturbations(ctx, model, options: RobustnessOptions, split: str, batch_size: int, seed: int):
    """Causal LM: the test blocks decoded to text, perturbed and tokenized again; perplexity beside the clean text's."""
    tokenizer = ctx.tokenizer
    texts = [tokenizer.decode(list(ids)) for ids in ctx.data[split]["input_ids"]]

    def score(variant_texts):
        encoded = tokenizer(variant_texts, add_special_tokens=False, truncation=True, max_length=ctx.recipe.task.max_length)
        encoded = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
        outputs = ctx.task.predict(model, _loader(tokenizer, encoded, [0] * len(variant_texts), batch_size,
                                                  _language_model_collate(tokenizer)))
        return outputs["nll"], outputs["num_tokens"]

    clean_nll, clean_tokens = score(texts)
    return {name: perplexity_robustness(clean_nll, clean_tokens, *score(perturb(texts, name, seed, options.rate)))
            for name in options.perturbations}


def _language_model_collate(tokenizer):
    """Right-padded blocks whose labels are their own tokens (the loss reads only attended positions)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def collate(features):
        length = max(len(feature["input_ids"]) for feature in features)
        ids = torch.full((len(features), length), pad, dtype=torch.long)
        mask = torch.zeros((len(features), length), dtype=torch.long)
        for row, feature in enumerate(features):
            ids[row, : len(feature["input_ids"])] = torch.as_tensor(feature["input_ids"])
            mask[row, : len(feature["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.clone(),
                "example_index": torch.tensor([feature["example_index"] for feature in features])}

    return collate
