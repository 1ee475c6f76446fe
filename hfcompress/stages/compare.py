"""`compare`: every model the run has evaluated so far, timed together round-robin (the speed columns people compare)."""

from __future__ import annotations

from ..comparison import CompareOptions, run_comparison
from .base import Stage, StageContext, StageResult, register_stage


@register_stage
class CompareStage(Stage):
    name = "compare"
    options_model = CompareOptions
    main_process_only = True

    def run(self, ctx: StageContext) -> StageResult:
        comparison = run_comparison(ctx.run_dir, ctx.rows, ctx.task, self.options, ctx.recipe.task.max_length,
                                    ctx.accelerator.device)
        return StageResult(metrics={"comparison": comparison})
