"""`push`: publish the final checkpoint and its card to the Hub (main process only)."""

from __future__ import annotations

from pydantic import Field

from ..hub import push_run
from .base import (
    Stage,
    StageContext,
    StageOptions,
    StageResult,
    check_repo_id,
    register_stage,
)


class PushOptions(StageOptions):
    repo_id: str = Field(pattern=r"^[\w.-]+/[\w.-]+$")
    private: bool = False
    revision: str | None = None
    create_pr: bool = False
    commit_message: str | None = None
    dry_run: bool = False


@register_stage
class PushStage(Stage):
    name = "push"
    options_model = PushOptions
    main_process_only = True

    def plan(self, shape, planner):
        check_repo_id(planner, self.options.repo_id)
        return shape

    def run(self, ctx: StageContext) -> StageResult:
        options = self.options.model_dump(exclude={"repo_id"}, exclude_none=True)
        result = push_run(ctx.run_dir, self.options.repo_id, **options)
        print(result.summary())
        return StageResult(metrics={"repo_id": result.repo_id, "revision": result.revision,
                                    "new_commit": result.new_commit, "dry_run": result.dry_run})
