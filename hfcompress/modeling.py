"""Loading and saving models: plain transformers checkpoints, and the ones pruning/quantization write."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from .errors import HfCompressError, first_line
from .pruning.structure import STRUCTURE_FILE as PRUNING_RECORD
from .quantization.base import RECORD_FILE as QUANTIZATION_RECORD
from .recipe import ModelReference
from .sources import resolve_model_reference


def from_pretrained(path: str | Path, model_class=None, **kwargs):
    """Load any checkpoint hfcompress writes (pruned with per-layer shapes, quantized, or plain transformers)."""
    folder = Path(path)
    if (folder / QUANTIZATION_RECORD).is_file():  # first: a quantized pruned model has both records
        from .quantization import load_quantized

        return load_quantized(folder, model_class or model_class_for(folder))  # rebuilds the pruned shapes too
    if (folder / PRUNING_RECORD).is_file():
        from .pruning import load_pruned

        return load_pruned(folder, model_class or model_class_for(folder), **kwargs)
    return (model_class or model_class_for(path)).from_pretrained(str(path), **kwargs)


def model_class_for(path: str | Path):
    """The Auto class matching the checkpoint's architecture (classifier, causal LM or bare model)."""
    architectures = AutoConfig.from_pretrained(str(path)).architectures or []
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
    from .pruning.adapters import is_supported

    if accelerator is not None:
        model = accelerator.unwrap_model(model)
    folder.mkdir(parents=True, exist_ok=True)
    if is_supported(model):  # keeps the structure record of a model whose layers were pruned unevenly
        save_pruned(model, folder)
    else:
        model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
