"""`compare`: every model the run has evaluated so far, timed together round-robin (the speed columns people compare)."""

from __future__ import annotations

from pydantic import Field

from ..comparison import compare_models, load_row_models
from . import register_stage
from .base import Stage, StageContext, StageOptions, StageResult


class CompareOptions(StageOptions):
    reference: str | None = Field(None, description="row label the ratios are against; default: the first row")
    timing_sequence_length: int | None = Field(None, ge=1, description="default: task.max_length")
    rounds: int = Field(10, ge=1, description="batch-1 rounds; each times every model in one block")
    block_calls: int = Field(15, ge=1, description="timed calls per block (their median is the block's figure)")
    warmup_calls: int = Field(3, ge=0, description="untimed calls before each block")
    throughput_batch_size: int = Field(32, ge=1)
    throughput_rounds: int = Field(5, ge=1)
    throughput_block_calls: int = Field(3, ge=1)


@register_stage
class CompareStage(Stage):
    name = "compare"
    options_model = CompareOptions
    main_process_only = True

    def run(self, ctx: StageContext) -> StageResult:
        models, failed, aliases = load_row_models(ctx.run_dir, ctx.rows, ctx.task.model_class, ctx.accelerator.device)
        comparison = run_comparison(models, ctx.task, self.options, ctx.recipe.task.max_length)
        return StageResult(metrics={"comparison": {**comparison, "failed": failed, "aliases": aliases}})


def run_comparison(models: dict, task, options: CompareOptions, max_length: int) -> dict:
    settings = options.model_dump(exclude={"timing_sequence_length"})
    return compare_models(models, task, sequence_length=options.timing_sequence_length or max_length, **settings)
