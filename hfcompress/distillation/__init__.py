"""Knowledge distillation: build a smaller student from a teacher and train it on the teacher's outputs.

    student, layer_map = student_from_layers(teacher, num_layers=6, strategy="every_other")   # DistilBERT recipe
    student, layer_map = student_from_config(teacher.config, {"num_hidden_layers": 4, "hidden_size": 256},
                                             AutoModelForSequenceClassification)            # randomly initialised
    check_same_vocabulary(teacher_tokenizer, student_tokenizer, teacher.config, student.config)
    teacher = teacher_for_student(teacher, teacher_tokenizer, student_tokenizer, student.config)  # pruned vocabulary

    loss_fn = DistillationLoss.from_configs({"weights": {"kl": 0.5, "ce": 0.5, "hidden_mse": 1.0}},
                                            student.config, teacher.config, layer_map)
    compute_loss = distillation_compute_loss(loss_fn, teacher=teacher)   # or teacher_cache=cached_teacher_logits(...)
    loss, parts = compute_loss(student, batch)                           # parts: {"kl": ..., "ce": ..., "loss": ...}

Losses are registered by name in `LOSSES` (kl, ce, hidden_mse, hidden_cosine, attention_kl).
"""

from .architectures import transformer_layers
from .layer_maps import layers_to_keep, uniform_layer_map
from .losses import LOSSES, LossInputs, register_loss, soft_target_kl, top_k_soft_target_kl
from .objective import DistillationLoss, DistillationLossOptions, distillation_compute_loss
from .student import (
    build_model,
    check_same_vocab_size,
    check_same_vocabulary,
    layer_subset_config,
    student_config,
    student_from_config,
    student_from_layers,
)
from .teacher_cache import (
    CachedTeacherOutputs,
    TeacherCache,
    cache_teacher_logits,
    cached_teacher_logits,
    teacher_fingerprint,
)
from .vocabulary_map import TeacherOnStudentVocabulary, student_to_teacher_ids, teacher_for_student

__all__ = [
    "LOSSES",
    "CachedTeacherOutputs",
    "DistillationLoss",
    "DistillationLossOptions",
    "LossInputs",
    "TeacherCache",
    "TeacherOnStudentVocabulary",
    "cache_teacher_logits",
    "cached_teacher_logits",
    "check_same_vocabulary",
    "distillation_compute_loss",
    "layers_to_keep",
    "register_loss",
    "soft_target_kl",
    "build_model",
    "check_same_vocab_size",
    "layer_subset_config",
    "student_config",
    "student_from_config",
    "student_from_layers",
    "student_to_teacher_ids",
    "teacher_fingerprint",
    "teacher_for_student",
    "top_k_soft_target_kl",
    "transformer_layers",
    "uniform_layer_map",
]
