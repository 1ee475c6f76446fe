"""The distillation objective: a weighted sum of registered losses, with its options and trainable projections."""

from __future__ import annotations

from collections.abc import Callable

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor, nn

from ..errors import HfCompressError
from .layer_maps import check_layer_map
from .losses import LOSSES, NEEDS_ATTENTIONS, NEEDS_HIDDEN_STATES, LossInputs
from .teacher_cache import TeacherCache, model_inputs


class DistillationLossOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    weights: dict[str, float] = Field(
        default_factory=lambda: {"kl": 0.5, "ce": 0.5}, description="loss name -> weight; a weight of 0 turns it off"
    )
    temperature: float = Field(2.0, gt=0)
    layer_map: dict[int, int] | None = Field(
        None, description="student layer -> teacher layer; default: how the student was built"
    )

    @field_validator("weights")
    @classmethod
    def _known_non_negative_weights(cls, weights: dict[str, float]) -> dict[str, float]:
        for name, weight in weights.items():
            if name not in LOSSES:
                raise ValueError(f"unknown loss {name!r} (known: {', '.join(sorted(LOSSES))})")
            if weight < 0:
                raise ValueError(f"the weight of {name!r} must be >= 0, not {weight}")
        if not any(weight > 0 for weight in weights.values()):
            raise ValueError("at least one loss needs a weight above 0")
        return weights


class DistillationLoss(nn.Module):
    """`forward(student_outputs, teacher_outputs, batch) -> (loss, parts)`, parts being floats for the progress bar.

    When the student is narrower than the teacher, the hidden-state losses compare through one learned linear
    projection per mapped student layer. Those live here, not in the student: train this module's parameters
    with the student, and save only the student.
    """

    def __init__(
        self,
        options: DistillationLossOptions | dict,
        layer_map: dict[int, int] | None = None,
        student_hidden_size: int | None = None,
        teacher_hidden_size: int | None = None,
    ):
        super().__init__()
        self.options = DistillationLossOptions.model_validate(options)
        self.weights = {name: weight for name, weight in self.options.weights.items() if weight > 0}
        self.temperature = self.options.temperature
        self.layer_map = dict(self.options.layer_map if self.options.layer_map is not None else layer_map or {})
        if (self.needs_hidden_states or self.needs_attentions) and not self.layer_map:
            losses = sorted(self.weights.keys() & (NEEDS_HIDDEN_STATES | NEEDS_ATTENTIONS))
            raise HfCompressError(f"{', '.join(losses)} needs a layer_map (student layer -> teacher layer)")
        self.projections = nn.ModuleDict()
        if self.needs_hidden_states and student_hidden_size != teacher_hidden_size:
            self.projections = nn.ModuleDict(
                {str(layer): nn.Linear(student_hidden_size, teacher_hidden_size) for layer in self.layer_map}
            )

    @classmethod
    def from_configs(
        cls,
        options: DistillationLossOptions | dict,
        student_config,
        teacher_config,
        layer_map: dict[int, int] | None = None,
    ) -> DistillationLoss:
        """Sized for these models; checks the layer map against their depths and head counts."""
        loss = cls(options, layer_map, student_config.hidden_size, teacher_config.hidden_size)
        check_layer_map(loss.layer_map, student_config.num_hidden_layers, teacher_config.num_hidden_layers)
        student_heads, teacher_heads = student_config.num_attention_heads, teacher_config.num_attention_heads
        if loss.needs_attentions and student_heads != teacher_heads:
            raise HfCompressError(
                "attention_kl needs the same number of attention heads in student and teacher "
                f"({student_heads} vs {teacher_heads})"
            )
        return loss

    @property
    def needs_hidden_states(self) -> bool:
        return bool(self.weights.keys() & NEEDS_HIDDEN_STATES)

    @property
    def needs_attentions(self) -> bool:
        return bool(self.weights.keys() & NEEDS_ATTENTIONS)

    @property
    def output_flags(self) -> dict[str, bool]:
        """Keyword arguments that make a model return what these losses read."""
        return {"output_hidden_states": self.needs_hidden_states, "output_attentions": self.needs_attentions}

    def prepare_models(self, *models) -> None:
        """transformers 5 returns attention probabilities only from the eager attention implementation."""
        if self.needs_attentions:
            for model in models:
                model.set_attn_implementation("eager")

    def project(self, student_layer: int, hidden_states: Tensor) -> Tensor:
        if not self.projections:
            return hidden_states
        projection = self.projections[str(student_layer)]
        return projection(hidden_states.to(projection.weight.dtype))

    def forward(self, student_outputs, teacher_outputs, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        inputs = LossInputs(student_outputs, teacher_outputs, batch, self.temperature, self.layer_map, self.project)
        total, parts = 0.0, {}
        for name, weight in self.weights.items():
            value = LOSSES[name](inputs)
            total = total + weight * value
            parts[name] = value.item()
        parts["loss"] = total.item()
        return total, parts


def distillation_compute_loss(
    distillation_loss: DistillationLoss, teacher=None, teacher_cache: TeacherCache | None = None
) -> Callable[[nn.Module, dict], tuple[Tensor, dict[str, float]]]:
    """The `compute_loss(model, batch)` a training loop calls: a student forward, the teacher's outputs (live, or
    looked up in the cache by `example_index`), and the distillation loss."""
    if (teacher is None) == (teacher_cache is None):
        raise ValueError("give exactly one of teacher and teacher_cache")
    if teacher_cache is not None and (distillation_loss.needs_hidden_states or distillation_loss.needs_attentions):
        raise HfCompressError(
            "hidden-state and attention losses need the live teacher: the teacher cache holds logits only"
        )
    if teacher is not None:
        teacher.eval()
    flags = distillation_loss.output_flags

    def compute_loss(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        inputs = model_inputs(batch)
        student_outputs = model(**inputs, **flags)
        if teacher_cache is not None:
            teacher_outputs = teacher_cache.lookup(batch["example_index"], batch["input_ids"].shape[1])
        else:
            with torch.no_grad():
                teacher_outputs = teacher(**inputs, **flags)
        return distillation_loss(student_outputs, teacher_outputs, batch)

    return compute_loss
