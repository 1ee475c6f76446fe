"""`evaluate`: score the current model on a held-out split and measure what it costs to run."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from ..evaluation import count_parameters, measure_generation, measure_speed, memory_footprint, place_on, size_on_disk
from ..sources import resolve_model_reference
from . import register_stage
from .base import Stage, StageContext, StageOptions, StageResult


class EvaluateOptions(StageOptions):
    split: Literal["validation", "test"] = "test"
    label: str | None = None
    per_device_eval_batch_size: int = Field(64, ge=1)
    measure_speed: bool = True
    timing_sequence_length: int | None = Field(None, ge=1, description="default: task.max_length")
    timing_warmup: int = Field(5, ge=0)
    timing_iterations: int = Field(30, ge=1)
    throughput_batch_size: int = Field(32, ge=1)
    generation_prompt: str | None = Field(None, description="causal LM: a greedy completion to show and time")
    max_new_tokens: int = Field(32, ge=1)


@register_stage
class EvaluateStage(Stage):
    name = "evaluate"
    options_model = EvaluateOptions
    main_process_only = True

    def run(self, ctx: StageContext) -> StageResult:
        model = ctx.load_model()
        folder = resolve_model_reference(ctx.model.name_or_path)
        row = evaluation_row(ctx, model, folder, self.options, self.options.label or ctx.model_label)
        return StageResult(metrics=row["metrics"], rows=[row])


def evaluation_row(ctx: StageContext, model, folder: str | Path, options: EvaluateOptions, label: str) -> dict:
    """One results.json row: task metrics on the split, then parameters, size, memory, latency, throughput."""
    model = place_on(model, ctx.accelerator.device)
    loader = ctx.data.dataloader(options.split, options.per_device_eval_batch_size)
    metrics = ctx.task.evaluate(model, loader)
    metrics["split"] = options.split
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
    model_dir = _inside_run_dir(folder, ctx) or ctx.model.name_or_path
    return {"label": label, "stage_id": ctx.stage_id, "model_dir": model_dir, "metrics": metrics}


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
