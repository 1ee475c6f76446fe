"""`distill`: train a smaller student to match a teacher (logit KD, hard labels, hidden states, attentions).

By default the current model is the teacher and the student keeps a subset of its layers (the DistilBERT recipe).
With `teacher:` naming an earlier model and no student recipe, the current model is the student: that is how a
pruned model is healed from the unpruned one.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from ..distillation import (
    DistillationLoss,
    DistillationLossOptions,
    cached_teacher_logits,
    check_same_vocab_size,
    check_same_vocabulary,
    distillation_compute_loss,
    layer_subset_config,
    layers_to_keep,
    student_config,
    student_from_config,
    student_from_layers,
    teacher_fingerprint,
    teacher_for_student,
    uniform_layer_map,
)
from ..distributed import DistributedOptions, local_bytes, shard, training_is_sharded
from ..errors import HfCompressError
from ..recipe_schema import ModelReference, StrictModel
from ..sources import load_config, load_tokenizer, resolve_model_reference
from ..training import TrainingOptions, train
from .base import Stage, StageContext, StageResult, register_stage
from .finetune import training_metrics

logger = logging.getLogger(__name__)


def teacher_cache_dir() -> Path:
    """Where teacher outputs are cached, keyed by a digest of the teacher's weights and the data: shared by runs."""
    return Path(os.environ.get("HFCOMPRESS_CACHE", Path.home() / ".cache" / "hfcompress")) / "teacher_outputs"


class StudentOptions(StrictModel):
    """How the student is made. Give one of: `layers`/`num_layers` (a subset of the teacher's blocks),
    `config_overrides` (a smaller config, random or `init_from` a checkpoint), or `pretrained` (a separate model).
    None of them: the current model is the student."""

    layers: list[int] | None = None
    num_layers: int | None = Field(None, ge=1)
    strategy: Literal["uniform", "every_other", "first", "last"] = "uniform"
    config_overrides: dict[str, Any] | None = None
    init_from: str | None = None
    pretrained: str | None = None

    @model_validator(mode="after")
    def _one_recipe(self):
        given = [name for name, on in (("layers/num_layers", self.layers is not None or self.num_layers is not None),
                                       ("config_overrides", self.config_overrides is not None),
                                       ("pretrained", self.pretrained is not None)) if on]
        if len(given) > 1:
            raise ValueError(f"give one way to make the student, not {' and '.join(given)}")
        if self.layers is not None and self.num_layers is not None:
            raise ValueError("give `layers` or `num_layers`, not both")
        if self.init_from is not None and self.config_overrides is None:
            raise ValueError("`init_from` goes with `config_overrides`")
        return self

    @property
    def is_current_model(self) -> bool:
        return self.layers is None and self.num_layers is None and self.config_overrides is None and self.pretrained is None


class DistillOptions(TrainingOptions):
    teacher: str | None = Field(None, description='None: the current model; "teacher", "previous", a stage id, or '
                                                  'a model outside the run (a Hub id, folder or pkg://, with a "/")')
    student: StudentOptions = Field(default_factory=StudentOptions)
    loss: DistillationLossOptions = Field(default_factory=DistillationLossOptions)
    cache_teacher_outputs: bool = Field(True, description="run the teacher once over the training set, not every step")
    cache_top_k: int | None = Field(64, ge=1, description="causal LM: keep the teacher's top-k logits per token")

    @model_validator(mode="after")
    def _teacher_differs_from_student(self):
        if self.student.is_current_model and self.teacher is None:
            raise ValueError("with no student recipe the current model is the student: name an earlier `teacher`")
        return self


