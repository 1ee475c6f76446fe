"""The teacher's logits, computed once over the training set and looked up per batch by `example_index`.

Classification keeps every example's full logits ([num_labels], float32). Language modelling keeps, per token,
the full logits or only the top-k (values and token ids), in float16 to save space: a cache of top-32 costs
192 bytes per token. Batches may come shuffled and dynamically padded (on the right): `lookup` pads or crops
each example's per-token rows to the batch's sequence length.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from ..errors import HfCompressError


def model_inputs(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The batch as a model takes it: without `example_index` (bookkeeping) and `labels` (the losses read them;
    passed on, the model would compute its own loss for nothing)."""
    return {name: tensor for name, tensor in batch.items() if name not in ("labels", "example_index")}


@dataclass
class CachedTeacherOutputs:
    """What the losses read from a teacher output, for one batch. Either `logits`, or the top-k pair."""

    logits: Tensor | None = None  # [batch, classes] or [batch, positions, vocabulary]
    top_k_values: Tensor | None = None  # [batch, positions, k]: the teacher's k largest logits
    top_k_indices: Tensor | None = None  # [batch, positions, k]: their token ids
    hidden_states = None  # never cached: hidden-state and attention losses need the live teacher
    attentions = None


class TeacherCache:
    """Per-example rows stored back to back: example i owns rows offsets[i]:offsets[i + 1]
    (one row for classification, one per token for language modelling)."""

    def __init__(self, tensors: dict[str, Tensor], offsets: Tensor, token_level: bool, fingerprint: str = ""):
        self.tensors = tensors  # "logits", or "top_k_values" and "top_k_indices"
        self.offsets = offsets
        self.token_level = token_level
        self.fingerprint = fingerprint

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def top_k(self) -> int | None:
        return self.tensors["top_k_values"].shape[-1] if "top_k_values" in self.tensors else None

    def lookup(self, example_index: Tensor, sequence_length: int | None = None) -> CachedTeacherOutputs:
        """The cached outputs of these examples, on `example_index`'s device. Token-level rows are padded with
        zeros or cropped to `sequence_length` (default: the longest of these examples)."""
        indices = example_index.tolist()
        bad = [index for index in indices if not 0 <= index < len(self)]
        if bad:
            raise HfCompressError(
                f"example_index {bad[0]} is not in the teacher cache ({len(self)} examples): "
                "the cache was computed on another training set"
            )
        rows = {name: [self._rows(tensor, i) for i in indices] for name, tensor in self.tensors.items()}
        if self.token_level:
            length = sequence_length or max(len(example) for example in next(iter(rows.values())))
            batch = {name: torch.stack([_fit(e, length) for e in examples]) for name, examples in rows.items()}
        else:
            batch = {name: torch.cat(examples) for name, examples in rows.items()}
        batch = {name: _for_losses(tensor).to(example_index.device) for name, tensor in batch.items()}
        return CachedTeacherOutputs(**batch)

    def _rows(self, tensor: Tensor, example: int) -> Tensor:
        return tensor[self.offsets[example] : self.offsets[example + 1]]

    def save(self, path: str | Path) -> None:
        metadata = {"fingerprint": self.fingerprint, "token_level": json.dumps(self.token_level)}
        save_file({**self.tensors, "offsets": self.offsets}, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | Path) -> TeacherCache:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata()
            tensors = {name: file.get_tensor(name) for name in file.keys()}
        offsets = tensors.pop("offsets")
        return cls(tensors, offsets, json.loads(metadata["token_level"]), metadata["fingerprint"])


