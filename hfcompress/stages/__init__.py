"""The stage registry: a stage is one module with its options model and one `@register_stage` class.

The built-in stages are imported here, so importing the package registers them."""

from . import card, compare, distill, evaluate, finetune, prune, push, quantize  # noqa: F401  (they register)
from .base import (
    Stage,
    StageContext,
    StageOptions,
    StageResult,
    get_stage_class,
    register_stage,
    stage_names,
)

__all__ = ["Stage", "StageContext", "StageOptions", "StageResult", "get_stage_class", "register_stage", "stage_names"]
