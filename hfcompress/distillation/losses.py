"""Distillation losses, each registered under a name (as in TextBrewer) so a recipe can weight them.

Every registered loss takes one `LossInputs` and returns a scalar tensor. Logits of shape [batch, classes]
are sequence-level (classification); [batch, positions, vocabulary] are token-level (language modelling),
where only non-padded positions count (attention_mask == 1 and labels != -100).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import HfCompressError

IGNORE_INDEX = -100


@dataclass
class LossInputs:
    student: Any  # the student's model output: logits, and hidden_states / attentions when they were asked for
    teacher: Any  # the teacher's model output, or CachedTeacherOutputs (logits, or top-k values and indices)
    batch: dict[str, Tensor]
    temperature: float
    layer_map: dict[int, int]  # student block -> teacher block
    project: Callable[[int, Tensor], Tensor]  # (student block, its hidden states) -> hidden states of teacher width


LossFunction = Callable[[LossInputs], Tensor]
LOSSES: dict[str, LossFunction] = {}
NEEDS_HIDDEN_STATES = {"hidden_mse", "hidden_cosine"}
NEEDS_ATTENTIONS = {"attention_kl"}


def register_loss(name: str) -> Callable[[LossFunction], LossFunction]:
    def register(function: LossFunction) -> LossFunction:
        LOSSES[name] = function
        return function

    return register


# ------------------------------------------------------------------------------------------ registered losses


@register_loss("kl")
def kl_loss(inputs: LossInputs) -> Tensor:
    """Soft-target KL(teacher || student) at the temperature, times T²; over the teacher's top-k when cached so."""
    student_logits = inputs.student.logits
    mask = prediction_mask(inputs.batch, student_logits)
    teacher, temperature = inputs.teacher, inputs.temperature
    if getattr(teacher, "top_k_indices", None) is not None:
        return top_k_soft_target_kl(student_logits, teacher.top_k_values, teacher.top_k_indices, temperature, mask)
    return soft_target_kl(student_logits, teacher.logits, temperature, mask)


@register_loss("ce")
def ce_loss(inputs: LossInputs) -> Tensor:
    """Cross-entropy with the hard labels (next-token for language models)."""
    return hard_label_cross_entropy(inputs.student.logits, inputs.batch)


@register_loss("hidden_mse")
def hidden_mse_loss(inputs: LossInputs) -> Tensor:
    """Mean squared error between mapped blocks' hidden states, over non-padded tokens, averaged over blocks."""
    mask = inputs.batch.get("attention_mask")
    errors = [
        masked_mean((student - teacher).pow(2).mean(-1), mask) for student, teacher in mapped_hidden_states(inputs)
    ]
    return torch.stack(errors).mean()


@register_loss("hidden_cosine")
def hidden_cosine_loss(inputs: LossInputs) -> Tensor:
    """1 - cosine similarity between mapped blocks' hidden states, over non-padded tokens, averaged over blocks."""
    mask = inputs.batch.get("attention_mask")
    distances = [
        masked_mean(1 - F.cosine_similarity(student, teacher, dim=-1), mask)
        for student, teacher in mapped_hidden_states(inputs)
    ]
    return torch.stack(distances).mean()


@register_loss("attention_kl")
def attention_kl_loss(inputs: LossInputs) -> Tensor:
    """KL between mapped blocks' attention distributions (TinyBERT / MiniLM), averaged over blocks."""
    student_attentions = _required(inputs.student, "attentions", "student")
    teacher_attentions = _required(inputs.teacher, "attentions", "teacher")
    mask = inputs.batch.get("attention_mask")
    divergences = [
        attention_kl_divergence(student_attentions[s], teacher_attentions[t], mask) for s, t in inputs.layer_map.items()
    ]
    return torch.stack(divergences).mean()


# ------------------------------------------------------------------------------------------------- the maths


def soft_target_kl(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float, mask: Tensor | None = None
) -> Tensor:
    """KL(teacher || student) of the temperature-softened distributions over the last dimension, times T²
    (Hinton et al.: keeps gradient sizes comparable across temperatures); mean over (unmasked) positions."""
    student_log_probs = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_position = F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="none").sum(-1)
    return masked_mean(per_position, mask) * temperature**2


def top_k_soft_target_kl(
    student_logits: Tensor,
    teacher_values: Tensor,
    teacher_indices: Tensor,
    temperature: float,
    mask: Tensor | None = None,
) -> Tensor:
    """`soft_target_kl` restricted to the teacher's top-k tokens, both distributions renormalised over them.

    Zero when the student's logits equal the teacher's; equal to the full KL when k is the whole vocabulary.
    """
    student_top_k = student_logits.gather(-1, teacher_indices.long())
    return soft_target_kl(student_top_k, teacher_values, temperature, mask)


def hard_label_cross_entropy(logits: Tensor, batch: dict[str, Tensor]) -> Tensor:
    labels = batch["labels"]
    if logits.ndim == 2:
        return F.cross_entropy(logits.float(), labels)
    targets = labels[:, 1:]  # position t predicts token t + 1
    if "attention_mask" in batch:
        targets = targets.masked_fill(batch["attention_mask"][:, 1:] == 0, IGNORE_INDEX)
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


def attention_kl_divergence(student_attention: Tensor, teacher_attention: Tensor, mask: Tensor | None = None) -> Tensor:
    """KL(teacher || student) per query row of [batch, heads, queries, keys] attention probabilities;
    mean over heads and non-padded queries. Padded keys carry zero probability in both, so they add nothing."""
    if student_attention.shape != teacher_attention.shape:
        raise HfCompressError(
            f"attention_kl needs the same number of attention heads in mapped layers: student attention "
            f"{tuple(student_attention.shape)} vs teacher {tuple(teacher_attention.shape)}"
        )
    teacher, student = teacher_attention.float(), student_attention.float()
    per_query = (torch.xlogy(teacher, teacher) - teacher * student.clamp_min(1e-12).log()).sum(-1)
    query_mask = None if mask is None else mask[:, None, :].expand_as(per_query)
    return masked_mean(per_query, query_mask)


def mapped_hidden_states(inputs: LossInputs) -> list[tuple[Tensor, Tensor]]:
    """(student, teacher) hidden states of each mapped block pair, the student's projected to the teacher's width.

    `hidden_states[0]` is the embedding output, so block i's output is `hidden_states[i + 1]`.
    """
    student_states = _required(inputs.student, "hidden_states", "student")
    teacher_states = _required(inputs.teacher, "hidden_states", "teacher")
    return [
        (inputs.project(s, student_states[s + 1]).float(), teacher_states[t + 1].float())
        for s, t in inputs.layer_map.items()
    ]


def prediction_mask(batch: dict[str, Tensor], logits: Tensor) -> Tensor | None:
    """For token-level logits, the positions that count: not padding and not labelled -100. None otherwise."""
    if logits.ndim == 2:
        return None
    mask = torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
    if "attention_mask" in batch:
        mask &= batch["attention_mask"].bool()
    labels = batch.get("labels")
    if labels is not None and labels.shape == mask.shape:
        mask &= labels != IGNORE_INDEX
    return mask


def masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1)


def _required(outputs, name: str, model: str):
    values = getattr(outputs, name, None)
    if not values:  # None, or the empty tuple transformers returns for attentions under sdpa
        hint = ' and attn_implementation="eager"' if name == "attentions" else ""
        raise HfCompressError(f"the {model} outputs have no {name}: run it with output_{name}=True{hint}")
    return values
