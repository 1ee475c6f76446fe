"""The plan: every stage of a recipe walked against the model's shape before anything is trained or written.

Only what is cheap is loaded: the teacher's config (no weights). The model is built on the meta device (structure,
no memory) and each stage's `plan` method changes it the way its `run` will: a distilled student keeps a subset of
the blocks, pruning slices heads, neurons and blocks with the pruning package's own functions, quantization
estimates each variant's size. An option that cannot work with the shape it meets is a one-line recipe error
(`file:line: key.path: problem`); parameter counts are counted on the shaped model, so they are the counts the run
records. Where the run's choice depends on weights or data (which heads importance removes, which quantized
variant is carried forward), the plan says so.
"""

from __future__ import annotations

import copy
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import NoReturn

from accelerate import init_empty_weights

from .distillation import build_model
from .errors import HfCompressError, first_line
from .evaluation import count_parameters
from .modeling_hfcompress import apply_pruning_structure
from .pruning.adapters import LayerShape, is_supported
from .pruning.structure import layer_shapes, structure_of
from .recipe_schema import Recipe, format_key_path
from .sources import load_config, load_tokenizer
from .stages import get_stage_class
from .stages.prune import training_token_counts
from .tasks import make_task

FP32_BYTES = 4


@dataclass
class ModelShape:
    """The model as it will be after a stage: its structure on the meta device, and whether it is quantized."""

    model: object  # a transformers model on the meta device
    quantization: str | None = None  # the quantized variant that goes on (or which ones it may be)
    variant_sizes: dict[str, int | None] = field(default_factory=dict)  # bytes per variant of the quantize stage
    exact: bool = True  # False where the count depends on choices only the run makes (e.g. uneven blocks dropped)
    per_layer_known: bool = True  # False where measured importance decides which blocks lose heads or neurons
    vocabulary_pruned: bool = False  # its vocabulary is a subset of its teacher's (which reads it through a map)

    @property
    def config(self):
        return self.model.config

    @property
    def num_parameters(self) -> int:
        return count_parameters(self.model)

    @property
    def fp32_bytes(self) -> int:
        return FP32_BYTES * self.num_parameters

    @property
    def layers(self) -> list[LayerShape] | None:
        """Heads, key/value heads and FFN width per block (None for architectures pruning does not know)."""
        return layer_shapes(self.model) if is_supported(self.model) else None

    def changed(self, model=None, **changes) -> ModelShape:
        """A new shape; earlier stages keep theirs (a later stage may name them as its teacher)."""
        return replace(self, model=model if model is not None else self.model, **changes)

    def copy_model(self):
        return copy.deepcopy(self.model)

    def describe(self) -> str:
        config = self.config
        parts = [f"{config.num_hidden_layers} layers"]
        shapes = self.layers
        if shapes:
            show = _per_layer if self.per_layer_known else _in_all
            parts.append(f"heads {show([s.heads for s in shapes])}")
            if any(s.kv_heads != s.heads for s in shapes):
                parts.append(f"KV heads {show([s.kv_heads for s in shapes])}")
            parts.append(f"FFN {show([s.ffn_size for s in shapes])}")
        parts += [f"hidden {config.hidden_size}", f"vocab {config.vocab_size}"]
        if self.quantization:
            parts.append(f"quantized: {self.quantization}")
        return ", ".join(parts)


@dataclass
class PlannedStage:
    stage_id: str
    shape: ModelShape


