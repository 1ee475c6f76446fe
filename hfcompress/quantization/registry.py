"""The backend registry: backend name -> class. Recipes, the quantize stage, the plan and the card read from it,
so a new format is one file with a `@register_backend` class (and, for a format outside this package, an import
of that file before the recipe is read)."""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

from ..errors import HfCompressError
from .base import QuantizationBackend, VariantOptions, read_record

BACKENDS: dict[str, type[QuantizationBackend]] = {}


def register_backend(backend_class: type[QuantizationBackend]) -> type[QuantizationBackend]:
    BACKENDS[backend_class.name] = backend_class
    return backend_class


def backend_class(name: str) -> type[QuantizationBackend]:
    if name not in BACKENDS:
        raise HfCompressError(f"unknown quantization backend {name!r} (known: {', '.join(BACKENDS)})")
    return BACKENDS[name]


def backend_for(variant: VariantOptions | dict) -> QuantizationBackend:
    """The backend that makes `variant` (options, or a dict validated first)."""
    variant = parse_variant(variant) if isinstance(variant, dict) else variant
    return backend_class(variant.backend)(variant)


def backend_for_checkpoint(path: str | Path) -> QuantizationBackend:
    """The backend (with the variant's options) that wrote a quantized checkpoint, from its quantization.json."""
    record = read_record(Path(path))
    backend = backend_class(record.get("backend", "?"))
    fields = backend.options_model.model_fields
    return backend(backend.options_model.model_validate({key: value for key, value in record.items()
                                                         if key in fields}))


def validate_variant(data) -> VariantOptions:
    """A variant given as a dict, validated by its backend's options model; pydantic's errors keep their key paths
    (so that a recipe error names the line of the bad key)."""
    if isinstance(data, VariantOptions):
        return data
    name = data.get("backend") if isinstance(data, dict) else None
    if name not in BACKENDS:
        message = f"backend must be one of: {', '.join(BACKENDS)}"
        raise ValidationError.from_exception_data("variant", [InitErrorDetails(
            type=PydanticCustomError("unknown_backend", message), loc=("backend",), input=name)])
    return BACKENDS[name].options_model.model_validate(data)


def validate_variants(items) -> list[VariantOptions]:
    """`validate_variant` of every item; every problem, with its index in the list."""
    if not isinstance(items, list):
        return items  # pydantic's own list check reports it
    variants, problems = [], []
    for index, item in enumerate(items):
        try:
            variants.append(validate_variant(item))
        except ValidationError as error:
            problems += [InitErrorDetails(type=PydanticCustomError(problem["type"], problem["msg"]),
                                          loc=(index, *problem["loc"]), input=problem["input"])
                         for problem in error.errors()]
    if problems:
        raise ValidationError.from_exception_data("variants", problems)
    return variants


def parse_variant(data: dict) -> VariantOptions:
    """Validate one variant given as a dict; its problems become one HfCompressError line."""
    try:
        return validate_variant(data)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(str(part) for part in problem['loc'])}: {problem['msg']}"
                             if problem["loc"] else problem["msg"] for problem in error.errors())
        raise HfCompressError(f"quantization variant {data!r}: {problems}") from None


def variant_name(variant: VariantOptions | dict) -> str:
    """A short, folder-safe name: bnb-int8, bnb-nf4-dq, quanto-int4, bf16, onnx-int8, ... (or the given name)."""
    return backend_for(variant).variant_name
