"""What a stage is: a name, a typed options model, and `run(ctx)` that reads the current model and writes its own."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from pydantic import BaseModel, ConfigDict

from ..data import batch_to_model_inputs, load_task_data
from ..distributed import full_state_dict
from ..errors import HfCompressError, first_line
from ..modeling import load_model, save_checkpoint
from ..recipe_schema import ModelReference, Recipe
from ..run_dir import Row

STAGES: dict[str, type[Stage]] = {}


def register_stage(stage_class: type[Stage]) -> type[Stage]:
    STAGES[stage_class.name] = stage_class
    return stage_class


def get_stage_class(name: str) -> type[Stage] | None:
    return STAGES.get(name)


def stage_names() -> list[str]:
    return sorted(STAGES)


class StageOptions(BaseModel):
    """Base of every stage's options: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class StageResult:
    metrics: dict[str, Any] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)  # evaluation rows for results.json
    model_subdir: str | None = None  # where in the stage folder the model is, when not at its top (quantize)


@dataclass
class StageContext:
    """Everything a stage may use. The stage writes only into `out_dir` (renamed into place when it finishes)."""

    recipe: Recipe
    stage_id: str
    accelerator: Any
    task: Any
    run_dir: Path
    out_dir: Path
    model: ModelReference  # the current model: the teacher, or the last model-producing stage's folder
    models: dict[str, ModelReference]  # "teacher" and every earlier model-producing stage id
    load_data: Callable[[ModelReference], Any]  # the task data, tokenized by that model's tokenizer
    load_tokenizer: Callable[[ModelReference], Any]
    rows: list[Row] = field(default_factory=list)  # every model evaluated before this stage
    all_processes: bool = True  # False in a main-process-only stage: no barrier or collective may be reached
    training_hooks: list = field(default_factory=list)  # `hfcompress.training.TrainingHook`s for every training stage

    @cached_property
    def data(self):
        """The task data as the current model reads it (a pruned vocabulary has its own token ids)."""
        return self.load_data(self.model)

    @property
    def tokenizer(self):
        return self.data.tokenizer

    def tokenizer_for(self, reference: ModelReference):
        return self.load_tokenizer(reference)

    def data_with_tokenizer(self, tokenizer):
        """The task data (same splits) tokenized by another tokenizer, e.g. one a stage just rewrote."""
        return load_task_data(self.recipe.task, tokenizer, self.recipe.seed)

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def model_label(self) -> str:
        """How rows name the current model: "teacher" or the id of the stage that produced it."""
        return next((name for name, ref in reversed(self.models.items()) if ref == self.model), "teacher")

    def model_reference(self, name: str | None, key: str) -> ModelReference:
        """An earlier model by name ("teacher" or a stage id), or the current model when `name` is None."""
        if name is None:
            return self.model
        if name not in self.models:
            raise HfCompressError(f"{key}: no model named {name!r} before this stage (have: {', '.join(self.models)})")
        return self.models[name]

    def load_model(self, reference: ModelReference | None = None, **kwargs):
        """Load a model for the task; the teacher is shaped for it (label set), later checkpoints already are."""
        reference = reference or self.model
        if reference == self.models["teacher"]:
            return load_model(reference, self.task.model_class, "teacher", **self.task.model_kwargs(self.data), **kwargs)
        return load_model(reference, self.task.model_class, f"stages.{self.stage_id}", **kwargs)

    def calibration_batches(self, num_samples: int, batch_size: int) -> list[dict]:
        """A few shuffled training batches (model inputs + labels) for importance scores and calibration."""
        loader = self.data.dataloader("train", batch_size, shuffle=True, seed=self.recipe.seed)
        batches = itertools.islice(loader, max(1, -(-num_samples // batch_size)))
        return [batch_to_model_inputs(batch) for batch in batches]

    def save_model(self, model) -> None:
        """Save the model whole, once: every process gathers its shards (when sharded), the main process writes."""
        weights = full_state_dict(self.accelerator, model) if self.all_processes else None
        if self.is_main_process:
            save_checkpoint(model, self.tokenizer, self.out_dir, self.accelerator, state_dict=weights)
        self.wait_for_everyone()

    def wait_for_everyone(self) -> None:
        """A barrier for the processes running this stage (none in a main-process-only stage)."""
        if self.all_processes:
            self.accelerator.wait_for_everyone()

    def main_process_first(self):
        """accelerate's `main_process_first`, or nothing in a main-process-only stage (no one to go first of)."""
        return self.accelerator.main_process_first() if self.all_processes else contextlib.nullcontext()


class Stage:
    name: ClassVar[str]
    options_model: ClassVar[type[StageOptions]] = StageOptions
    produces_model: ClassVar[bool] = False
    main_process_only: ClassVar[bool] = False  # evaluation, cards, pushes: the other processes wait

    def __init__(self, options: StageOptions):
        self.options = options

    def run(self, ctx: StageContext) -> StageResult:
        raise NotImplementedError

    def plan(self, shape, planner):
        """The model's shape after this stage (`hfcompress.plan.ModelShape`), checked before anything runs.

        Raise through `planner.fail(key, message)` (or `with planner.checking(key):` around the run's own checks)
        when an option cannot work with the shape. Stages that do not change the model keep this default.
        """
        return shape


def check_repo_id(planner, repo_id: str | None) -> None:
    """The Hub's own rules for a repo id (huggingface_hub's validator), checked before anything runs."""
    if repo_id is None:
        return
    if repo_id.count("/") != 1:
        planner.fail(("repo_id",), f"{repo_id!r} is not NAMESPACE/NAME (a user or organisation, then the model name)")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        planner.fail(("repo_id",), first_line(error))
