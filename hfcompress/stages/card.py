"""`card`: write the model card into the final checkpoint and into `model_cards/<run name>/`."""

from __future__ import annotations

from pathlib import Path

from ..card import write_model_card
from .base import (
    Stage,
    StageContext,
    StageOptions,
    StageResult,
    check_repo_id,
    register_stage,
)


class CardOptions(StageOptions):
    repo_id: str | None = None  # the repo the card's loading code names; default YOUR_NAMESPACE/<run name>
    model_cards_dir: str = "model_cards"


@register_stage
class CardStage(Stage):
    name = "card"
    options_model = CardOptions
    main_process_only = True

    def plan(self, shape, planner):
        check_repo_id(planner, self.options.repo_id)
        return shape

    def run(self, ctx: StageContext) -> StageResult:
        # results.json already holds every earlier stage: the runner writes it after each one.
        path = write_model_card(ctx.run_dir, Path(self.options.model_cards_dir), repo_id=self.options.repo_id)
        return StageResult(metrics={"model_card": str(path)})
