"""Save pruned models, and load checkpoints whose per-layer shapes only `config.pruning_structure` describes."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, PreTrainedModel
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from ..errors import HfCompressError, first_line
from ..fileio import read_json
from ..modeling_hfcompress import compressed_class
from .adapters import is_supported
from .structure import needs_remote_code, record_structure, set_original_layer_indices, structure_of

TRANSFORMERS_LOADING_LOGGER = logging.getLogger("transformers.modeling_utils")
# from_pretrained keywords about loading rather than about the config (which takes the others, e.g. num_labels).
LOADING_KEYWORDS = ("dtype", "torch_dtype", "device_map", "attn_implementation", "quantization_config",
                    "output_loading_info", "trust_remote_code", "revision", "token", "cache_dir", "force_download",
                    "local_files_only", "low_cpu_mem_usage", "ignore_mismatched_sizes", "gguf_file")


def save_pruned(model: PreTrainedModel, folder: str | Path, **save_pretrained_kwargs) -> None:
    """`save_pretrained`, making sure config.json carries the pruning structure when the blocks differ in shape
    (plain `save_pretrained` does the same for a model pruned with this package)."""
    if is_supported(model):
        record_structure(model)
    model.save_pretrained(Path(folder), **save_pretrained_kwargs)


def load_pruned(path: str | Path, model_class, **from_pretrained_kwargs) -> PreTrainedModel:
    """Load a checkpoint whose config.json may carry a pruning structure.

    The model is built from config.json, cut to the recorded per-layer shapes, then given the saved weights, all
    inside transformers' `from_pretrained` (so its keywords work: `dtype`, `device_map`, `quantization_config`...),
    by the `Compressed<Class>` of the modeling file published with such checkpoints (which also restores
    optimum-quanto weights). `model_class` is an Auto class or a concrete model class.
    """
    folder = Path(path)
    config, from_pretrained_kwargs = _config_and_loading_kwargs(folder, from_pretrained_kwargs)
    structure = structure_of(config)
    if needs_remote_code(config):
        model_class = compressed_class(concrete_class(model_class, config))
    loaded = load_checked(model_class, folder, config=config, **from_pretrained_kwargs)
    if structure is not None:
        set_original_layer_indices(loaded[0] if isinstance(loaded, tuple) else loaded, structure["layers_kept"])
    return loaded


def _config_and_loading_kwargs(folder: Path, kwargs: dict) -> tuple:
    """The config `from_pretrained` would build (config.json plus keywords such as `num_labels`), and the keywords
    left for loading. Passing the config explicitly lets the pruning structure be added to it."""
    kwargs = dict(kwargs)
    config = kwargs.pop("config", None)
    if config is not None:
        return config, kwargs
    loading = {key: kwargs.pop(key) for key in LOADING_KEYWORDS if key in kwargs}
    config, unused = AutoConfig.from_pretrained(folder, return_unused_kwargs=True, **kwargs)
    return config, {**unused, **loading}


def concrete_class(model_class, config) -> type[PreTrainedModel]:
    """The transformers class an Auto class picks for `config` (a concrete class is returned as it is)."""
    mapping = getattr(model_class, "_model_mapping", None)
    return mapping[type(config)] if mapping is not None else model_class


def load_checked(model_class, path: str | Path, **from_pretrained_kwargs) -> PreTrainedModel:
    """`model_class.from_pretrained(path)`, where weights that do not fit the model config.json builds give one line
    naming the first such tensor and both shapes, instead of transformers' table of all of them."""
    with held_load_report() as report:
        try:
            loaded = model_class.from_pretrained(str(path), **from_pretrained_kwargs)
        except RuntimeError as error:
            if "mismatch" not in str(error):
                raise
            raise HfCompressError(_first_mismatch(model_class, path, from_pretrained_kwargs.get("config"))
                                  or f"{path}: {first_line(error)}") from None
        except ValueError as error:  # e.g. a malformed pruning_structure, raised while the model is built
            raise HfCompressError(f"{path}: {first_line(error)}") from None
    report.release()
    (loaded[0] if isinstance(loaded, tuple) else loaded).eval()  # (model, loading info) with output_loading_info
    return loaded


class _HeldRecords(logging.Filter):
    """Holds back the log records of transformers' loading report (a table of unexpected/missing/mismatched keys)."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in record.getMessage():
            self.records.append(record)
            return False
        return True

    def release(self) -> None:
        """Log the held records after all (the load went through and the report may matter)."""
        for record in self.records:
            if TRANSFORMERS_LOADING_LOGGER.isEnabledFor(record.levelno):  # handle() alone skips the level check
                TRANSFORMERS_LOADING_LOGGER.handle(record)


@contextmanager
def held_load_report():
    """Hold transformers' loading report back while loading; `.release()` it, or let it drop."""
    held = _HeldRecords()
    TRANSFORMERS_LOADING_LOGGER.addFilter(held)
    try:
        yield held
    finally:
        TRANSFORMERS_LOADING_LOGGER.removeFilter(held)


def _first_mismatch(model_class, path: str | Path, config=None) -> str | None:
    """'<path>: config.json and the weights disagree: <tensor> is [..] in the checkpoint but [..] in the model'."""
    config = config if config is not None else AutoConfig.from_pretrained(str(path))
    with torch.device("meta"):
        expected = {name: tuple(tensor.shape) for name, tensor in model_class.from_config(config).state_dict().items()}
    for name, shape in saved_shapes(Path(path)).items():
        candidates = [name, name.split(".", 1)[-1]]  # a bare model's keys lack the task model's prefix
        model_shape = next((expected[key] for key in candidates if key in expected), None)
        if model_shape is not None and model_shape != shape:
            return (f"{path}: config.json and the weights disagree: {name} is {list(shape)} in the checkpoint but "
                    f"{list(model_shape)} in the model config.json builds")
    return None


def saved_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, read from the safetensors headers only."""
    shapes = {}
    for file in _weight_files(folder):
        with safe_open(str(file), framework="pt") as weights:
            shapes.update({name: tuple(weights.get_slice(name).get_shape()) for name in weights.keys()})
    return shapes


def _weight_files(folder: Path) -> list[Path]:
    if (folder / SAFE_WEIGHTS_NAME).is_file():
        return [folder / SAFE_WEIGHTS_NAME]
    index = folder / SAFE_WEIGHTS_INDEX_NAME
    if not index.is_file():
        raise HfCompressError(f"{folder}: no {SAFE_WEIGHTS_NAME} (or sharded index) to load")
    return [folder / shard for shard in sorted(set(read_json(index)["weight_map"].values()))]
