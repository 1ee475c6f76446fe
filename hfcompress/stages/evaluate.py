"""`evaluate`: score the current model on a held-out split and measure what it costs to run."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from ..beyond_accuracy import explain_model, robustness_of
from ..evaluation import (
    count_parameters,
    measure_generation,
    measure_speed,
    memory_footprint,
    place_on,
    size_on_disk,
)
from ..explanations import ExplanationOptions
from ..fidelity import (
    ECE_BINS,
    TOP_K_TOKENS,
    causal_lm_ece,
    causal_lm_fidelity,
    classification_ece,
    classification_fidelity,
    load_predictions,
    per_class_f1,
    save_predictions,
)
from ..recipe_schema import ExtraEvaluationSet
from ..robustness import RobustnessOptions
from ..run_dir import Evaluation, Row
from ..sources import resolve_model_reference
from .base import Stage, StageContext, StageOptions, StageResult, register_stage


class EvaluateOptions(StageOptions):
    split: Literal["validation", "test"] = "test"
    label: str | None = None
    per_device_eval_batch_size: int = Field(64, ge=1)
    measure_speed: bool = True
    timing_sequence_length: int | None = Field(None, ge=1, description="default: task.max_length")
    timing_warmup: int = Field(5, ge=0)
    timing_iterations: int = Field(30, ge=1)
    throughput_batch_size: int = Field(32, ge=1)
    extra_datasets: list[ExtraEvaluationSet] = Field(
        default_factory=list, description="more test sets (any datasets source of the task, its columns and labels "
                                          "mapped onto the task's), e.g. from another domain, each scored and "
                                          "compared like the test split")
    generation_prompt: str | None = Field(None, description="causal LM: a greedy completion to show and time")
    max_new_tokens: int = Field(32, ge=1)
    explanations: ExplanationOptions = Field(default_factory=ExplanationOptions)
    robustness: RobustnessOptions = Field(default_factory=RobustnessOptions)


@register_stage
class EvaluateStage(Stage):
    name = "evaluate"
    options_model = EvaluateOptions
    main_process_only = True

    def run(self, ctx: StageContext) -> StageResult:
        model = ctx.load_model()
        folder = resolve_model_reference(ctx.model.name_or_path)
        row = evaluation_row(ctx, model, folder, self.options, self.options.label or ctx.model_label)
        return StageResult(metrics=row.metrics, rows=[row])


def evaluation_row(ctx: StageContext, model, folder: str | Path, options: EvaluateOptions, label: str,
                   variant: str | None = None) -> Row:
    """One results.json row: task metrics on the split, fidelity to the teacher and to the previous evaluated
    model, then parameters, size, memory, latency, throughput; the same quality and fidelity numbers on each extra
    evaluation set; word attributions and robustness to perturbed text (`beyond_accuracy`). Each set's outputs are
    saved next to the metrics (`predictions*.safetensors`) for later rows to compare with."""
    model = place_on(model, ctx.accelerator.device)
    suffix = f"-{variant}" if variant else ""
    predictions_file = Path(ctx.out_dir) / f"predictions{suffix}.safetensors"
    main = evaluate_split(ctx, model, options, options.split, None, predictions_file)
    attributions_file = Path(ctx.out_dir) / f"attributions{suffix}.safetensors"
    besides = beyond_accuracy(ctx, model, options, predictions_file, attributions_file)
    metrics = main.metrics
    metrics["num_parameters"] = count_parameters(model)
    metrics["size_on_disk_bytes"] = size_on_disk(folder)
    metrics["memory_footprint_bytes"] = memory_footprint(model)
    if options.measure_speed:
        length = options.timing_sequence_length or ctx.recipe.task.max_length
        metrics.update(
            measure_speed(model, model.config.vocab_size, length, ctx.task, options.timing_warmup,
                          options.timing_iterations, options.throughput_batch_size)
        )
    if options.generation_prompt and ctx.task.type == "causal-lm":
        metrics.update(measure_generation(model, ctx.tokenizer, options.generation_prompt, options.max_new_tokens))
    extra = {}
    started = time.perf_counter()
    for index, source in enumerate(options.extra_datasets):
        split = ctx.data.add_extra_split(source)
        extra[source.display_name] = evaluate_split(
            ctx, model, options, split, source.display_name,
            Path(ctx.out_dir) / f"predictions{suffix}-extra{index}.safetensors")
    if extra:
        besides["beyond_accuracy_seconds"]["extra_datasets"] = time.perf_counter() - started
    model_dir = _inside_run_dir(folder, ctx) or ctx.model.name_or_path
    return Row(label=label, stage_id=ctx.stage_id, model_dir=model_dir, variant=variant, extra_datasets=extra,
               **main.model_dump(), **besides)


def beyond_accuracy(ctx: StageContext, model, options: EvaluateOptions, predictions_file: Path,
                    attributions_file: Path) -> dict:
    """The row's fields besides accuracy: word attributions compared with the teacher's (classification), scores
    under perturbed text, and the seconds each took (`beyond_accuracy_seconds`)."""
    entries, seconds = {}, {}
    if options.explanations.enabled and ctx.task.type != "causal-lm":
        started = time.perf_counter()
        log_probs = load_predictions(predictions_file)["log_probs"]
        entries["explanations"] = explain_model(ctx, model, options.explanations, options.split, log_probs,
                                                attributions_file)
        entries["attributions_file"] = _inside_run_dir(attributions_file, ctx)
        seconds["explanations"] = time.perf_counter() - started
    if options.robustness.enabled or (options.robustness.enabled is None and ctx.task.type != "causal-lm"):
        started = time.perf_counter()
        entries["robustness"] = robustness_of(ctx, model, options.robustness, options.split,
                                              options.per_device_eval_batch_size, predictions_file)
        seconds["robustness"] = time.perf_counter() - started
    return {**entries, "beyond_accuracy_seconds": seconds}


# ---------------------------------------------------------------------------------------------- fidelity


def evaluate_split(ctx: StageContext, model, options: EvaluateOptions, split: str, extra_name: str | None,
                   predictions_file: Path) -> Evaluation:
    """Metrics, calibration and fidelity of the model on one split (`extra_name`: an extra evaluation set), and
    where its outputs were saved."""
    references = fidelity_references(ctx, options.split, extra_name)
    outputs = predict_split(ctx, model, split, options.per_device_eval_batch_size, references)
    metrics = {**ctx.task.score(outputs), "split": split if extra_name is None else extra_name}
    metrics.update(calibration_and_class_scores(ctx, outputs))
    fidelity = {role: compare_outputs(ctx, reference, outputs, role, split) for role, reference in references.items()}
    save_predictions(predictions_file, {name: array for name, array in outputs.items() if not name.startswith("at_")})
    return Evaluation(metrics=metrics, predictions_file=_inside_run_dir(predictions_file, ctx), fidelity=fidelity)


def fidelity_references(ctx: StageContext, split: str, extra_name: str | None = None) -> dict[str, Row | Evaluation]:
    """The earlier outputs to compare with, by role: "teacher" (the row labelled teacher, else the first) and
    "previous" (the last evaluated model before this stage, the one this model was made from), among the rows
    scored on the same split (and extra set) that saved their outputs. One row may fill both roles."""
    rows = [row for row in ctx.rows if row.metrics.get("split") == split]
    labelled = [(row.label, row if extra_name is None else row.extra_datasets.get(extra_name)) for row in rows]
    labelled = [(label, scored) for label, scored in labelled if scored is not None and scored.predictions_file]
    if not labelled:
        return {}
    teacher = next((pair for pair in labelled if pair[0] == "teacher"), labelled[0])
    return {"teacher": teacher, "previous": labelled[-1]}


def predict_split(ctx: StageContext, model, split: str, batch_size: int, references: dict[str, tuple]) -> dict:
    loader = ctx.data.dataloader(split, batch_size)
    if ctx.task.type != "causal-lm":
        return ctx.task.predict(model, loader)
    compare_with = {role: _load_reference(ctx, scored)["top_k_indices"] for role, (_, scored) in references.items()}
    return ctx.task.predict(model, loader, top_k=TOP_K_TOKENS, compare_with=compare_with)


def calibration_and_class_scores(ctx: StageContext, outputs: dict) -> dict:
    """Expected calibration error (of the predicted class, or of the top-1 next token) and per-class F1."""
    if ctx.task.type == "causal-lm":
        return {"ece": causal_lm_ece(outputs), "ece_bins": ECE_BINS}
    names = ctx.data.label_names
    scores = per_class_f1(outputs["log_probs"].argmax(-1), outputs["labels"], len(names))
    return {"ece": classification_ece(outputs["log_probs"], outputs["labels"]), "ece_bins": ECE_BINS,
            "per_class_f1": dict(zip(names, scores))}


def compare_outputs(ctx: StageContext, reference: tuple[str, Evaluation], outputs: dict, role: str,
                    split: str) -> dict:
    """How `outputs` differ from a reference's (given as its row's label and its evaluation on this split)."""
    label, scored = reference
    saved = _load_reference(ctx, scored)
    if ctx.task.type == "causal-lm":
        compared = causal_lm_fidelity(saved, outputs, f"at_{role}")
    else:
        compared = classification_fidelity(saved, outputs, ctx.data.label_names, ctx.data.texts.get(split))
    return {"label": label, **compared}


def _load_reference(ctx: StageContext, scored: Evaluation) -> dict:
    return load_predictions(Path(ctx.run_dir) / scored.predictions_file)


def _inside_run_dir(folder, ctx: StageContext) -> str | None:
    """The folder relative to the run directory as it will be once this stage is finished (its partial folder
    renamed to the stage id), or None when it lies elsewhere (the teacher)."""
    try:
        relative = Path(folder).resolve().relative_to(Path(ctx.run_dir).resolve())
    except ValueError:
        return None
    if relative.parts[0] == Path(ctx.out_dir).name:
        relative = Path(ctx.stage_id, *relative.parts[1:])
    return str(relative)
