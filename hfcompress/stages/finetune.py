"""`finetune`: train the current model on the task (labels only)."""

from __future__ import annotations

from ..data import batch_to_model_inputs
from ..distributed import strategy_name
from ..training import TrainingOptions, train
from .base import Stage, StageContext, StageResult, register_stage


class FinetuneOptions(TrainingOptions):
    pass


def task_loss(model, batch):
    loss = model(**batch_to_model_inputs(batch)).loss
    return loss, {"loss": loss.item()}


@register_stage
class FinetuneStage(Stage):
    name = "finetune"
    options_model = FinetuneOptions
    produces_model = True

    def run(self, ctx: StageContext) -> StageResult:
        model = ctx.load_model()
        model, state = train(ctx, model, self.options, task_loss)
        ctx.save_model(model)
        return StageResult(metrics=training_metrics(ctx, state))

    def plan(self, shape, planner):
        planner.require_full_precision(shape)
        return shape


def training_metrics(ctx: StageContext, state) -> dict:
    return {
        f"best_validation_{ctx.task.selection_metric}": state.best_metric,
        "best_step": state.best_step,
        "steps": state.global_step,
        "train_seconds": round(state.train_seconds, 2),
        "validation_history": state.history,
        "train_loss_history": state.train_log,
        "distributed": strategy_name(ctx.recipe.distributed, ctx.accelerator),
        "memory_per_process": state.memory,
    }
