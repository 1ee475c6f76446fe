"""The run folder: where every file of a run lives, and the typed records of its results.json.

    runs/quickstart/
      recipe.yaml            the resolved recipe
      results.json           RunResults: every stage's record and every evaluated model's row
      run.log
      00-teacher/            a GGUF teacher, converted once into an ordinary checkpoint
      01-finetune/           a stage's folder: its checkpoint, metrics.json, stage.json
      .02-distill.partial/   a stage still running (renamed into place when it finishes)
      search.json            what `hfcompress search` tried (in a search folder and in the chosen run)

    run = RunDir("runs/quickstart")
    results = run.load_results()            # RunResults; results.rows[0].metrics["accuracy"]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import HfCompressError, first_line
from .fileio import read_json, write_json

STAGE_RECORD_FILE = "stage.json"
METRICS_FILE = "metrics.json"
FINGERPRINT_FILE = "fingerprint"  # in a partial folder: which options it was started with


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Evaluation(_Record):
    """A model scored on one split: its metrics, where its outputs were saved, and how they compare with earlier
    models' ("teacher", "previous")."""

    metrics: dict[str, Any]
    predictions_file: str | None = None
    fidelity: dict[str, dict[str, Any]] = Field(default_factory=dict)


class AttributionComparison(_Record):
    """A model's word attributions against an earlier row's, averaged over the explained examples."""

    label: str
    top_k_overlap: float | None
    spearman: float | None
    examples: int


class ShownExample(_Record):
    position: int  # in the explained sample
    text: str


class Explanations(_Record):
    """Word attributions of the teacher's predicted class on a fixed sample of the split (hfcompress.explanations),
    compared with earlier rows' ("teacher", "previous")."""

    method: str
    baseline: str
    top_k: int
    num_examples: int
    shown: list[ShownExample] = Field(default_factory=list)  # a few readable sentences, for pictures
    teacher: AttributionComparison | None = None
    previous: AttributionComparison | None = None


class Row(Evaluation):
    """One evaluated model: a row of the results table."""

    label: str
    stage_id: str
    model_dir: str | None = None  # relative to the run folder; a Hub id or package reference for the teacher
    variant: str | None = None  # the quantized variant's name, for the rows of a quantize stage
    extra_datasets: dict[str, Evaluation] = Field(default_factory=dict)
    explanations: Explanations | None = None
    attributions_file: str | None = None  # the explained sample's word attributions, relative to the run folder
    robustness: dict[str, dict[str, float]] = Field(default_factory=dict)  # per perturbation (hfcompress.robustness)
    beyond_accuracy_seconds: dict[str, float] = Field(default_factory=dict)  # explanations, robustness, extra sets


class StageRecord(_Record):
    """stage.json: what a finished stage was asked to do and what it measured."""

    id: str
    stage: str
    options: dict[str, Any]
    fingerprint: str
    produces_model: bool
    model_dir: str | None = None
    seconds: float
    metrics: dict[str, Any] = Field(default_factory=dict)
    rows: list[Row] = Field(default_factory=list)


class TaskSummary(_Record):
    type: str
    dataset: str
    dataset_id: str | None = None
    language: str | None = None
    metrics: list[str] = Field(default_factory=list)
    label_names: list[str] | None = None
    max_length: int | None = None
    test_split_size: int | None = None
    data: dict[str, Any] | None = None  # what loading did to the data (rows dropped, classes, splits)


class RunResults(_Record):
    """results.json."""

    name: str
    teacher: str
    task: TaskSummary
    final_model_dir: str | None = None
    stages: list[StageRecord] = Field(default_factory=list)
    rows: list[Row] = Field(default_factory=list)
    environment: dict[str, Any] = Field(default_factory=dict)
    generations: list[dict[str, str]] = Field(default_factory=list)
    comparison: dict[str, Any] | None = None  # added by `hfcompress compare` after the run (a rerun drops it)

    def stage(self, stage_id: str) -> StageRecord | None:
        return next((record for record in self.stages if record.id == stage_id), None)

    def row(self, label: str) -> Row | None:
        return next((row for row in self.rows if row.label == label), None)

    @property
    def final_row(self) -> Row | None:
        """The evaluation of the run's final checkpoint (the last one, if it was evaluated twice)."""
        matching = [row for row in self.rows if self.final_model_dir and row.model_dir == self.final_model_dir]
        return matching[-1] if matching else None

    def latest_comparison(self) -> dict | None:
        """The newest comparison pass: one `hfcompress compare` added after the run, else its last compare stage's."""
        if self.comparison:
            return self.comparison
        for record in reversed(self.stages):
            if record.stage == "compare" and record.metrics.get("comparison"):
                return record.metrics["comparison"]
        return None


@dataclass(frozen=True)
class RunDir:
    """The paths of one run folder."""

    path: Path

    def __init__(self, path: str | Path):
        object.__setattr__(self, "path", Path(path))

    @property
    def recipe_file(self) -> Path:
        return self.path / "recipe.yaml"

    @property
    def results_file(self) -> Path:
        return self.path / "results.json"

    @property
    def log_file(self) -> Path:
        return self.path / "run.log"

    @property
    def search_file(self) -> Path:
        return self.path / "search.json"

    @property
    def teacher_dir(self) -> Path:
        """Where a GGUF teacher is converted into an ordinary checkpoint, once."""
        return self.path / "00-teacher"

    def stage_dir(self, stage_id: str) -> Path:
        return self.path / stage_id

    def partial_dir(self, stage_id: str) -> Path:
        return self.path / f".{stage_id}.partial"

    def stage_record_file(self, stage_id: str) -> Path:
        return self.stage_dir(stage_id) / STAGE_RECORD_FILE

    def has_results(self) -> bool:
        return self.results_file.is_file()

    def load_results(self) -> RunResults:
        if not self.results_file.is_file():
            raise HfCompressError(f"{self.path}: no results.json (is this a run directory written by "
                                  f"`hfcompress run`?)")
        return _validated(RunResults, self.results_file)

    def save_results(self, results: RunResults) -> None:
        write_json(self.results_file, results.model_dump(mode="json"))

    def load_stage_record(self, stage_id: str) -> StageRecord | None:
        path = self.stage_record_file(stage_id)
        return _validated(StageRecord, path) if path.is_file() else None

    def relative(self, path: str | Path) -> str | None:
        """`path` relative to the run folder, or None when it lies outside it."""
        try:
            return str(Path(path).resolve().relative_to(self.path.resolve()))
        except ValueError:
            return None


def _validated(model: type[BaseModel], path: Path):
    try:
        return model.model_validate(read_json(path))
    except ValueError as error:  # json.JSONDecodeError and pydantic's ValidationError are both ValueErrors
        detail = (f"{format_loc(error.errors()[0]['loc'])}: {error.errors()[0]['msg']}"
                  if isinstance(error, ValidationError) else first_line(error))
        raise HfCompressError(f"{path}: not a {model.__name__} record hfcompress can read ({detail})") from None


def format_loc(loc: tuple) -> str:
    return ".".join(str(part) for part in loc)