@register_stage
class DistillStage(Stage):
    name = "distill"
    options_model = DistillOptions
    produces_model = True

    def run(self, ctx: StageContext) -> StageResult:
        options = self.options
        teacher_reference = self._teacher_reference(ctx)
        teacher = ctx.load_model(teacher_reference)
        teacher_tokenizer = ctx.tokenizer_for(teacher_reference)
        student, layer_map = self._student(ctx, teacher, teacher_tokenizer)
        loss = DistillationLoss.from_configs(options.loss, student.config, teacher.config, layer_map)
        loss.prepare_models(student, teacher)
        # A student with a pruned vocabulary reads other ids than its teacher: the teacher reads them mapped back.
        teacher = teacher_for_student(teacher, teacher_tokenizer, ctx.tokenizer, student.config)
        teacher.requires_grad_(False).eval().to(ctx.accelerator.device)  # never wrapped for gradients

        cached = options.cache_teacher_outputs and not (loss.needs_hidden_states or loss.needs_attentions)
        fingerprint = self._cache_fingerprint(ctx, teacher) if cached else None  # from the whole weights
        # Under FSDP the teacher is sharded like the student: each process holds 1/N of it, and all of them run
        # every teacher forward together (live, or once over the training set to fill the cache).
        distributed = ctx.recipe.distributed or DistributedOptions()
        teacher_sharded = training_is_sharded(distributed, ctx.accelerator) and distributed.shard_teacher
        if teacher_sharded:
            shard(teacher, ctx.accelerator, distributed)
        teacher_bytes = local_bytes(teacher.parameters())
        if cached:
            compute_loss = distillation_compute_loss(
                loss, teacher_cache=self._teacher_cache(ctx, teacher, fingerprint, teacher_sharded))
            del teacher
        else:
            compute_loss = distillation_compute_loss(loss, teacher=teacher)
        trainable_extras = [loss] if any(True for _ in loss.parameters()) else []
        student, state = train(ctx, student, options, compute_loss, extra_modules=trainable_extras)
        ctx.save_model(student)
        metrics = training_metrics(ctx, state)
        metrics["memory_per_process"]["teacher_parameter_bytes"] = 0 if cached else teacher_bytes
        metrics.update(teacher=self.options.teacher or ctx.model_label, layer_map=layer_map,
                       student_layers=student.config.num_hidden_layers,
                       student_parameters=sum(p.numel() for p in student.parameters()))
        return StageResult(metrics=metrics)

    def plan(self, shape, planner):
        """The student's shape, with the run's checks: layer choices against the teacher's depth, the stage the
        teacher comes from, the vocabulary, and the loss's layer map against both models."""
        teacher = planner.model(self.options.teacher, shape, ("teacher",))
        spec = self.options.student
        layer_map = None
        if spec.layers is not None or spec.num_layers is not None:
            key = ("student", "layers" if spec.layers is not None else "num_layers")
            with planner.checking(*key):
                kept = layers_to_keep(teacher.config.num_hidden_layers, spec.layers, spec.num_layers, spec.strategy)
            planner.require_full_precision(teacher)
            student = shape.changed(planner.build(layer_subset_config(teacher.config, kept), type(teacher.model)))
            layer_map = dict(enumerate(kept))
        elif spec.config_overrides is not None:
            with planner.checking("student", "config_overrides"):
                init_from = resolve_model_reference(spec.init_from, "init_from") if spec.init_from else None
                config, layer_map = student_config(teacher.config, spec.config_overrides, init_from)
                student = shape.changed(planner.build(config))
        elif spec.pretrained is not None:
            with planner.checking("student", "pretrained"):
                student = shape.changed(planner.build(load_config(spec.pretrained, "pretrained")))
        else:
            planner.require_full_precision(shape)
            student = shape
        if not student.vocabulary_pruned:  # a pruned vocabulary's teacher reads the student's ids through a map
            with planner.checking("student"):
                check_same_vocab_size(teacher.config, student.config)
        if layer_map is None:
            layer_map = uniform_layer_map(student.config.num_hidden_layers, teacher.config.num_hidden_layers)
        with planner.checking("loss"):
            DistillationLoss.from_configs(self.options.loss, student.config, teacher.config, layer_map)
        return student

    def _teacher_reference(self, ctx: StageContext) -> ModelReference:
        name = self.options.teacher
        if name == "previous":
            earlier = [ref for ref in ctx.models.values() if ref != ctx.model]
            return earlier[-1] if earlier else ctx.model
        if name is not None and "/" in name and name not in ctx.models:  # stage ids have no "/"
            return ModelReference(name_or_path=name)
        return ctx.model_reference(name, f"stages.{ctx.stage_id}.distill.teacher")

    def _student(self, ctx: StageContext, teacher, teacher_tokenizer):
        spec = self.options.student
        if not spec.is_current_model and spec.pretrained is None:
            _check_built_from_teacher(ctx, teacher_tokenizer)
        if spec.layers is not None or spec.num_layers is not None:
            return student_from_layers(teacher, spec.layers, spec.num_layers, spec.strategy)
        if spec.config_overrides is not None:
            init_from = resolve_model_reference(spec.init_from, f"stages.{ctx.stage_id}.distill.student.init_from") \
                if spec.init_from else None
            if init_from:
                check_same_vocabulary(ctx.tokenizer, load_tokenizer(init_from, f"stages.{ctx.stage_id}.distill.student"))
            return student_from_config(teacher.config, spec.config_overrides, ctx.task.model_class, init_from)
        reference = ModelReference(name_or_path=spec.pretrained) if spec.pretrained else ctx.model
        student = ctx.load_model(reference)
        student_tokenizer = load_tokenizer(reference, f"stages.{ctx.stage_id}.distill.student")
        check_same_vocabulary(ctx.tokenizer, student_tokenizer)
        # Evenly spaced: a pruned student's blocks keep their order but not their original indices.
        return student, uniform_layer_map(student.config.num_hidden_layers, teacher.config.num_hidden_layers)

    def _cache_top_k(self, ctx: StageContext) -> int | None:
        return self.options.cache_top_k if ctx.task.type == "causal-lm" else None

    def _cache_fingerprint(self, ctx: StageContext, teacher) -> str:
        return teacher_fingerprint(teacher, ctx.data["train"]._fingerprint, ctx.recipe.task.max_length,
                                   self._cache_top_k(ctx))

    def _teacher_cache(self, ctx: StageContext, teacher, fingerprint: str, sharded: bool):
        """Teacher logits over the training set, computed once and reused by later runs: by the main process first
        (the others then read its file), or, with a sharded teacher, by every process together (each holds a
        shard of every weight) and written by the main process."""
        path = teacher_cache_dir() / f"{fingerprint}.safetensors"
        loader = ctx.data.dataloader("train", self.options.per_device_eval_batch_size)
        arguments = (path, teacher, loader, self._cache_top_k(ctx), fingerprint)
        if sharded:
            cache = cached_teacher_logits(*arguments, save=ctx.is_main_process)
            ctx.wait_for_everyone()
        else:
            with ctx.main_process_first():
                cache = cached_teacher_logits(*arguments)
        logger.info("%s: teacher outputs cached in %s", ctx.stage_id, path)
        return cache


def _check_built_from_teacher(ctx: StageContext, teacher_tokenizer) -> None:
    """A student made from the teacher's layers or config has the teacher's vocabulary: the data must use it too."""
    teacher_size, data_size = len(teacher_tokenizer.get_vocab()), len(ctx.tokenizer.get_vocab())
    if teacher_tokenizer.get_vocab() != ctx.tokenizer.get_vocab():
        raise HfCompressError(
            f"stages.{ctx.stage_id}.distill.student: a student built from the teacher has the teacher's vocabulary "
            f"({teacher_size} tokens), but the current model's has {data_size} (pruned): build the student before "
            "pruning the vocabulary")
