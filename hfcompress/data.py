"""Task data: load any `datasets` source, split it deterministically, tokenize once, batch with dynamic padding."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler
from transformers import DataCollatorWithPadding, default_data_collator

from .errors import HfCompressError
from .recipe import TaskOptions
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

    def __getitem__(self, split: str) -> datasets.Dataset:
        return self.splits[split]

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


def load_task_data(task: TaskOptions, tokenizer, seed: int) -> TaskData:
    raw = load_raw_dataset(task)
    _check_columns(task, raw)
    if task.type == "causal-lm":
        return TaskData(task, tokenizer, _causal_lm_splits(task, raw, tokenizer))
    splits, label_names = _classification_splits(task, raw, seed)
    tokenized = {name: _tokenize_classification(task, split, tokenizer) for name, split in splits.items()}
    return TaskData(task, tokenizer, tokenized, label_names)


def load_split_texts(task: TaskOptions, split: str, seed: int) -> list[str]:
    """A classification split's texts, whole (not truncated), in the order `load_task_data` gives its examples."""
    if task.type == "causal-lm":
        raise HfCompressError("load_split_texts: causal-lm splits are token blocks, not texts")
    raw = load_raw_dataset(task)
    _check_columns(task, raw)
    splits, _ = _classification_splits(task, raw, seed)
    return list(splits[split][task.text_column])


def _classification_splits(task: TaskOptions, raw: datasets.DatasetDict, seed: int):
    raw, label_names = _encode_labels(task, raw)
    splits = _choose_splits(task, raw, seed)
    return {name: _limit(task, name, split, seed) for name, split in splits.items()}, label_names


def load_raw_dataset(task: TaskOptions) -> datasets.DatasetDict:
    source = task.dataset
    data_files = resolve_data_files(source.data_files)
    try:
        loaded = datasets.load_dataset(source.path, source.name, data_files=data_files, revision=source.revision)
    except Exception as error:  # datasets raises many types; the user needs the source and the reason
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise HfCompressError(f"task.dataset: cannot load {source.describe()!r}: {reason}") from None
    if not isinstance(loaded, datasets.DatasetDict):
        loaded = datasets.DatasetDict({"train": loaded})
    return loaded


def _check_columns(task: TaskOptions, raw: datasets.DatasetDict) -> None:
    train_name = task.splits.train
    if train_name not in raw:
        raise HfCompressError(f"task.splits.train: split {train_name!r} not in dataset (splits: {', '.join(raw)})")
    columns = raw[train_name].column_names
    wanted = {"task.text_column": task.text_column}
    if task.type == "text-classification":
        wanted["task.label_column"] = task.label_column
    wanted["task.splits.group_by"] = task.splits.group_by
    wanted.update({f"task.splits.keep_identical[{i}]": c for i, c in enumerate(task.splits.keep_identical)})
    for key, column in wanted.items():
        if column is not None and column not in columns:
            raise HfCompressError(f"{key}: column {column!r} not in dataset (columns: {', '.join(columns)})")


def _encode_labels(task: TaskOptions, raw: datasets.DatasetDict):
    """Map the label column to ids 0..n-1 following `task.label_names`; rows with other labels are dropped."""
    column = task.label_column
    feature = raw[task.splits.train].features[column]
    if isinstance(feature, datasets.ClassLabel):
        names = feature.names
        if task.label_names is not None and len(task.label_names) != len(names):
            raise HfCompressError(
                f"task.label_names: {len(task.label_names)} names given, but column {column!r} has "
                f"{len(names)} classes ({', '.join(names)})"
            )
        return raw.rename_column(column, "labels") if column != "labels" else raw, task.label_names or names

    present = sorted({str(value) for split in raw.values() for value in split[column]})
    names = task.label_names or present
    for index, name in enumerate(names):
        if name not in present:
            raise HfCompressError(
                f"task.label_names[{index}]: label {name!r} does not occur in column {column!r} "
                f"(found: {', '.join(present)})"
            )
    label_id = {name: index for index, name in enumerate(names)}
    kept = raw.filter(lambda value: str(value) in label_id, input_columns=column)
    dropped = sum(len(split) for split in raw.values()) - sum(len(split) for split in kept.values())
    if dropped:
        logger.info("dropped %d rows whose %r is not one of %s", dropped, column, names)
    encoded = kept.map(lambda value: {"labels": label_id[str(value)]}, input_columns=column)
    return encoded, names


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

