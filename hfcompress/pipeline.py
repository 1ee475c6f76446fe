"""The runner: stages in order, each in its own folder, resumable, with only the main process writing.

A stage's fingerprint hashes its options and the fingerprint before it (task, teacher, seed at the root), so a
rerun skips every finished stage whose fingerprint matches and reruns a changed stage and all after it. A stage
writes into `.<id>.partial/` and is renamed to `<id>/` only when complete: an interrupted run never leaves a
folder that a later run would trust, and an earlier finished folder stays intact until its replacement is done.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import sys
import time
from importlib import metadata
from pathlib import Path

import datasets
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from .data import load_extra_split, load_task_data, prepare_task_data, source_name
from .distributed import (
    DistributedOptions,
    accelerator_kwargs,
    check_world,
    main_process_alone,
    sharding_notes,
    world_size,
)
from .errors import HfCompressError
from .fileio import write_json, write_text
from .modeling import convert_gguf_checkpoint
from .plan import format_plan, plan_recipe
from .recipe_schema import ExtraEvaluationSet, ModelReference, Recipe
from .report import format_fidelity_table, format_table
from .run_dir import METRICS_FILE, FINGERPRINT_FILE, STAGE_RECORD_FILE, Row, RunDir, RunResults, StageRecord, TaskSummary
from .sources import load_config, load_tokenizer, resolve_data_files
from .stages import Stage, StageContext, StageResult, get_stage_class
from .tasks import make_task
from .timing import cpu_description

logger = logging.getLogger("hfcompress")


def run(recipe: Recipe, output_dir: str | Path | None = None, training_hooks: list | None = None) -> RunResults:
    """Run a recipe end to end (or resume it) and return the run's results (complete on the main process).

    `training_hooks`: `hfcompress.training.TrainingHook`s called by every training stage (after each step, ...).
    """
    accelerator = make_accelerator(recipe.mixed_precision, recipe.distributed)
    run_dir = RunDir(output_dir if output_dir is not None else recipe.resolved_output_dir)
    runner = _Runner(recipe, run_dir, accelerator, training_hooks or [])
    data = runner.load_data()  # bad input (teacher, data, columns, labels) fails here, before anything is written
    planned = plan_recipe(recipe, data.label_names, data.tokenizer)  # so does an option no stage could carry out
    if accelerator.is_main_process:
        run_dir.path.mkdir(parents=True, exist_ok=True)
        write_text(run_dir.recipe_file, recipe.to_yaml())
    configure_logging(run_dir.log_file, accelerator.is_main_process)
    accelerator.wait_for_everyone()
    logger.info("run %s in %s on %s (%d process(es))", recipe.name, run_dir.path, accelerator.device,
                accelerator.num_processes)
    log_data_report(data.report)
    logger.info("%s", format_plan(planned))
    results = runner.run_all()
    if accelerator.is_main_process:
        print(format_table(results))
        fidelity = format_fidelity_table(results)
        if fidelity:
            print(fidelity)
        logger.info("results in %s", run_dir.results_file)
    accelerator.wait_for_everyone()
    return results


def check_sources(recipe: Recipe) -> list[str]:
    """What `hfcompress validate` checks beyond the recipe itself, without training and without writing a run
    folder: the teacher resolves (its config and tokenizer load; no weights), and the data loads and passes the
    checks a run makes before its first stage (columns, incomplete rows, labels, splits). Lines to show."""
    config = load_config(recipe.teacher)
    tokenizer = load_tokenizer(recipe.teacher)
    prepared = prepare_task_data(recipe.task, recipe.seed)
    report = prepared.report
    lines = [f"teacher: {recipe.teacher.name_or_path} ({config.model_type}) resolves"]
    rows = sum(len(split) for split in prepared.raw.values())
    data = f"data: {source_name(recipe.task)}: {rows} rows"
    if report.split_sizes:
        data += "; " + ", ".join(f"{split} {size}" for split, size in report.split_sizes.items())
    if report.class_counts:
        data += "; classes " + ", ".join(f"{name!r} {count}" for name, count in report.class_counts.items())
    lines.append(data)
    lines += [f"note: {line}" for line in report.notes] + [f"warning: {line}" for line in report.warnings]
    lines += sharding_notes(recipe.distributed, [(stage_id, get_stage_class(entry.name))
                                                 for stage_id, entry in zip(recipe.stage_ids(), recipe.stages)])
    checked = set()
    for stage_id, entry in zip(recipe.stage_ids(), recipe.stages):
        evaluate_options = getattr(entry.options, "evaluate", entry.options)  # quantize evaluates its variants
        for index, extra in enumerate(getattr(evaluate_options, "extra_datasets", [])):
            key = f"stages.{stage_id}.extra_datasets[{index}]"
            resolve_data_files(extra.data_files, f"{key}.data_files")
            if extra.model_dump_json() not in checked:
                checked.add(extra.model_dump_json())
                lines.append(_extra_set_line(recipe, extra, tokenizer, prepared.label_names, key))
    return lines


def _extra_set_line(recipe: Recipe, extra: ExtraEvaluationSet, tokenizer, label_names: list[str] | None, key: str) -> str:
    """An extra evaluation set loads and passes the task data's checks (columns, labels) before anything trains."""
    try:
        examples, _ = load_extra_split(recipe.task, extra, tokenizer, label_names)
    except HfCompressError as error:
        raise HfCompressError(f"{key} ({extra.display_name}): {error}") from None
    return f"extra evaluation set {extra.display_name}: {len(examples)} examples"


