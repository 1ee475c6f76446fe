"""Save pruned models, and load checkpoints whose per-layer shapes only the structure record describes."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, PreTrainedModel
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from ..errors import HfCompressError
from ..fileio import read_json, write_json
from .structure import STRUCTURE_FILE, apply_structure, needs_structure_record, structure_record

# from_pretrained keywords that also make sense when the model is built from its config.
BUILD_KEYWORDS = ("dtype", "torch_dtype", "attn_implementation")


def save_pruned(model: PreTrainedModel, folder: str | Path, **save_pretrained_kwargs) -> None:
    """`save_pretrained`, plus `pruning_structure.json` when the config cannot describe every block.

    Safe to call on any model: without per-layer shapes it is a plain `save_pretrained` (and removes a stale
    record left in the folder by an earlier save).
    """
    folder = Path(folder)
    model.save_pretrained(folder, **save_pretrained_kwargs)
    write_structure_record(model, folder)


def write_structure_record(model: PreTrainedModel, folder: Path) -> None:
    """`pruning_structure.json` in `folder` when the config cannot describe every block; else remove a stale one.

    Shapes come from the layers' in/out features, which quantized Linear layers keep too.
    """
    record_path = Path(folder) / STRUCTURE_FILE
    if needs_structure_record(model):
        write_json(record_path, structure_record(model))
    else:
        record_path.unlink(missing_ok=True)


def load_pruned(path: str | Path, model_class, **from_pretrained_kwargs) -> PreTrainedModel:
    """Load a checkpoint written by `save_pruned`, with or without a structure record.

    The model is built from config.json, sliced to the recorded per-layer shapes, then given the saved weights.
    `model_class` is an Auto class or a concrete model class. Of the `from_pretrained` keywords, `dtype`,
    `attn_implementation`, a single-device `device_map` (e.g. "cpu") and the label set (`num_labels`, `id2label`,
    `label2id`, which go to the config as `from_pretrained` passes them) are honoured.
    """
    folder = Path(path)
    kwargs = dict(from_pretrained_kwargs)
    labels = {key: kwargs.pop(key) for key in LABEL_KEYWORDS if key in kwargs}
    build_kwargs, device = _split_kwargs(kwargs)
    model = model_class.from_config(AutoConfig.from_pretrained(folder, **labels), **build_kwargs)
    record_path = folder / STRUCTURE_FILE
    if record_path.is_file():
        apply_structure(model, read_json(record_path))
    _load_weights(model, folder)
    if device is not None:
        model.to(device)
    return model.eval()


LABEL_KEYWORDS = ("num_labels", "id2label", "label2id")


def _split_kwargs(kwargs: dict) -> tuple[dict, str | torch.device | None]:
    kwargs = dict(kwargs)
    device = kwargs.pop("device_map", None)
    if device is not None and not isinstance(device, str | torch.device):
        raise HfCompressError("load_pruned: device_map must name one device (e.g. 'cpu'), not a per-module map")
    unsupported = sorted(set(kwargs) - set(BUILD_KEYWORDS))
    if unsupported:
        raise HfCompressError(f"load_pruned: from_pretrained arguments not supported for pruned models: {unsupported}")
    if kwargs.get("dtype") == "auto":  # "auto" means the saved dtype, which from_config uses anyway
        del kwargs["dtype"]
    return kwargs, device


def _load_weights(model: PreTrainedModel, folder: Path) -> None:
    try:
        result = model.load_state_dict(read_weights(folder), strict=False)
    except RuntimeError as error:  # shape mismatches
        raise HfCompressError(
            f"{folder}: the saved weights do not fit the model built from config.json ({_mismatch(error)}); "
            f"a pruned model saved without {STRUCTURE_FILE}? Save pruned models with save_pruned"
        ) from None
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    missing = sorted(set(result.missing_keys) - tied)
    if missing or result.unexpected_keys:
        raise HfCompressError(
            f"{folder}: weights do not match the model (missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})"
        )
    model.tie_weights()


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors `save_pretrained` wrote: model.safetensors, or the shards its index names."""
    folder = Path(folder)
    if (folder / SAFE_WEIGHTS_NAME).is_file():
        return load_file(folder / SAFE_WEIGHTS_NAME)
    index = folder / SAFE_WEIGHTS_INDEX_NAME
    if not index.is_file():
        raise HfCompressError(f"{folder}: no {SAFE_WEIGHTS_NAME} (or sharded index) to load")
    weights = {}
    for shard in sorted(set(read_json(index)["weight_map"].values())):
        weights.update(load_file(folder / shard))
    return weights


def _mismatch(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return next((line for line in lines if line.startswith("size mismatch")), lines[0] if lines else "shape mismatch")
