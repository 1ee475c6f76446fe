"""The stage registry: a stage is one module with its options model and one `@register_stage`."""

from __future__ import annotations

import importlib

from .base import Stage, StageContext, StageOptions, StageResult

BUILTIN_STAGE_MODULES = ["finetune", "distill", "evaluate", "prune", "quantize", "compare", "card", "push"]
_STAGES: dict[str, type[Stage]] = {}


def register_stage(stage_class: type[Stage]) -> type[Stage]:
    _STAGES[stage_class.name] = stage_class
    return stage_class


def get_stage_class(name: str) -> type[Stage] | None:
    _import_builtin_stages()
    return _STAGES.get(name)


def stage_names() -> list[str]:
    _import_builtin_stages()
    return sorted(_STAGES)


def _import_builtin_stages() -> None:
    for module in BUILTIN_STAGE_MODULES:
        importlib.import_module(f"{__name__}.{module}")


__all__ = ["Stage", "StageContext", "StageOptions", "StageResult", "register_stage", "get_stage_class", "stage_names"]
