"""A teacher that reads a vocabulary-pruned student's token ids: how a pruned student is healed by its teacher.

The student's vocabulary is a subset of the teacher's (same token strings, fewer of them, renumbered). The teacher
reads the student's pieces mapped back to its own ids, so both models see the same pieces at the same positions
(token-level and hidden-state losses line up), and its token-level logits are cut to the student's vocabulary.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import HfCompressError
from .student import check_same_vocabulary


def student_to_teacher_ids(teacher_tokenizer, student_tokenizer) -> Tensor | None:
    """For every student id, the teacher's id of the same token; None when the vocabularies are the same."""
    teacher_vocab, student_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if teacher_vocab == student_vocab:
        return None
    missing = sorted(student_vocab.keys() - teacher_vocab.keys())
    if missing:
        raise HfCompressError(
            f"the student's vocabulary ({len(student_vocab)} tokens) is not part of the teacher's "
            f"({len(teacher_vocab)} tokens; e.g. {missing[0]!r} is not a teacher token): distillation needs a shared "
            "vocabulary, or a student vocabulary pruned from the teacher's")
    mapping = torch.empty(len(student_vocab), dtype=torch.long)
    for token, student_id in student_vocab.items():
        mapping[student_id] = teacher_vocab[token]
    return mapping


class TeacherOnStudentVocabulary(nn.Module):
    """Wraps a teacher: student input ids in, teacher outputs out, token-level logits over the student's vocabulary."""

    def __init__(self, teacher: nn.Module, student_to_teacher: Tensor):
        super().__init__()
        self.teacher = teacher
        self.config = teacher.config
        self.register_buffer("student_to_teacher", student_to_teacher)  # part of the teacher cache's fingerprint

    def forward(self, input_ids: Tensor, **kwargs):
        outputs = self.teacher(input_ids=self.student_to_teacher[input_ids], **kwargs)
        if outputs.logits.ndim == 3:  # language modelling: a distribution over the vocabulary at every position
            outputs.logits = outputs.logits[..., self.student_to_teacher]
        return outputs


def teacher_for_student(teacher: nn.Module, teacher_tokenizer, student_tokenizer, student_config) -> nn.Module:
    """The teacher itself when both share a vocabulary; wrapped to read the student's token ids when the student's
    vocabulary was pruned from the teacher's; an error otherwise."""
    mapping = student_to_teacher_ids(teacher_tokenizer, student_tokenizer)
    if mapping is None:
        check_same_vocabulary(teacher_tokenizer, student_tokenizer, teacher.config, student_config)
        return teacher
    if student_config.vocab_size != len(mapping):
        raise HfCompressError(f"the student's vocab_size ({student_config.vocab_size}) differs from its tokenizer's "
                              f"({len(mapping)} tokens)")
    return TeacherOnStudentVocabulary(teacher, mapping)
