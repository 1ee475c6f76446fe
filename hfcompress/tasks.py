"""What differs between task families: the model class, how a split is scored, which inputs time the model."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from .data import TaskData, batch_to_model_inputs
from .evaluation import model_device
from .metrics import load_metric
from .recipe import TaskOptions


class Task:
    type: ClassVar[str]
    model_class: ClassVar[type]
    pipeline_tag: ClassVar[str]
    selection_metric: ClassVar[str]
    greater_is_better: ClassVar[bool]
    throughput_unit: ClassVar[str]

    def __init__(self, options: TaskOptions):
        self.options = options

    def model_kwargs(self, data: TaskData) -> dict:
        """Extra `from_pretrained` arguments that shape the model for the task (e.g. the label set)."""
        return {}

    def is_better(self, new: float, best: float | None) -> bool:
        return best is None or (new > best if self.greater_is_better else new < best)

    @torch.no_grad()
    def evaluate(self, model, dataloader, gather=None) -> dict[str, float]:
        """Task metrics over a dataloader; `gather` collects tensors across processes (accelerate's
        gather_for_metrics) when the dataloader is sharded."""
        raise NotImplementedError

    def throughput_items(self, batch: dict[str, torch.Tensor]) -> int:
        """What one batch counts for throughput: samples for classification, tokens for language modelling."""
        raise NotImplementedError


class TextClassificationTask(Task):
    type = "text-classification"
    model_class = AutoModelForSequenceClassification
    pipeline_tag = "text-classification"
    selection_metric = "accuracy"
    greater_is_better = True
    throughput_unit = "samples/s"

    def model_kwargs(self, data: TaskData) -> dict:
        names = data.label_names
        return {
            "num_labels": len(names),
            "id2label": dict(enumerate(names)),
            "label2id": {name: index for index, name in enumerate(names)},
        }

    @torch.no_grad()
    def evaluate(self, model, dataloader, gather=None) -> dict[str, float]:
        model.eval()
        predictions, references = [], []
        for batch in _on_device(dataloader, model):
            logits = model(**batch_to_model_inputs(batch)).logits
            predicted, labels = (gather or _no_gather)((logits.argmax(-1), batch["labels"]))
            predictions.append(predicted.cpu())
            references.append(labels.cpu())
        predictions, references = torch.cat(predictions).tolist(), torch.cat(references).tolist()
        results = {"num_examples": len(references)}
        for name in self.options.metrics:
            results.update(load_metric(name).compute(predictions=predictions, references=references))
        return results

    def throughput_items(self, batch) -> int:
        return batch["input_ids"].shape[0]


class CausalLMTask(Task):
    type = "causal-lm"
    model_class = AutoModelForCausalLM
    pipeline_tag = "text-generation"
    selection_metric = "perplexity"
    greater_is_better = False
    throughput_unit = "tokens/s"

    @torch.no_grad()
    def evaluate(self, model, dataloader, gather=None) -> dict[str, float]:
        model.eval()
        nll, counts = [], []
        for batch in _on_device(dataloader, model):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            sequence_nll, sequence_tokens = sequence_negative_log_likelihood(logits, batch["labels"], batch["attention_mask"])
            sequence_nll, sequence_tokens = (gather or _no_gather)((sequence_nll, sequence_tokens))
            nll.append(sequence_nll.cpu())
            counts.append(sequence_tokens.cpu())
        nll, counts = torch.cat(nll).tolist(), torch.cat(counts).tolist()
        results = {"num_examples": len(counts)}
        for name in self.options.metrics:
            results.update(load_metric(name).compute(nll=nll, num_tokens=counts))
        return results

    def throughput_items(self, batch) -> int:
        return int(batch["attention_mask"].sum())


def _no_gather(tensors):
    return tensors


def _on_device(dataloader, model):
    device = model_device(model)
    for batch in dataloader:
        yield {key: value.to(device) for key, value in batch.items()}


def sequence_negative_log_likelihood(logits, labels, attention_mask):
    """Summed next-token NLL and the number of predicted tokens per sequence, over non-padded positions only."""
    shifted_logits = logits[:, :-1].float()
    targets = labels[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
    token_nll = F.cross_entropy(shifted_logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
    valid = targets != -100
    return (token_nll * valid).sum(dim=1).double(), valid.sum(dim=1)


TASKS = {task.type: task for task in (TextClassificationTask, CausalLMTask)}


def make_task(options: TaskOptions) -> Task:
    return TASKS[options.type](options)
