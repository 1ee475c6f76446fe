"""Loading and saving models: plain transformers checkpoints, and the ones pruning/quantization write."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import snapshot_download
from transformers import AutoModelForCausalLM

from .fileio import read_json
from .integrity import check_weight_files
from .modeling_hfcompress import QUANTO_KEY, STRUCTURE_KEY
from .pruning import load_pruned, save_pruned
from .quantization import RECORD_FILE as QUANTIZATION_RECORD
from .quantization import load_quantized
from .recipe_schema import ModelReference
from .sources import load_reference, load_tokenizer, model_class_for

# from_pretrained keywords that say which files to fetch from the Hub, rather than how to build the model.
HUB_KEYWORDS = ("revision", "token", "cache_dir", "force_download", "local_files_only", "proxies")
# The small files that say whether a Hub checkpoint is one that hfcompress must rebuild itself.
DESCRIPTION_FILES = ["config.json", QUANTIZATION_RECORD]


def from_pretrained(name_or_path: str | Path, model_class=None, **kwargs):
    """Load any checkpoint hfcompress writes, or any transformers checkpoint, from a folder or a Hub repo id.

    Per-layer pruned shapes (`config.pruning_structure`), quantized weights (`quantization.json`) and plain
    checkpoints all load; `revision`, `token`, `cache_dir` and the other `from_pretrained` keywords work as in
    transformers. `model_class` defaults to the Auto class that matches the checkpoint's architecture.
    """
    if "gguf_file" in kwargs:  # a GGUF file is dequantized by transformers itself
        return (model_class or AutoModelForCausalLM).from_pretrained(str(name_or_path), **kwargs)
    folder = Path(name_or_path)
    if not folder.is_dir():
        hub_kwargs = {key: kwargs.pop(key) for key in HUB_KEYWORDS if key in kwargs}
        folder = download(str(name_or_path), **hub_kwargs)
        if folder is None:  # not an hfcompress checkpoint: transformers fetches what it needs
            return (model_class or model_class_for(name_or_path, **hub_kwargs)).from_pretrained(
                str(name_or_path), **hub_kwargs, **kwargs)
    check_weight_files(folder)
    model_class = model_class or model_class_for(folder)
    if (folder / QUANTIZATION_RECORD).is_file():  # a quantized pruned model is rebuilt by its backend too
        return load_quantized(folder, model_class)
    return load_pruned(folder, model_class, **kwargs)  # plain from_pretrained when nothing is pruned


def download(repo_id: str, **hub_kwargs) -> Path | None:
    """The local snapshot of a Hub checkpoint that hfcompress rebuilds itself; None for any other checkpoint.

    The small files come first; the weights are downloaded only when hfcompress (not transformers) loads them.
    """
    small = Path(snapshot_download(repo_id, allow_patterns=DESCRIPTION_FILES, **hub_kwargs))
    config = read_json(small / "config.json") if (small / "config.json").is_file() else {}
    special = config.get(STRUCTURE_KEY) or config.get(QUANTO_KEY) or (small / QUANTIZATION_RECORD).is_file()
    return Path(snapshot_download(repo_id, **hub_kwargs)) if special else None


def load_model(reference: ModelReference | str, model_class, key: str = "teacher", **kwargs):
    """Load a model reference (Hub id, folder, pkg://) with a one-line error when it cannot be resolved."""
    def load(location: str, **options):
        return from_pretrained(location, model_class, **options)

    return load_reference(reference, key, "model", load, **kwargs)


def convert_gguf_checkpoint(reference: ModelReference, model_class, folder: Path) -> None:
    """Load a GGUF file (dequantized to float) and save it as an ordinary transformers checkpoint.

    transformers refuses to `save_pretrained` a GGUF-loaded model, so the model is rebuilt from its config
    (without the GGUF quantization record) and given the loaded weights.
    """
    loaded = load_model(reference, model_class)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = model_class.from_config(config)
    model.load_state_dict(loaded.state_dict())
    save_checkpoint(model, load_tokenizer(reference), folder)


def save_checkpoint(model, tokenizer, folder: Path, accelerator=None, state_dict: dict | None = None) -> None:
    """`save_pretrained` the (unwrapped) model and its tokenizer; call it on the main process only. `state_dict`:
    the weights to write when the model's own are sharded (gathered on every process beforehand)."""
    if accelerator is not None:
        model = accelerator.unwrap_model(model)
    folder.mkdir(parents=True, exist_ok=True)
    save_pruned(model, folder, state_dict=state_dict)  # config.json keeps the per-layer shapes of a model pruned unevenly
    tokenizer.save_pretrained(folder)