def log_data_report(report) -> None:
    """What loading did to the data (rows dropped, warnings), into the run log once logging is set up."""
    for line in report.notes:
        logger.info("data: %s", line)
    for line in report.warnings:
        logger.warning("data: %s", line)


def make_accelerator(mixed_precision: str, distributed: DistributedOptions | None = None) -> Accelerator:
    """bf16 or fp16 where the GPU supports it under "auto" (not fp16 for FSDP); a launcher's --mixed_precision wins.

    Without a GPU, several processes (torchrun, accelerate launch) form a CPU world over gloo: accelerate only
    does that when asked for the CPU explicitly. A launch of several processes that accelerate sees as one is an
    error (every process would be the main process).
    """
    if mixed_precision == "auto":
        if os.environ.get("ACCELERATE_MIXED_PRECISION"):
            mixed_precision = None
        elif torch.cuda.is_available():
            fsdp = distributed is not None and distributed.strategy == "fsdp"
            mixed_precision = "bf16" if torch.cuda.is_bf16_supported() else "no" if fsdp else "fp16"
        else:
            mixed_precision = "no"
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=world_size() > 1 and not torch.cuda.is_available(),
                              **accelerator_kwargs(distributed))
    check_world(accelerator, distributed)
    return accelerator


def configure_logging(log_file: Path, is_main_process: bool) -> None:
    logger.setLevel(logging.INFO)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.propagate = False
    if not is_main_process:
        logger.addHandler(logging.NullHandler())
        datasets.disable_progress_bars()
        return
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(message)s"))
    to_file = logging.FileHandler(log_file, encoding="utf-8")
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for handler in (console, to_file):
        logger.addHandler(handler)