class Planner:
    """What a stage's `plan` method may use: the recipe, earlier models' shapes, and errors that name the key."""

    def __init__(self, recipe: Recipe, label_names: list[str] | None = None, tokenizer=None,
                 token_counts: Counter | None = None, count_vocabulary: bool = True):
        self.recipe = recipe
        self.task = make_task(recipe.task)
        self.label_names = label_names if label_names is not None else recipe.task.label_names
        self.tokenizer = tokenizer
        self._token_counts = token_counts
        self.count_vocabulary = count_vocabulary
        self.models: dict[str, ModelShape] = {}  # "teacher" and every model-producing stage so far
        self.index: int | None = None
        self.stage_name: str | None = None

    def token_counts(self) -> Counter | None:
        """The training split's token counts, with which a vocabulary step keeps exactly the tokens the run will
        (read once, on first use); None where they cannot be had (then the count is an upper bound)."""
        if self._token_counts is None and self.count_vocabulary and self.task.type == "text-classification":
            try:
                self.tokenizer = self.tokenizer or load_tokenizer(self.recipe.teacher)
                self._token_counts = training_token_counts(self.recipe, self.tokenizer)
            except HfCompressError:
                self.count_vocabulary = False
        return self._token_counts

    @property
    def stage_id(self) -> str:
        return self.recipe.stage_ids()[self.index]

    def stage_key(self, key: tuple) -> tuple:
        return ("stages", self.index, self.stage_name, *key)

    def fail(self, key: tuple, message: str) -> NoReturn:
        """Reject the current stage's option at `key` (a path inside the stage's options)."""
        raise self.recipe.problem(self.stage_key(key), message)

    @contextmanager
    def checking(self, *key):
        """Turn an HfCompressError raised by the shared checks (the run's own) into a recipe error at `key`."""
        try:
            yield
        except HfCompressError as error:
            message = first_line(error)
            self.fail(key, message.removeprefix(f"{key[-1]}: ") if key else message)

    def build(self, config, model_class=None, structure: dict | None = None):
        """A model with this config on the meta device: its structure without memory for weights; a pruned
        checkpoint's blocks get the shapes its structure records (by default the one in the config)."""
        with init_empty_weights():
            model = build_model(model_class or self.task.model_class, config)
            structure = structure or structure_of(config)
            if structure:
                apply_pruning_structure(model, structure)
        model.tie_weights()  # built on the meta device, tied embeddings come out untied
        return model

    def model(self, name: str | None, current: ModelShape, key: tuple) -> ModelShape:
        """An earlier model by the name a stage option gives: None (the current one), "teacher", "previous" (the
        one before the current one) or the id of an earlier model-producing stage."""
        if name is None:
            return current
        if name == "previous":
            earlier = [shape for shape in self.models.values() if shape is not current]
            return earlier[-1] if earlier else current
        if name in self.models:
            return self.models[name]
        if "/" in name:  # a model outside the run (a Hub id, folder or pkg://): stage ids have no "/"
            return self._outside_model(name, key)
        ids = self.recipe.stage_ids()
        if name in ids[self.index:]:
            self.fail(key, f"{name!r} runs after this stage ({self.stage_id}): name an earlier stage")
        if name in ids:
            self.fail(key, f"stage {name!r} produces no model (models before this stage: {', '.join(self.models)})")
        self.fail(key, f"no model named {name!r} (models before this stage: {', '.join(self.models)}, previous)")

    def _outside_model(self, name: str, key: tuple) -> ModelShape:
        try:
            config = load_config(name, format_key_path(self.stage_key(key)))
            return ModelShape(self.build(config))
        except HfCompressError as error:
            self.fail(key, first_line(error).split(": ", 1)[-1])

    def require_full_precision(self, shape: ModelShape) -> None:
        if shape.quantization:
            self.fail((), f"needs a full-precision model, but the current one is quantized ({shape.quantization}):"
                          " put this stage before the quantize stage")

    # ------------------------------------------------------------------------------------------- the teacher

    def teacher_shape(self) -> ModelShape:
        reference = self.recipe.teacher
        key = ("teacher", "name_or_path") if reference.gguf_file or reference.revision else ("teacher",)
        try:
            config = load_config(reference, "teacher", **self._label_kwargs())
            model = self.build(config)
        except HfCompressError as error:
            raise self.recipe.problem(key, first_line(error).removeprefix("teacher: ")) from None
        vocabulary = len(self.tokenizer) if self.tokenizer is not None else 0
        if vocabulary > config.vocab_size:
            raise self.recipe.problem(key, f"the tokenizer has {vocabulary} tokens, the model's vocab_size is only "
                                           f"{config.vocab_size}")
        exact = self.task.type != "text-classification" or self.label_names is not None
        return ModelShape(model, exact=exact)

    def _label_kwargs(self) -> dict:
        if self.task.type != "text-classification" or self.label_names is None:
            return {}  # without label names the data decides the label set (the plan then counts the config's)
        names = list(self.label_names)
        return {"num_labels": len(names), "id2label": dict(enumerate(names)),
                "label2id": {name: index for index, name in enumerate(names)}}


def plan_recipe(recipe: Recipe, label_names: list[str] | None = None, tokenizer=None,
                token_counts: Counter | None = None, count_vocabulary: bool = True) -> list[PlannedStage]:
    """The model's shape after each stage, or a RecipeError naming the first option that cannot work.

    `label_names` and `tokenizer` are given when the data is already loaded (the run); otherwise the label set is
    the recipe's `label_names`, and the teacher's config where the recipe gives none. A vocabulary step reads the
    training split's token counts (`token_counts` when given; else read once, unless `count_vocabulary` is False)
    and keeps exactly the tokens the run would.
    """
    planner = Planner(recipe, label_names, tokenizer, token_counts, count_vocabulary)
    shape = planner.teacher_shape()
    planner.models["teacher"] = shape
    planned = [PlannedStage("teacher", shape)]
    for index, (stage_id, entry) in enumerate(zip(recipe.stage_ids(), recipe.stages)):
        planner.index, planner.stage_name = index, entry.name
        stage_class = get_stage_class(entry.name)
        shape = stage_class(entry.options).plan(shape, planner)
        if stage_class.produces_model:
            shape = shape.changed()  # a model of its own even when its shape is the same (e.g. finetune)
            planner.models[stage_id] = shape
        planned.append(PlannedStage(stage_id, shape))
    return planned


def format_plan(planned: list[PlannedStage]) -> str:
    """One line per stage: parameters, fp32 size, quantized sizes where a stage quantizes, and the shape."""
    width = max(len(step.stage_id) for step in planned)
    lines = ["plan: parameters and size after each stage (fp32 = 4 bytes per parameter; quantized sizes are "
             "estimates; ~ = depends on the data; 'in all': importance picks the layers)"]
    previous = None
    for step in planned:
        shape = step.shape
        approximate = "" if shape.exact else "~"
        line = (f"  {step.stage_id:<{width}}  {approximate}{shape.num_parameters / 1e6:8.2f} M params  "
                f"fp32 {shape.fp32_bytes / 1e6:7.1f} MB")
        if shape.variant_sizes and shape.quantization != getattr(previous, "quantization", None):
            sizes = ", ".join(f"{name} {_megabytes(size)}" for name, size in shape.variant_sizes.items())
            line += f"  quantized: {sizes}"
        same = previous is not None and shape.describe() == previous.describe()
        lines.append(line + ("  | unchanged" if same else f"  | {shape.describe()}"))
        previous = shape
    return "\n".join(lines)


def _per_layer(values: list[int]) -> str:
    return str(values[0]) if len(set(values)) == 1 else "/".join(str(value) for value in values)


def _in_all(values: list[int]) -> str:
    return str(values[0]) if len(set(values)) == 1 else f"{sum(values)} in all"


def _megabytes(size: int | None) -> str:
    return "? MB" if size is None else f"~{size / 1e6:.1f} MB"
