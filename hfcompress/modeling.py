"""Loading and saving models: plain transformers checkpoints, and the ones pruning/quantization write."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import snapshot_download
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from .errors import HfCompressError, first_line
from .fileio import read_json
from .integrity import check_weight_files
from .modeling_hfcompress import QUANTO_KEY, STRUCTURE_KEY
from .pruning.structure import LEGACY_STRUCTURE_FILE
from .quantization.base import RECORD_FILE as QUANTIZATION_RECORD
from .recipe import ModelReference
from .sources import resolve_model_reference

# from_pretrained keywords that say which files to fetch from the Hub, rather than how to build the model.
HUB_KEYWORDS = ("revision", "token", "cache_dir", "force_download", "local_files_only", "proxies")
# The small files that say whether a Hub checkpoint is one that hfcompress must rebuild itself.
DESCRIPTION_FILES = ["config.json", QUANTIZATION_RECORD, LEGACY_STRUCTURE_FILE]


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
        from .quantization import load_quantized

        return load_quantized(folder, model_class)
    from .pruning import load_pruned

    return load_pruned(folder, model_class, **kwargs)  # plain from_pretrained when nothing is pruned


def download(repo_id: str, **hub_kwargs) -> Path | None:
    """The local snapshot of a Hub checkpoint that hfcompress rebuilds itself; None for any other checkpoint.

    The small files come first; the weights are downloaded only when hfcompress (not transformers) loads them.
    """
    small = Path(snapshot_download(repo_id, allow_patterns=DESCRIPTION_FILES, **hub_kwargs))
    config = read_json(small / "config.json") if (small / "config.json").is_file() else {}
    special = (config.get(STRUCTURE_KEY) or config.get(QUANTO_KEY) or (small / QUANTIZATION_RECORD).is_file()
               or (small / LEGACY_STRUCTURE_FILE).is_file())
    return Path(snapshot_download(repo_id, **hub_kwargs)) if special else None


def model_class_for(path: str | Path, **hub_kwargs):
    """The Auto class matching the checkpoint's architecture (classifier, causal LM or bare model)."""
    architectures = AutoConfig.from_pretrained(str(path), **hub_kwargs).architectures or []
    if any(name.endswith("ForSequenceClassification") for name in architectures):
        return AutoModelForSequenceClassification
    if any(name.endswith(("ForCausalLM", "LMHeadModel")) for name in architectures):
        return AutoModelForCausalLM
    return AutoModel


def load_model(reference: ModelReference | str, model_class, key: str = "teacher", **kwargs):
    """Load a model reference (Hub id, folder, pkg://) with a one-line error when it cannot be resolved."""
    def load(location: str, **options):
        return from_pretrained(location, model_class, **options)

    return _load_reference(reference, key, "model", load, **kwargs)


def load_config(reference: ModelReference | str, key: str = "teacher", **kwargs):
    """A model's config only (cheap: no weights; a GGUF file's is read from its metadata, which takes seconds)."""
    return _load_reference(reference, key, "the config of", AutoConfig.from_pretrained, **kwargs)


def load_tokenizer(reference: ModelReference | str, key: str = "teacher"):
    tokenizer = _load_reference(reference, key, "tokenizer", AutoTokenizer.from_pretrained)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_reference(reference: ModelReference | str, key: str, what: str, loader, **kwargs):
    """`loader(location, **kwargs)` for a reference's resolved location, revision and GGUF file; one-line errors."""
    reference = ModelReference.model_validate(reference)
    location = resolve_model_reference(reference.name_or_path, key)
    if reference.revision:
        kwargs["revision"] = reference.revision
    if reference.gguf_file:
        kwargs["gguf_file"] = reference.gguf_file
    try:
        return loader(location, **kwargs)
    except (OSError, ValueError) as error:
        raise HfCompressError(f"{key}: cannot load {what} {reference.name_or_path!r}: {first_line(error)}") from None


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


def save_checkpoint(model, tokenizer, folder: Path, accelerator=None) -> None:
    """`save_pretrained` the (unwrapped) model and its tokenizer; call it on the main process only."""
    from .pruning import save_pruned

    if accelerator is not None:
        model = accelerator.unwrap_model(model)
    folder.mkdir(parents=True, exist_ok=True)
    save_pruned(model, folder)  # config.json keeps the per-layer shapes of a model pruned unevenly
    tokenizer.save_pretrained(folder)
