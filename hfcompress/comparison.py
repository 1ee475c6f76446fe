"""The comparison pass: every model a run evaluated, loaded together and timed round-robin on the same inputs.

The `evaluate` stages time each model minutes apart, and on a shared machine those numbers move by 2x; the speed
columns of the results table, the card and the README come from this pass instead (see `hfcompress.timing`).

    comparison = compare_models({"teacher": teacher, "student": student}, task, sequence_length=64)
    comparison["models"]["student"]["speedup"]        # batch-1 speed-up over the first model, paired per round
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from pydantic import Field

from .errors import HfCompressError, first_line
from .evaluation import model_device, place_on, synthetic_batch
from .modeling import load_model
from .recipe_schema import ModelReference, StrictModel
from .run_dir import Row
from .timing import speedups, time_round_robin

logger = logging.getLogger("hfcompress")


class CompareOptions(StrictModel):
    """How the comparison pass times the models (the `compare` stage's options and `hfcompress compare`'s flags)."""

    reference: str | None = Field(None, description="row label the ratios are against; default: the first row")
    timing_sequence_length: int | None = Field(None, ge=1, description="default: task.max_length")
    rounds: int = Field(10, ge=1, description="batch-1 rounds; each times every model in one block")
    block_calls: int = Field(15, ge=1, description="timed calls per block (their median is the block's figure)")
    warmup_calls: int = Field(3, ge=0, description="untimed calls before each block")
    throughput_batch_size: int = Field(32, ge=1)
    throughput_rounds: int = Field(5, ge=1)
    throughput_block_calls: int = Field(3, ge=1)


def run_comparison(run_dir: Path, rows: list[Row], task, options: CompareOptions, max_length: int,
                   device: str | torch.device = "cpu") -> dict:
    """Load every model the rows evaluated and time them together: the comparison record of results.json."""
    models, failed, aliases = load_row_models(run_dir, rows, task.model_class, device)
    settings = options.model_dump(exclude={"timing_sequence_length"})
    comparison = compare_models(models, task, sequence_length=options.timing_sequence_length or max_length, **settings)
    return {**comparison, "failed": failed, "aliases": aliases}


def load_row_models(run_dir: Path, rows: list[Row], model_class,
                    device: str | torch.device = "cpu") -> tuple[dict, dict[str, str], dict[str, str]]:
    """Each evaluated checkpoint once (label of its first row -> model), the ones that failed to load (label ->
    reason), and the labels of later rows that evaluated the same checkpoint (label -> first label)."""
    models, failed, aliases, first_label = {}, {}, {}, {}
    for row in rows:
        model_dir = row.model_dir
        if not model_dir:
            continue
        if model_dir in first_label:
            aliases[row.label] = first_label[model_dir]
            continue
        first_label[model_dir] = row.label
        location = Path(run_dir) / model_dir
        reference = str(location) if location.exists() else model_dir  # else a Hub id or pkg:// (the teacher)
        try:
            model = load_model(ModelReference(name_or_path=reference), model_class, row.label)
            models[row.label] = place_on(model, device).eval()
        except (HfCompressError, OSError, RuntimeError, ValueError) as error:
            failed[row.label] = first_line(error)
            logger.warning("compare: %s cannot be loaded, left out: %s", row.label, failed[row.label])
    return models, failed, aliases


@torch.no_grad()  # not inference_mode: quanto's int4 weights fail under it
def compare_models(models: dict, task, sequence_length: int, throughput_batch_size: int = 32, rounds: int = 10,
                   block_calls: int = 15, warmup_calls: int = 3, throughput_rounds: int = 5,
                   throughput_block_calls: int = 3, reference: str | None = None) -> dict:
    """Batch-1 latency and batch-N throughput of every model, timed round-robin; ratios against `reference`
    (default: the first model), each with the interquartile range of its per-round ratios."""
    if not models:
        raise HfCompressError("compare: no model to time")
    reference = reference or next(iter(models))
    if reference not in models:
        raise HfCompressError(f"compare: reference {reference!r} is not among the models ({', '.join(models)})")
    vocab_size = min(model.config.vocab_size for model in models.values())  # ids every model can embed
    single, batch = (synthetic_batch(vocab_size, size, sequence_length, "cpu") for size in (1, throughput_batch_size))
    latency = _time(models, single, rounds, block_calls, warmup_calls, "batch 1")
    throughput = _time(models, batch, throughput_rounds, throughput_block_calls, 1, f"batch {throughput_batch_size}")
    latency_up, throughput_up = speedups(latency, reference), speedups(throughput, reference)
    items = task.throughput_items(batch)
    rows = {}
    for name in models:
        rows[name] = {
            "latency_ms": latency[name].median_ms,
            "latency_ms_q1": latency[name].q1_ms,
            "latency_ms_q3": latency[name].q3_ms,
            "speedup": latency_up[name].ratio,
            "speedup_q1": latency_up[name].q1,
            "speedup_q3": latency_up[name].q3,
            "throughput_per_s": items / (throughput[name].median_ms / 1000),
            "throughput_speedup": throughput_up[name].ratio,
            "throughput_speedup_q1": throughput_up[name].q1,
            "throughput_speedup_q3": throughput_up[name].q3,
        }
    settings = {
        "reference": reference, "sequence_length": sequence_length, "throughput_batch_size": throughput_batch_size,
        "rounds": rounds, "block_calls": block_calls, "warmup_calls": warmup_calls,
        "throughput_rounds": throughput_rounds, "throughput_block_calls": throughput_block_calls,
        "throughput_unit": task.throughput_unit, "threads": torch.get_num_threads(),
        "devices": sorted({str(model_device(model)) for model in models.values()}),
    }
    return {"settings": settings, "models": rows}


def _time(models: dict, inputs: dict, rounds: int, block_calls: int, warmup_calls: int, what: str) -> dict:
    calls = {}
    for name, model in models.items():
        on_device = {key: value.to(model_device(model)) for key, value in inputs.items()}
        calls[name] = lambda model=model, on_device=on_device: model(**on_device)
    synchronize = torch.cuda.synchronize if torch.cuda.is_available() else None
    progress = lambda index: logger.info("compare: %s, round %d/%d", what, index + 1, rounds)  # noqa: E731
    return time_round_robin(calls, rounds, block_calls, warmup_calls, synchronize=synchronize, on_round=progress)