@torch.inference_mode()
def cache_teacher_logits(teacher, dataloader, top_k: int | None = None, fingerprint: str = "") -> TeacherCache:
    """Run the teacher once over every example of `dataloader` (batches carry `example_index`, padded on the right)."""
    teacher.eval()
    device = next(teacher.parameters()).device
    per_example: dict[int, dict[str, Tensor]] = {}
    token_level = False
    for batch in tqdm(dataloader, desc="teacher outputs", leave=False):
        batch = {name: tensor.to(device) for name, tensor in batch.items()}
        logits = teacher(**model_inputs(batch)).logits
        token_level = logits.ndim == 3
        lengths = _right_padded_lengths(batch["attention_mask"]) if token_level else [1] * len(logits)
        for row, (index, length) in enumerate(zip(batch["example_index"].tolist(), lengths, strict=True)):
            example = logits[row, :length] if token_level else logits[row : row + 1]
            per_example[index] = _stored(example, top_k, torch.float16 if token_level else torch.float32)
    return _assemble(per_example, token_level, fingerprint)


def cached_teacher_logits(
    path: str | Path, teacher, dataloader, top_k: int | None = None, fingerprint: str = "", save: bool = True
) -> TeacherCache:
    """The cache saved at `path` when its fingerprint matches; otherwise computed now and saved there (unless
    `save` is False: another process saves it)."""
    path = Path(path)
    if path.is_file():
        cache = TeacherCache.load(path)
        if cache.fingerprint == fingerprint:
            return cache
    cache = cache_teacher_logits(teacher, dataloader, top_k, fingerprint)
    if not save:
        return cache
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")  # an interrupted save never leaves a half-written cache
    cache.save(partial)
    partial.replace(path)
    return cache


def teacher_fingerprint(teacher, *data_description) -> str:
    """A digest of the teacher (config and a checksum of every weight) and whatever describes the data and
    settings (dataset fingerprint, max length, top-k): a cache is reused only when all of them match."""
    digest = hashlib.sha256(teacher.config.to_json_string().encode())
    with torch.no_grad():
        for name, tensor in teacher.state_dict().items():
            digest.update(f"{name}{tuple(tensor.shape)}{tensor.double().sum().item():.10e}".encode())
    digest.update(json.dumps(data_description, default=str).encode())
    return digest.hexdigest()[:16]


def _stored(logits: Tensor, top_k: int | None, dtype: torch.dtype) -> dict[str, Tensor]:
    if top_k is None:
        return {"logits": logits.to("cpu", dtype)}
    values, indices = logits.topk(min(top_k, logits.shape[-1]), dim=-1)
    return {"top_k_values": values.to("cpu", dtype), "top_k_indices": indices.to("cpu", torch.int32)}


def _assemble(per_example: dict[int, dict[str, Tensor]], token_level: bool, fingerprint: str) -> TeacherCache:
    count = len(per_example)
    if sorted(per_example) != list(range(count)):
        missing = sorted(set(range(max(per_example, default=-1) + 1)) - set(per_example))
        raise HfCompressError(
            f"teacher cache: the dataloader must cover example_index 0..n-1 (missing {missing[:5]})"
        )
    examples = [per_example[index] for index in range(count)]
    lengths = torch.tensor([0] + [len(next(iter(example.values()))) for example in examples])
    tensors = {name: torch.cat([example[name] for example in examples]) for name in examples[0]} if examples else {}
    return TeacherCache(tensors, lengths.cumsum(0), token_level, fingerprint)


def _right_padded_lengths(attention_mask: Tensor) -> list[int]:
    lengths = attention_mask.sum(dim=1)
    leading_ones = attention_mask.cumprod(dim=1).sum(dim=1)  # equals the length only when padding is on the right
    if not torch.equal(lengths, leading_ones):
        raise HfCompressError("teacher cache: batches must be padded on the right (tokenizer.padding_side = 'right')")
    return lengths.tolist()


def _fit(example: Tensor, length: int) -> Tensor:
    """Crop or zero-pad per-token rows to `length`; padded rows are masked out by the losses."""
    if len(example) >= length:
        return example[:length]
    padding = example.new_zeros((length - len(example), *example.shape[1:]))
    return torch.cat([example, padding])


def _for_losses(tensor: Tensor) -> Tensor:
    return tensor.long() if tensor.dtype == torch.int32 else tensor.float()