class _Runner:
    def __init__(self, recipe: Recipe, run_dir: RunDir, accelerator: Accelerator, training_hooks: list):
        self.recipe, self.run, self.accelerator = recipe, run_dir, accelerator
        self.training_hooks = training_hooks
        self.task = make_task(recipe.task)
        self._data = None
        self._data_by_vocabulary = {}  # loaded by every process together: the same keys on every rank
        self._solo_data = {}  # loaded by the main process alone, inside a main-process-only stage
        self._solo = False  # a main-process-only stage is running: the other processes are not there to meet
        self._tokenizers = {}
        self.models: dict[str, ModelReference] = {"teacher": recipe.teacher}
        self.results = RunResults(name=recipe.name, teacher=recipe.teacher.name_or_path, task=_task_summary(recipe),
                                  environment=environment(accelerator))

    def load_data(self, reference: ModelReference | None = None):
        """The task data tokenized by the teacher's tokenizer, or by `reference`'s when its vocabulary differs
        (after vocabulary pruning): same splits and example order, other token ids."""
        if self._data is None:
            with self.accelerator.main_process_first():
                tokenizer = load_tokenizer(self.recipe.teacher)
                self._data = load_task_data(self.recipe.task, tokenizer, self.recipe.seed)
            self.results.task.test_split_size = len(self._data["test"])
            self.results.task.data = self._data.report.as_dict()
        tokenizer = self.load_tokenizer(reference) if reference is not None else self._data.tokenizer
        vocabulary = tokenizer.get_vocab()
        if vocabulary == self._data.tokenizer.get_vocab():
            return self._data
        key = _hash(sorted(vocabulary.items()))
        if key in self._data_by_vocabulary:
            return self._data_by_vocabulary[key]
        # A barrier must be reached as often on every rank: the main process alone never meets one, and what it
        # loaded alone stays out of the shared cache, so a later stage of all processes misses it on every rank.
        if self._solo:
            if key not in self._solo_data:
                self._solo_data[key] = load_task_data(self.recipe.task, tokenizer, self.recipe.seed)
            return self._solo_data[key]
        with self.accelerator.main_process_first():
            data = self._solo_data.pop(key, None)
            self._data_by_vocabulary[key] = data or load_task_data(self.recipe.task, tokenizer, self.recipe.seed)
        return self._data_by_vocabulary[key]

    def load_tokenizer(self, reference: ModelReference):
        """A model's own tokenizer (stages save one next to every checkpoint they write)."""
        if reference == self.recipe.teacher:
            return self.load_data().tokenizer
        if reference.name_or_path not in self._tokenizers:
            self._tokenizers[reference.name_or_path] = load_tokenizer(reference)
        return self._tokenizers[reference.name_or_path]

    def run_all(self) -> dict:
        # Options left at their defaults are not hashed: a new option with a default keeps finished stages valid.
        fingerprint = _hash({"task": self.recipe.task.model_dump(mode="json", exclude_defaults=True),
                             "teacher": self.recipe.teacher.model_dump(exclude_defaults=True),
                             "seed": self.recipe.seed})
        current = self._teacher_checkpoint()
        for stage_id, entry in zip(self.recipe.stage_ids(), self.recipe.stages):
            options = entry.options.model_dump(mode="json", exclude_defaults=True)
            fingerprint = _hash({"previous": fingerprint, "stage": entry.name, "options": options})
            stage_class = get_stage_class(entry.name)
            record = self._finished(stage_id, fingerprint) or self._run_stage(
                stage_class(entry.options), stage_id, fingerprint, current
            )
            if stage_class.produces_model:
                current = ModelReference(name_or_path=str(self.run.path / record.model_dir))
                self.models[stage_id] = current
                self.results.final_model_dir = record.model_dir
            self.results.stages.append(record)
            self.results.rows.extend(record.rows)
            self.results.generations = generation_samples(self.results.rows)
            if self.accelerator.is_main_process:
                self.run.save_results(self.results)
        return self.results

    def _teacher_checkpoint(self) -> ModelReference:
        """The teacher as every stage loads it; a GGUF teacher is converted once into `00-teacher/`."""
        teacher = self.recipe.teacher
        if not teacher.gguf_file:
            return teacher
        folder = self.run.teacher_dir
        if self.accelerator.is_main_process and not (folder / "config.json").is_file():
            logger.info("converting the GGUF teacher %s into %s", teacher.gguf_file, folder)
            partial = self.run.partial_dir(folder.name)
            shutil.rmtree(partial, ignore_errors=True)
            convert_gguf_checkpoint(teacher, self.task.model_class, partial)
            _replace_folder(partial, folder)
        self.accelerator.wait_for_everyone()
        converted = ModelReference(name_or_path=str(folder))
        self.models["teacher"] = converted
        return converted

    def _finished(self, stage_id: str, fingerprint: str) -> StageRecord | None:
        record = self.run.load_stage_record(stage_id)
        if record is None or record.fingerprint != fingerprint:
            return None
        logger.info("%s: already finished with the same options, skipping", stage_id)
        return record

    def _run_stage(self, stage: Stage, stage_id: str, fingerprint: str, current: ModelReference) -> StageRecord:
        accelerator = self.accelerator
        partial = self.run.partial_dir(stage_id)
        if accelerator.is_main_process:
            _prepare_partial(partial, fingerprint)
        accelerator.wait_for_everyone()
        logger.info("%s: running", stage_id)
        ctx = StageContext(
            recipe=self.recipe, stage_id=stage_id, accelerator=accelerator, task=self.task, run_dir=self.run.path,
            out_dir=partial, model=current, models=dict(self.models), load_data=self.load_data,
            load_tokenizer=self.load_tokenizer,
            rows=list(self.results.rows), all_processes=not stage.main_process_only,
            training_hooks=self.training_hooks,
        )
        started = time.perf_counter()
        # Every stage starts from the recipe's seed, whatever ran before it in this process: a new task head, a
        # student built from a config and its projections are the same in every run, resumed ones included.
        set_seed(self.recipe.seed)
        if stage.main_process_only and not accelerator.is_main_process:
            result = StageResult()
        else:
            self._solo = stage.main_process_only and accelerator.num_processes > 1
            try:
                with main_process_alone(self._solo):
                    result = stage.run(ctx)
            finally:
                self._solo = False
        accelerator.wait_for_everyone()
        record = StageRecord(
            id=stage_id, stage=stage.name, options=stage.options.model_dump(mode="json"), fingerprint=fingerprint,
            produces_model=stage.produces_model,
            model_dir=str(Path(stage_id, result.model_subdir or "")) if stage.produces_model else None,
            seconds=round(time.perf_counter() - started, 2), metrics=result.metrics, rows=result.rows)
        if accelerator.is_main_process:
            write_json(partial / METRICS_FILE, record.model_dump(mode="json", include={"metrics", "rows"}))
            write_json(partial / STAGE_RECORD_FILE, record.model_dump(mode="json"))
            _replace_folder(partial, self.run.stage_dir(stage_id))
        accelerator.wait_for_everyone()
        logger.info("%s: done in %.1f s", stage_id, record.seconds)
        return record


