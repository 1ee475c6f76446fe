"""The recipe's typed models: every key typed, unknown keys rejected (`hfcompress.recipe` reads a YAML file into
them). A problem found after parsing (by the plan, say) is reported by `Recipe.problem` as one line naming the
file, the line, the YAML key path and what is wrong."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SerializeAsAny, field_validator
from pydantic import model_validator

from .distributed import DistributedOptions
from .errors import HfCompressError


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelReference(StrictModel):
    """A model: a Hub id, a local folder or `pkg://package/folder`; optionally a GGUF file inside it."""

    name_or_path: str
    revision: str | None = None
    gguf_file: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value):
        return {"name_or_path": value} if isinstance(value, str) else value


class DatasetSource(StrictModel):
    """Anything `datasets.load_dataset` accepts: a Hub dataset (`path` + `name`) or a builder over local files."""

    path: str
    name: str | None = None
    data_files: str | list[str] | dict[str, str | list[str]] | None = None
    revision: str | None = None
    load_options: dict[str, Any] = Field(default_factory=dict, description="more `load_dataset` keyword arguments, "
                                                                           "e.g. {sep: \"\\t\"} for tab-separated files")

    def describe(self) -> str:
        if self.data_files is None:
            return self.path if self.name is None else f"{self.path}/{self.name}"
        return f"{self.path} files {self.data_files}"


class ExtraEvaluationSet(DatasetSource):
    """A further test set from another source of the same task, scored on its own."""

    split: str = "train"
    label: str | None = Field(None, description="how reports name it; default: the source")
    text_column: str | None = Field(None, description="default: the task's")
    label_column: str | None = Field(None, description="default: the task's")
    label_map: dict[str, str] = Field(default_factory=dict, description="this source's labels -> the task's label "
                                                                        "names; rows with other labels are dropped")
    max_samples: int | None = Field(None, ge=1, description="a seeded subset of this many rows")

    @property
    def display_name(self) -> str:
        return self.label or self.describe()


class SplitOptions(StrictModel):
    """Which source splits to use; missing validation/test splits are carved from train, deterministically."""

    train: str = "train"
    validation: str | None = None
    test: str | None = None
    validation_size: float = Field(0.1, gt=0, lt=1)
    test_size: float = Field(0.1, gt=0, lt=1)
    group_by: str | None = None
    keep_identical: list[str] = Field(default_factory=list)


TaskType = Literal["text-classification", "causal-lm"]
DEFAULT_METRICS = {"text-classification": ["accuracy", "f1"], "causal-lm": ["perplexity"]}


class TaskOptions(StrictModel):
    type: TaskType
    dataset: DatasetSource
    dataset_id: str | None = None
    language: str | None = None
    text_column: str = "text"
    label_column: str | None = "label"
    label_names: list[str] | None = Field(None, min_length=2, description="rows with other labels are dropped")
    drop_incomplete_rows: bool = Field(True, description="drop (and count) rows with an empty text or label; "
                                                         "false: refuse the data")
    splits: SplitOptions = Field(default_factory=SplitOptions)
    max_length: int = Field(128, ge=8)
    max_train_samples: int | None = Field(None, ge=1)
    max_eval_samples: int | None = Field(None, ge=1)
    metrics: list[str] | None = None

    @model_validator(mode="after")
    def _default_metrics(self):
        if self.metrics is None:
            self.metrics = list(DEFAULT_METRICS[self.type])
        return self


class StageEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    name: str
    options: SerializeAsAny[BaseModel]

    def as_yaml_item(self) -> dict[str, Any]:
        return {self.name: self.options.model_dump(mode="json")}


def _default_search_formats() -> list:
    return [{"backend": "onnx", "quantization": "int8-dynamic", "optimize": False},
            {"backend": "bitsandbytes", "bits": 4, "quant_type": "nf4", "quantize_embeddings": True}]


class SearchSpace(StrictModel):
    """The candidates `hfcompress search` may try: every combination of these values."""

    num_layers: list[int] = Field([2, 3, 4], min_length=1, description="student depth: blocks kept from the teacher")
    heads_sparsity: list[float] = Field([0.0, 0.33, 0.5], min_length=1, description="share of heads pruned")
    ffn_sparsity: list[float] = Field([0.0, 0.25, 0.5], min_length=1, description="share of FFN neurons pruned")
    vocabulary: list[int | None] = Field([None, 1, 2], min_length=1, description="min_frequency of a vocabulary "
                                                                                 "step (null: the whole vocabulary)")
    hidden_size: list[int | None] = Field([None], min_length=1, description="hidden size the prune step keeps "
                                                                           "(null: the student's own)")
    quantization: list[dict[str, Any]] = Field(default_factory=_default_search_formats, min_length=1,
                                               description="quantize variants, one per candidate")

    @field_validator("num_layers")
    @classmethod
    def _positive_depths(cls, values):
        if any(value < 1 for value in values):
            raise ValueError("every depth must be at least 1")
        return values

    @field_validator("hidden_size")
    @classmethod
    def _positive_widths(cls, values):
        if any(value is not None and value < 1 for value in values):
            raise ValueError("every hidden size must be at least 1")
        return values

    @field_validator("heads_sparsity", "ffn_sparsity")
    @classmethod
    def _sparsities(cls, values):
        if any(not 0 <= value < 1 for value in values):
            raise ValueError("sparsities are shares in [0, 1)")
        return values


class SearchOptions(StrictModel):
    """`search:` (or `hfcompress search RECIPE --max-size-mb ...`): constraints, the space, and the schedule."""

    max_size_mb: float | None = Field(None, gt=0, description="size on disk of the final artefact")
    min_quality: float | None = Field(None, gt=0, description="share of the teacher's quality kept (0.99 = 99%), "
                                                              "on the validation split")
    max_latency_ms: float | None = Field(None, gt=0, description="batch-1 latency, timed paired on this machine")
    min_speedup: float | None = Field(None, gt=0, description="times faster than the teacher at batch 1, timed in "
                                                              "the same pass")
    budget_minutes: float = Field(45.0, gt=0, description="no new candidate run starts after this")
    space: SearchSpace = Field(default_factory=SearchSpace)
    max_candidates: int = Field(9, ge=1, description="trained at the first rung: the largest that fit the size, "
                                                     "taken in turn from each student depth and format")
    eta: int = Field(3, ge=2, description="successive halving: each rung keeps the best 1/eta")
    num_train_epochs: float = Field(1.0, gt=0, description="the student's distillation at the last rung")
    recovery_steps: int = Field(120, ge=1, description="distillation after pruning, at the last rung")
    learning_rate: float = Field(1e-4, gt=0)
    recovery_learning_rate: float = Field(5e-5, gt=0)
    seeds: list[int] = Field([42, 43, 44], min_length=1, description="training seeds of the chosen candidate; its "
                                                                     "test quality is their mean")


class Recipe(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    seed: int = 42
    task: TaskOptions
    teacher: ModelReference
    output_dir: str | None = None
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    distributed: DistributedOptions | None = None  # several processes: ddp (default), fsdp or deepspeed
    stages: list[StageEntry] = Field(min_length=1)
    search: SearchOptions | None = None  # what `hfcompress search` looks for (the stages give its teacher)
    # Where the recipe came from, so that checks made after parsing (the plan) can name the file and line too.
    _source: str = PrivateAttr("<recipe>")
    _yaml_root: Any = PrivateAttr(None)

    @field_validator("distributed")
    @classmethod
    def _sharding_precision(cls, distributed, info):
        if distributed and distributed.strategy == "fsdp" and info.data.get("mixed_precision") == "fp16":
            raise ValueError("strategy fsdp trains in bf16 or fp32: fp16's loss scaling is not applied to sharded "
                             "gradients here (use mixed_precision: bf16 or no)")
        return distributed

    def problem(self, loc: tuple, message: str) -> RecipeError:
        """A one-line `file:line: key.path: problem` error about the value at `loc` (a key path as a tuple)."""
        return RecipeError([format_problem(self._source, self._yaml_root, loc, message)])

    @property
    def resolved_output_dir(self) -> Path:
        return Path(self.output_dir or f"runs/{self.name}")

    def stage_ids(self) -> list[str]:
        return [f"{index + 1:02d}-{entry.name}" for index, entry in enumerate(self.stages)]

    def to_dict(self) -> dict[str, Any]:
        data = self.model_dump(mode="json", exclude={"stages"}, exclude_none=True)
        data["stages"] = [entry.as_yaml_item() for entry in self.stages]
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


class RecipeError(HfCompressError):
    """One or more recipe problems; each line is `file:line: key.path: problem`."""

    def __init__(self, lines: list[str]):
        self.lines = lines
        super().__init__("\n".join(lines))


def format_problem(source: str, yaml_root, loc: tuple, message: str) -> str:
    loc = tuple(part for part in loc if not (isinstance(part, str) and part.startswith("function-")))
    line = _line_of(yaml_root, loc)
    where = f"{source}:{line}" if line else source
    return f"{where}: {format_key_path(loc) or '<top level>'}: {message}"


def format_key_path(loc: tuple) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _line_of(node, loc: tuple) -> int | None:
    """The 1-based line of the deepest YAML node that `loc` reaches."""
    line = None
    for part in loc:
        if node is None:
            break
        line = node.start_mark.line + 1
        node = _child(node, part)
    if node is not None:
        line = node.start_mark.line + 1
    return line


def _child(node, part):
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if key_node.value == str(part):
                return value_node
    if isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
        return node.value[part]
    return None
