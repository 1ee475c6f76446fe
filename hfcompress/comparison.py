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

from .errors import HfCompressError, first_line
from .evaluation import model_device, place_on, synthetic_batch
from .modeling import load_model
from .recipe import ModelReference
from .timing import speedups, time_round_robin

logger = logging.getLogger("hfcompress")


def load_row_models(run_dir: Path, rows: list[dict], model_class,
                    device: str | torch.device = "cpu") -> tuple[dict, dict[str, str], dict[str, str]]:
    """Each evaluated checkpoint once (label of its first row -> model), the ones that failed to load (label ->
    reason), and the labels of later rows that evaluated the same checkpoint (label -> first label)."""
    models, failed, aliases, first_label = {}, {}, {}, {}
    for row in rows:
        model_dir = row.get("model_dir")
        if not model_dir:
            continue
        if model_dir in first_label:
            aliases[row["label"]] = first_label[model_dir]
            continue
        first_label[model_dir] = row["label"]
        location = Path(run_dir) / model_dir
        reference = str(location) if location.exists() else model_dir  # else a Hub id or pkg:// (the teacher)
        try:
            model = load_model(ModelReference(name_or_path=reference), model_class, row["label"])
            models[row["label"]] = place_on(model, device).eval()
        except (HfCompressError, OSError, RuntimeError, ValueError) as error:
            failed[row["label"]] = first_line(error)
            logger.warning("compare: %s cannot be loaded, left out: %s", row["label"], failed[row["label"]])
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


def compare_run(run_dir: Path, **options) -> dict:
    """Time every model a finished run evaluated (`hfcompress compare RUN`); the comparison is added to its
    results.json, which is returned. `options` are `CompareOptions` fields."""
    from .fileio import write_json
    from .recipe import load_recipe
    from .report import load_results
    from .stages.compare import CompareOptions, run_comparison
    from .tasks import make_task

    results = load_results(run_dir)
    recipe = load_recipe(Path(run_dir) / "recipe.yaml")
    task = make_task(recipe.task)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    models, failed, aliases = load_row_models(run_dir, results.get("rows", []), task.model_class, device)
    given = {key: value for key, value in options.items() if value is not None}
    comparison = run_comparison(models, task, CompareOptions(**given), recipe.task.max_length)
    results["comparison"] = {**comparison, "failed": failed, "aliases": aliases}
    write_json(Path(run_dir) / "results.json", results)
    return results
