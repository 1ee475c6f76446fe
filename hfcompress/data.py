"""Task data: load any `datasets` source, split it deterministically, tokenize once, batch with dynamic padding."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import asdict, dataclass, field

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler
from transformers import DataCollatorWithPadding, default_data_collator

from .errors import HfCompressError
from .recipe_schema import DatasetSource, ExtraEvaluationSet, SplitOptions, TaskOptions
from .sources import resolve_data_files
from .splitting import connected_groups, split_indices

logger = logging.getLogger(__name__)


@dataclass
class TaskData:
    """Tokenized train/validation/test splits; each example has input_ids, attention_mask, labels, example_index."""

    task: TaskOptions
    tokenizer: object
    splits: dict[str, datasets.Dataset]
    label_names: list[str] | None = None
    report: DataReport = field(default_factory=lambda: DataReport())
    texts: dict[str, list[str]] = field(default_factory=dict)  # per split, in example_index order (reports)

    def __getitem__(self, split: str) -> datasets.Dataset:
        return self.splits[split]

    def add_extra_split(self, source: ExtraEvaluationSet) -> str:
        """Load, check and tokenize an extra evaluation set once, like the test split; the split name it gets."""
        name = f"extra:{source.display_name}"
        if name not in self.splits:
            self.splits[name], self.texts[name] = load_extra_split(self.task, source, self.tokenizer, self.label_names)
        return name

    def dataloader(
        self, split: str, batch_size: int, shuffle: bool = False, seed: int = 0, group_by_length: bool = True
    ) -> DataLoader:
        dataset = self.splits[split]
        lengths = [len(ids) for ids in dataset["input_ids"]]
        sampler = LengthGroupedBatchSampler(lengths, batch_size, shuffle, seed, group_by_length)
        if self.task.type == "causal-lm":
            collate = default_data_collator
        else:
            collate = DataCollatorWithPadding(self.tokenizer, return_tensors="pt")
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)


class LengthGroupedBatchSampler(Sampler):
    """Batches of similar length (less padding), in a random order that is a pure function of (seed, epoch).

    Shuffled: rows are permuted, cut into mega-batches of 50 batches, sorted by length inside each, then the
    batches are shuffled. Not shuffled (evaluation): sorted by length, longest first.
    """

    def __init__(self, lengths, batch_size: int, shuffle: bool, seed: int = 0, group_by_length: bool = True):
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.group_by_length = group_by_length
        self.drop_last = False
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def __iter__(self):
        if not self.shuffle:
            order = np.argsort(-self.lengths, kind="stable") if self.group_by_length else np.arange(len(self.lengths))
            yield from self._cut(order)
            return
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.lengths))
        if self.group_by_length:
            mega = self.batch_size * 50
            order = np.concatenate(
                [chunk[np.argsort(-self.lengths[chunk], kind="stable")] for chunk in np.split(order, range(mega, len(order), mega))]
            )
        batches = list(self._cut(order))
        for index in rng.permutation(len(batches)):
            yield batches[index]

    def _cut(self, order):
        for start in range(0, len(order), self.batch_size):
            yield order[start : start + self.batch_size].tolist()


# ---------------------------------------------------------------------------------------------- loading


MIN_EXAMPLES_PER_CLASS = 10  # fewer, and a class's test scores are noise: a warning names it


@dataclass
class DataReport:
    """What loading did to the data, one line per fact naming the file, column and values. The run logs it
    (notes as info, warnings as warnings) and keeps it in results.json under task.data."""

    rows_dropped: dict[str, int] = field(default_factory=dict)  # why -> how many rows
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    class_counts: dict[str, int] = field(default_factory=dict)  # rows per class, all splits, after dropping
    split_sizes: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str, rows: int, line: str, warn: bool = True) -> None:
        self.rows_dropped[reason] = self.rows_dropped.get(reason, 0) + rows
        (self.warnings if warn else self.notes).append(line)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class PreparedData:
    """The data before tokenization: the raw dataset (incomplete rows dropped) and, for classification, the
    label-encoded splits."""

    raw: datasets.DatasetDict
    splits: dict[str, datasets.Dataset]
    label_names: list[str] | None
    report: DataReport


def load_task_data(task: TaskOptions, tokenizer, seed: int) -> TaskData:
    prepared = prepare_task_data(task, seed)
    if task.type == "causal-lm":
        return TaskData(task, tokenizer, _causal_lm_splits(task, prepared.raw, tokenizer), report=prepared.report)
    tokenized = {name: _tokenize_classification(task, split, tokenizer) for name, split in prepared.splits.items()}
    texts = {name: split[task.text_column] for name, split in prepared.splits.items()}
    return TaskData(task, tokenizer, tokenized, prepared.label_names, prepared.report, texts)


def prepare_task_data(task: TaskOptions, seed: int) -> PreparedData:
    """Everything before tokenization: load, check the columns, drop incomplete rows, check and encode the
    labels, split. Bad data fails here with one line; `hfcompress validate` runs this alone."""
    raw = load_raw_dataset(task)
    _check_columns(task, raw)
    report = DataReport()
    if task.type == "causal-lm":  # empty lines are part of a text corpus; None texts are skipped when joining
        return PreparedData(raw, {}, None, report)
    raw = _drop_incomplete_rows(task, raw, report)
    raw, label_names = _encode_labels(task, raw, report)
    splits = _choose_splits(task, raw, seed)
    splits = {name: _limit(task, name, split, seed) for name, split in splits.items()}
    _check_splits(task, splits, label_names, report)
    return PreparedData(raw, splits, label_names, report)


def load_extra_split(task: TaskOptions, source: ExtraEvaluationSet, tokenizer, label_names: list[str] | None):
    """An extra evaluation set: one split of another source with the task's columns, checked like the task's data
    (incomplete rows and labels outside the task's label set dropped, counted and logged) and tokenized."""
    dataset = DatasetSource.model_validate(source.model_dump(include=set(DatasetSource.model_fields)))
    extra = task.model_copy(update={"dataset": dataset, "label_names": label_names,
                                    "splits": SplitOptions(train=source.split),
                                    "text_column": source.text_column or task.text_column,
                                    "label_column": source.label_column or task.label_column,
                                    "max_eval_samples": source.max_samples or task.max_eval_samples})
    raw = load_raw_dataset(extra)
    _check_columns(extra, raw)
    raw = datasets.DatasetDict({source.split: raw[source.split]})
    if task.type == "causal-lm":
        return _blocks_dataset(extra, "test", _token_blocks(raw[source.split], extra, tokenizer)), []
    report = DataReport()
    raw = _drop_incomplete_rows(extra, raw, report)
    if source.label_map:
        raw = raw.map(lambda value: {extra.label_column: source.label_map.get(str(value), str(value))},
                      input_columns=extra.label_column)
    raw, _ = _encode_labels(extra, raw, report)
    split = _limit(extra, "test", raw[source.split], seed=0)
    if len(split) == 0:
        raise HfCompressError(f"{source_name(extra)}: the extra evaluation set has no rows left to use")
    for line in report.notes:
        logger.info("extra evaluation set %s", line)
    for line in report.warnings:
        logger.warning("extra evaluation set %s", line)
    return _tokenize_classification(extra, split, tokenizer), split[extra.text_column]


def load_split_texts(task: TaskOptions, split: str, seed: int) -> list[str]:
    """A classification split's texts, whole (not truncated), in the order `load_task_data` gives its examples."""
    if task.type == "causal-lm":
        raise HfCompressError("load_split_texts: causal-lm splits are token blocks, not texts")
    return list(prepare_task_data(task, seed).splits[split][task.text_column])


def load_raw_dataset(task: TaskOptions) -> datasets.DatasetDict:
    source = task.dataset
    data_files = resolve_data_files(source.data_files)
    try:
        loaded = datasets.load_dataset(source.path, source.name, data_files=data_files, revision=source.revision,
                                       **source.load_options)
    except Exception as error:  # datasets raises many types; the user needs the source and the reason
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise HfCompressError(f"task.dataset: cannot load {source.describe()!r}: {reason}") from None
    if not isinstance(loaded, datasets.DatasetDict):
        loaded = datasets.DatasetDict({"train": loaded})
    return loaded


def source_name(task: TaskOptions, split: str | None = None) -> str:
    """How messages name where data came from: the data file(s) as the recipe gives them, or the dataset."""
    files = task.dataset.data_files
    if isinstance(files, dict):
        files = files.get(split) if split in files else list(files.values())
    if isinstance(files, str):
        return files
    if files:
        return ", ".join(str(f) for f in files)
    return task.dataset.describe() + (f" split {split!r}" if split else "")


def _check_columns(task: TaskOptions, raw: datasets.DatasetDict) -> None:
    train_name = task.splits.train
    where = source_name(task)
    if train_name not in raw:
        raise HfCompressError(
            f"task.splits.train: split {train_name!r} not in dataset {where} (splits: {', '.join(raw)})")
    columns = raw[train_name].column_names
    wanted = {"task.text_column": task.text_column}
    if task.type == "text-classification":
        wanted["task.label_column"] = task.label_column
    wanted["task.splits.group_by"] = task.splits.group_by
    wanted.update({f"task.splits.keep_identical[{i}]": c for i, c in enumerate(task.splits.keep_identical)})
    for key, column in wanted.items():
        if column is not None and column not in columns:
            raise HfCompressError(f"{key}: column {column!r} not in dataset {where} (columns: {', '.join(columns)})")
    text_feature = raw[train_name].features[task.text_column]
    if getattr(text_feature, "dtype", None) not in ("string", "large_string", "null"):
        raise HfCompressError(
            f"task.text_column: column {task.text_column!r} of {where} holds {_feature_type(text_feature)}, not text")


def _feature_type(feature) -> str:
    return getattr(feature, "dtype", None) or type(feature).__name__


def _drop_incomplete_rows(task: TaskOptions, raw: datasets.DatasetDict, report: DataReport) -> datasets.DatasetDict:
    """Rows without a text or a label can be neither trained on nor scored: drop and count them, or refuse them
    when `task.drop_incomplete_rows` is false."""
    kept = {}
    for split_name, split in raw.items():
        missing_label = _missing_label_value(split.features[task.label_column])
        incomplete = {
            task.text_column: [i for i, text in enumerate(split[task.text_column]) if _is_blank(text)],
            task.label_column: [i for i, value in enumerate(split[task.label_column])
                                if _is_blank(value) or value == missing_label],
        }
        for column, rows in incomplete.items():
            if not rows:
                continue
            problem = (f"{source_name(task, split_name)}: {len(rows)} of {len(split)} rows "
                       f"{'has' if len(rows) == 1 else 'have'} an empty {column!r} ({_rows(rows)})")
            if not task.drop_incomplete_rows:
                raise HfCompressError(f"{problem}; set task.drop_incomplete_rows: true to drop them")
            report.drop(f"empty {column!r}", len(rows), f"{problem}: dropped")
        dropped = set().union(*incomplete.values())
        kept[split_name] = split.select([i for i in range(len(split)) if i not in dropped]) if dropped else split
    return datasets.DatasetDict(kept)


def _missing_label_value(feature):
    """ClassLabel columns mark a missing label with -1 (e.g. GLUE test splits)."""
    return -1 if isinstance(feature, datasets.ClassLabel) else None


def _is_blank(value) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _rows(indices: list[int], shown: int = 5) -> str:
    """1-based row numbers (the header of a CSV not counted), the first few."""
    numbers = ", ".join(str(i + 1) for i in indices[:shown])
    more = f" and {len(indices) - shown} more" if len(indices) > shown else ""
    return f"row{'s' if len(indices) > 1 else ''} {numbers}{more}"


def _encode_labels(task: TaskOptions, raw: datasets.DatasetDict, report: DataReport):
    """Map the label column to ids 0..n-1 following `task.label_names`; rows with other labels are dropped."""
    column = task.label_column
    where = source_name(task)
    feature = raw[task.splits.train].features[column]
    if isinstance(feature, datasets.ClassLabel):
        names = feature.names
        if task.label_names is not None and len(task.label_names) != len(names):
            raise HfCompressError(
                f"task.label_names: {len(task.label_names)} names given, but column {column!r} of {where} has "
                f"{len(names)} classes ({', '.join(names)})"
            )
        names = task.label_names or names
        counts = Counter(names[value] for split in raw.values() for value in split[column])
        _check_classes(where, column, names, counts, report)
        return raw.rename_column(column, "labels") if column != "labels" else raw, names

    counts = Counter(str(value) for split in raw.values() for value in split[column])
    _check_spelling(where, column, counts)
    names = task.label_names or sorted(counts)
    for index, name in enumerate(names):
        if name not in counts:
            raise HfCompressError(
                f"task.label_names[{index}]: label {name!r} does not occur in column {column!r} of {where} "
                f"(found: {', '.join(sorted(counts))})"
            )
    label_id = {name: index for index, name in enumerate(names)}
    others = {value: count for value, count in counts.most_common() if value not in label_id}
    if others:
        listed = ", ".join(f"{value!r} ({count})" for value, count in others.items())
        report.drop("label not in task.label_names", sum(others.values()),
                    f"{where}: dropped {_plural(sum(others.values()), 'row')} whose {column!r} is not in task.label_names: {listed}",
                    warn=False)
        raw = raw.filter(lambda value: str(value) in label_id, input_columns=column)
    _check_classes(where, column, names, counts, report)
    encoded = raw.map(lambda value: {"labels": label_id[str(value)]}, input_columns=column)
    return encoded, names


def _check_spelling(where: str, column: str, counts: Counter) -> None:
    """Labels that differ only in case or surrounding spaces ("Pos" beside "pos") are almost surely one class."""
    variants: dict[str, list[str]] = {}
    for value in sorted(counts):
        variants.setdefault(value.strip().casefold(), []).append(value)
    clashes = [values for values in variants.values() if len(values) > 1]
    if clashes:
        listed = "; ".join(" beside ".join(f"{value!r} ({_plural(counts[value], 'row')})" for value in values) for values in clashes)
        raise HfCompressError(
            f"{where}: column {column!r} has labels that differ only in case or spaces: {listed}; "
            f"make them one label in the file")


def _check_classes(where: str, column: str, names: list[str], counts: Counter, report: DataReport) -> None:
    report.class_counts = {name: counts[name] for name in names}
    if len(names) < 2:
        raise HfCompressError(
            f"{where}: column {column!r} has a single class, {names[0]!r} ({_plural(counts[names[0]], 'row')}): "
            f"a classifier needs at least two")
    rare = {name: counts[name] for name in names if counts[name] < MIN_EXAMPLES_PER_CLASS}
    if rare:
        listed = ", ".join(f"{name!r} ({count})" for name, count in rare.items())
        report.warnings.append(
            f"{where}: column {column!r} has classes with fewer than {MIN_EXAMPLES_PER_CLASS} rows: {listed}; "
            f"their scores will be noise")


def _check_splits(task: TaskOptions, splits: dict[str, datasets.Dataset], names: list[str], report: DataReport) -> None:
    """Every split must have rows; a class missing from a split is a warning (its per-class scores are undefined)."""
    for split_name, split in splits.items():
        where = source_name(task, getattr(task.splits, split_name) or task.splits.train)
        if len(split) == 0:
            raise HfCompressError(f"{where}: the {split_name} split has no rows left to use")
        report.split_sizes[split_name] = len(split)
        present = set(split["labels"])
        absent = [name for index, name in enumerate(names) if index not in present]
        if absent:
            report.warnings.append(
                f"{where}: the {split_name} split ({len(split)} rows) has no {task.label_column!r} example of "
                f"{', '.join(repr(name) for name in absent)}")


def _choose_splits(task: TaskOptions, raw: datasets.DatasetDict, seed: int) -> dict[str, datasets.Dataset]:
    options = task.splits
    named = {"validation": options.validation, "test": options.test}
    for split, source_name in named.items():
        if source_name is not None and source_name not in raw:
            raise HfCompressError(
                f"task.splits.{split}: split {source_name!r} not in dataset (splits: {', '.join(raw)})"
            )
    train = raw[options.train]
    missing = {split: getattr(options, f"{split}_size") for split, name in named.items() if name is None}
    parts = {split: raw[name] for split, name in named.items() if name is not None}
    if missing:
        group_columns = [c for c in [options.group_by, *options.keep_identical] if c]
        groups = connected_groups([train[c] for c in group_columns]) if group_columns else None
        indices = split_indices(len(train), missing, seed, groups)
        parts.update({split: train.select(indices[split]) for split in missing})
        train = train.select(indices["train"])
    return {"train": train, **parts}


def _limit(task: TaskOptions, split: str, dataset: datasets.Dataset, seed: int) -> datasets.Dataset:
    limit = task.max_train_samples if split == "train" else task.max_eval_samples
    if limit is None or limit >= len(dataset):
        return dataset
    return dataset.shuffle(seed=seed).select(range(limit)).flatten_indices()


def _tokenize_classification(task: TaskOptions, dataset: datasets.Dataset, tokenizer) -> datasets.Dataset:
    dataset = dataset.flatten_indices().add_column("example_index", list(range(len(dataset))))

    def tokenize(batch):
        return tokenizer(batch[task.text_column], truncation=True, max_length=task.max_length)

    keep = {"labels", "example_index"}
    return dataset.map(
        tokenize, batched=True, remove_columns=[c for c in dataset.column_names if c not in keep], desc="tokenize"
    )


def _causal_lm_splits(task: TaskOptions, raw: datasets.DatasetDict, tokenizer) -> dict[str, datasets.Dataset]:
    """Concatenate the text and cut it into blocks of `max_length` tokens; missing splits are the last blocks."""
    options = task.splits
    named = {"validation": options.validation, "test": options.test}
    sources = {"train": options.train, **{k: v for k, v in named.items() if v is not None}}
    blocks = {split: _token_blocks(raw[name], task, tokenizer) for split, name in sources.items()}
    missing = [split for split, name in named.items() if name is None]
    if missing:
        train = blocks["train"]
        counts = {split: max(1, round(getattr(options, f"{split}_size") * len(train))) for split in missing}
        end = len(train)
        for split in reversed(missing):  # test last, validation before it: contiguous, no overlap
            blocks[split] = train[end - counts[split] : end]
            end -= counts[split]
        blocks["train"] = train[:end]
        if end < 1:
            raise HfCompressError(f"task.max_length: {task.max_length} tokens per block leaves no training blocks")
    return {split: _blocks_dataset(task, split, rows) for split, rows in blocks.items()}


def _token_blocks(dataset: datasets.Dataset, task: TaskOptions, tokenizer) -> list[list[int]]:
    texts = [text for text in dataset[task.text_column] if text is not None]
    ids = tokenizer("\n".join(texts), add_special_tokens=False)["input_ids"]
    size = task.max_length
    return [ids[start : start + size] for start in range(0, len(ids) - size + 1, size)]


def _blocks_dataset(task: TaskOptions, split: str, blocks: list[list[int]]) -> datasets.Dataset:
    limit = task.max_train_samples if split == "train" else task.max_eval_samples
    blocks = blocks[:limit] if limit else blocks
    return datasets.Dataset.from_dict(
        {
            "input_ids": blocks,
            "attention_mask": [[1] * len(block) for block in blocks],
            "labels": blocks,
            "example_index": list(range(len(blocks))),
        }
    )


def batch_to_model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch without bookkeeping keys (example_index) that models do not accept."""
    return {key: value for key, value in batch.items() if key != "example_index"}

