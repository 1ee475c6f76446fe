"""Reading a recipe: a YAML file (with `--set KEY.PATH=VALUE` overrides) validated into the typed `Recipe` of
recipe_schema.py, each stage's options by that stage's own options model (the stage registry).

Every validation error becomes one line naming the file, the line, the YAML key path and what was expected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .errors import HfCompressError
from .recipe_schema import Recipe, RecipeError, StageEntry, format_problem
from .stages import get_stage_class, stage_names

__all__ = ["Recipe", "RecipeError", "apply_override", "load_recipe", "parse_recipe"]


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override (`key.path=value`) and validate a recipe file."""
    path = Path(path)
    if not path.is_file():
        raise HfCompressError(f"recipe file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise HfCompressError(f"{where}: not valid YAML: {getattr(error, 'problem', error)}") from None
    if not isinstance(data, dict):
        raise HfCompressError(f"{path}: a recipe is a YAML mapping (name, task, teacher, stages, ...)")
    for override in overrides or []:
        apply_override(data, override)
    return parse_recipe(data, source=str(path), yaml_root=root)


def parse_recipe(data: dict[str, Any], source: str = "<recipe>", yaml_root=None) -> Recipe:
    """Validate a recipe given as a dict. Stage options are validated by each stage's own options model."""
    problems: list[tuple[tuple, str]] = []
    raw_stages = data.get("stages")
    entries = _parse_stages(raw_stages, problems) if isinstance(raw_stages, list) else raw_stages
    try:
        recipe = Recipe.model_validate({**data, "stages": entries})
    except ValidationError as error:
        problems += [(tuple(e["loc"]), _describe(e)) for e in error.errors()]
        recipe = None
    if problems:
        raise RecipeError([format_problem(source, yaml_root, loc, message) for loc, message in problems])
    recipe._source, recipe._yaml_root = source, yaml_root
    return recipe


def _parse_stages(raw_stages: list, problems: list) -> list[StageEntry]:
    entries = []
    for index, item in enumerate(raw_stages):
        loc = ("stages", index)
        if isinstance(item, str):
            item = {item: None}
        if not isinstance(item, dict) or len(item) != 1:
            problems.append((loc, "each stage is a mapping with one key, the stage name, e.g. `- finetune: {...}`"))
            continue
        (name, raw_options), = item.items()
        stage_class = get_stage_class(name)
        if stage_class is None:
            problems.append((loc, f"unknown stage {name!r} (known: {', '.join(stage_names())})"))
            continue
        try:
            options = stage_class.options_model.model_validate(raw_options or {})
        except ValidationError as error:
            problems += [(loc + (name,) + tuple(e["loc"]), _describe(e)) for e in error.errors()]
            continue
        entries.append(StageEntry(name=name, options=options))
    return entries


def _describe(error: dict) -> str:
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        return "unknown key"
    if error["type"] == "missing":
        return "required key is missing"
    value = error.get("input")
    if error["type"] not in ("extra_forbidden",) and not isinstance(value, (dict, list)):
        message += f" (got {value!r})"
    return message


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply `a.b.0.c=value` (value parsed as YAML) to a raw recipe dict, in place."""
    key_path, sep, raw_value = override.partition("=")
    if not sep or not key_path:
        raise HfCompressError(f"--set {override!r}: expected KEY.PATH=VALUE")
    value = yaml.safe_load(raw_value)
    parts = key_path.split(".")
    node = data
    for depth, part in enumerate(parts[:-1]):
        node = _step(node, part, parts[: depth + 1], override)
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, override)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise HfCompressError(f"--set {override!r}: {'.'.join(parts[:-1])} is not a mapping")


def _step(node, part: str, walked: list[str], override: str):
    if isinstance(node, list):
        return node[_list_index(node, part, override)]
    if not isinstance(node, dict):
        raise HfCompressError(f"--set {override!r}: {'.'.join(walked[:-1])} is not a mapping")
    if node.get(part) is None:
        node[part] = {}
    return node[part]


def _list_index(node: list, part: str, override: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise HfCompressError(f"--set {override!r}: {part!r} is not an index of a list of {len(node)} items")
    return int(part)