def generation_samples(rows: list[Row]) -> list[dict]:
    """The first and the last evaluated model's completions of the same prompt, for the model card."""
    generated = [row.metrics for row in rows if "generation" in row.metrics]
    if not generated:
        return []
    first, last = generated[0], generated[-1]
    return [{"prompt": first["generation_prompt"], "teacher": first["generation"], "final": last["generation"]}]


def _prepare_partial(partial: Path, fingerprint: str) -> None:
    """Reuse a partial folder of the same stage (it may hold a training checkpoint to resume), else start clean."""
    marker = partial / FINGERPRINT_FILE
    if partial.exists() and (not marker.is_file() or marker.read_text().strip() != fingerprint):
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    write_text(marker, fingerprint)


def _replace_folder(source: Path, target: Path) -> None:
    (source / FINGERPRINT_FILE).unlink(missing_ok=True)
    if target.exists():
        stale = target.with_name(f".{target.name}.stale")
        shutil.rmtree(stale, ignore_errors=True)
        target.rename(stale)
        source.rename(target)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        source.rename(target)


def _hash(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _task_summary(recipe: Recipe) -> TaskSummary:
    task = recipe.task
    return TaskSummary(type=task.type, dataset=task.dataset.describe(), dataset_id=task.dataset_id,
                       language=task.language, metrics=task.metrics, label_names=task.label_names,
                       max_length=task.max_length)


def environment(accelerator: Accelerator) -> dict:
    packages = ["torch", "transformers", "accelerate", "datasets", "evaluate", "huggingface_hub", "bitsandbytes",
                "optimum-quanto"]
    versions = {}
    for package in packages:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu: {cpu_description()}"
    return {"python": platform.python_version(), **versions, "device": device,
            "num_processes": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision}
