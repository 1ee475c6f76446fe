"""What differs between task families: the model class, how a split is scored, which inputs time the model."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from .data import TaskData, batch_to_model_inputs
from .evaluation import model_device
from .metrics import load_metric
from .recipe_schema import TaskOptions


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

    def evaluate(self, model, dataloader, gather=None) -> dict[str, float]:
        """Task metrics over a dataloader; `gather` collects tensors across processes (accelerate's
        gather_for_metrics) when the dataloader is sharded."""
        return self.score(self.predict(model, dataloader, gather))

    def predict(self, model, dataloader, gather=None, top_k: int | None = None,
                compare_with: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """The model's outputs on every example of the dataloader, in `example_index` order (see `fidelity`)."""
        raise NotImplementedError

    def score(self, outputs: dict[str, np.ndarray]) -> dict[str, float]:
        """The task metrics of `predict`'s outputs."""
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
    def predict(self, model, dataloader, gather=None, top_k=None, compare_with=None) -> dict[str, np.ndarray]:
        """`log_probs` [examples, classes] (float32) and `labels`."""
        model.eval()
        collected = []
        for batch in _on_device(dataloader, model):
            logits = model(**batch_to_model_inputs(batch)).logits
            outputs = (logits.float().log_softmax(-1), batch["labels"], batch["example_index"])
            collected.append([tensor.cpu() for tensor in (gather or _no_gather)(outputs)])
        log_probs, labels, order = (torch.cat(tensors) for tensors in zip(*collected))
        order = order.argsort()
        return {"log_probs": log_probs[order].numpy(), "labels": labels[order].numpy()}

    def score(self, outputs) -> dict[str, float]:
        predictions, references = outputs["log_probs"].argmax(-1).tolist(), outputs["labels"].tolist()
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
    def predict(self, model, dataloader, gather=None, top_k=None, compare_with=None) -> dict[str, np.ndarray]:
        """`nll` and `num_tokens` per sequence; with `top_k`, per predicted position the model's `top_k_log_probs`
        and `top_k_indices` and the `targets`; for each `compare_with` name (a reference's top-k token ids,
        [sequences, positions, k]), the model's log-probabilities at those ids under `at_<name>`."""
        model.eval()
        compare_with = compare_with or {}
        collected = []
        for batch in _on_device(dataloader, model):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            outputs = [*sequence_negative_log_likelihood(logits, batch["labels"], batch["attention_mask"]),
                       batch["example_index"]]
            if top_k:
                outputs += _token_outputs(logits, batch, top_k, compare_with)
            collected.append([tensor.cpu() for tensor in (gather or _no_gather)(tuple(outputs))])
        tensors = [torch.cat(parts) for parts in zip(*collected)]
        order = tensors[2].argsort()
        names = ["nll", "num_tokens", "example_index"]
        if top_k:
            names += ["top_k_log_probs", "top_k_indices", "targets", *(f"at_{name}" for name in compare_with)]
        results = {name: tensor[order].numpy() for name, tensor in zip(names, tensors)}
        del results["example_index"]
        return results

    def score(self, outputs) -> dict[str, float]:
        nll, counts = outputs["nll"].tolist(), outputs["num_tokens"].tolist()
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


def _token_outputs(logits, batch, top_k: int, compare_with: dict[str, np.ndarray]) -> list[torch.Tensor]:
    """Per predicted position: the top-k log-probabilities (float16) and token ids, the target token, and the
    log-probabilities at each reference's top-k ids. One sequence at a time: a full-vocabulary log-softmax of the
    whole batch would double the memory the logits already take."""
    rows = batch["example_index"].tolist()
    values, indices, at_references = [], [], {name: [] for name in compare_with}
    for row, sequence_logits in zip(rows, logits[:, :-1]):
        log_probs = sequence_logits.float().log_softmax(-1)
        top = log_probs.topk(top_k, dim=-1)
        values.append(top.values.half())
        indices.append(top.indices.int())
        for name, reference_ids in compare_with.items():
            ids = torch.as_tensor(reference_ids[row], device=log_probs.device).long()
            at_references[name].append(log_probs.gather(-1, ids))
    targets = batch["labels"][:, 1:].int()
    return [torch.stack(values), torch.stack(indices), targets, *(torch.stack(v) for v in at_references.values())]


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
