"""Atomic writes: a reader (or a later resumed run) never sees a half-written file."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_text(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text, encoding="utf-8")
    temporary.replace(path)


def write_json(path: Path, data) -> None:
    """JSON with pydantic models (results.json records) as their JSON form, and other objects as text."""
    write_text(path, json.dumps(data, indent=2, default=_as_json) + "\n")


def _as_json(value):
    return value.model_dump(mode="json") if hasattr(value, "model_dump") else str(value)


def read_json(path: Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))
