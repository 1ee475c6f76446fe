"""Metric modules that work offline, loaded through `evaluate.load(local path)`; other names go to the Hub."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import evaluate

from ..errors import HfCompressError

LOCAL_METRICS = {path.stem: path for path in Path(__file__).parent.glob("*.py") if path.stem != "__init__"}


@lru_cache(maxsize=None)
def load_metric(name: str) -> evaluate.EvaluationModule:
    try:
        return evaluate.load(str(LOCAL_METRICS.get(name, name)), keep_in_memory=True)
    except Exception as error:  # evaluate raises FileNotFoundError / ConnectionError / ImportError alike
        raise HfCompressError(
            f"task.metrics: cannot load metric {name!r} ({type(error).__name__}); offline metrics: "
            f"{', '.join(sorted(LOCAL_METRICS))}"
        ) from None
