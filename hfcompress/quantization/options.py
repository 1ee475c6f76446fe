"""What a quantized variant is: one options model per backend, told apart by `backend`.

    {backend: bitsandbytes, bits: 8, llm_int8_threshold: 6.0}
    {backend: bitsandbytes, bits: 4, quant_type: nf4, double_quant: true, compute_dtype: float32}
    {backend: quanto, weights: int4, activations: int8, calibration_batches: 8}
    {backend: half, dtype: bfloat16}
    {backend: onnx, quantization: int8-dynamic, optimize: true}
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, TypeAdapter, ValidationError, model_validator

from ..errors import HfCompressError

FOUR_BIT_ONLY = ("quant_type", "double_quant", "compute_dtype")
EIGHT_BIT_ONLY = ("llm_int8_threshold",)


class _Variant(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # replaces the derived variant name


class BitsAndBytesOptions(_Variant):
    """LLM.int8() (bits 8) or QLoRA-style NF4/FP4 (bits 4) Linear layers, through transformers' BitsAndBytesConfig."""

    backend: Literal["bitsandbytes"]
    bits: Literal[8, 4]
    llm_int8_threshold: float = Field(6.0, ge=0)  # 8-bit: inputs above it take the fp16 outlier path
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = False  # 4-bit: quantize the per-block scales too
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    skip_modules: list[str] = Field(default_factory=list)  # kept in full precision, besides the task head
    quantize_embeddings: bool = False  # the word embeddings too (bitsandbytes Embedding8bit / Embedding4bit)

    @model_validator(mode="after")
    def _only_keys_of_this_bit_width(self):
        misplaced = FOUR_BIT_ONLY if self.bits == 8 else EIGHT_BIT_ONLY
        # A key left at its default is harmless (a resolved recipe writes every field): only a set value is misplaced.
        given = [key for key in misplaced
                 if key in self.model_fields_set and getattr(self, key) != type(self).model_fields[key].default]
        if given:
            other = 4 if self.bits == 8 else 8
            raise ValueError(f"{', '.join(given)} only applies to bits: {other}")
        return self


class QuantoOptions(_Variant):
    """optimum-quanto: int8/int4/int2 weights, optionally int8 activations calibrated on a few batches."""

    backend: Literal["quanto"]
    weights: Literal["int8", "int4", "int2"] = "int8"
    activations: Literal["int8"] | None = None
    calibration_batches: int = Field(8, ge=1)
    # int4/int2: input features per scale and shift. None: quanto's choice (128, or the largest multiple of 32 below
    # it that divides the layer's inputs). 32 is the block of GGUF's Q4_0/Q4_1, so it re-quantizes those exactly.
    group_size: int | None = Field(None, ge=8)
    skip_modules: list[str] = Field(default_factory=list)  # kept in full precision, besides the task head
    quantize_embeddings: bool = False

    @model_validator(mode="after")
    def _group_size_needs_int4_or_int2(self):
        if self.group_size is not None and self.weights == "int8":
            raise ValueError("group_size only applies to weights: int4 or int2 (int8 weights have one scale per row)")
        return self

    @model_validator(mode="after")
    def _embeddings_unsupported(self):
        if self.quantize_embeddings:
            raise ValueError("optimum-quanto has no quantized Embedding module (it quantizes Linear, Conv2d and "
                             "LayerNorm layers); use backend: bitsandbytes to quantize the embeddings")
        return self


class HalfOptions(_Variant):
    """Every weight, embeddings included, in 16-bit floats."""

    backend: Literal["half"]
    dtype: Literal["float16", "bfloat16"] = "bfloat16"


class OnnxOptions(_Variant):
    """An ONNX graph run by ONNX Runtime: float32, or int8 (dynamic or calibrated static), or 4-bit weight-only."""

    backend: Literal["onnx"]
    quantization: Literal["none", "int8-dynamic", "int8-static", "int4"] = "int8-dynamic"
    # Fuse attention, layer norms, GELU into ONNX Runtime's fused ops first. With int8-dynamic the fused Attention's
    # weights stay float32: on the quickstart's student the unfused int8 graph was smaller and faster.
    optimize: bool = True
    per_channel: bool = True  # int8: one weight scale per output channel (else one per matrix)
    calibration_batches: int = Field(8, ge=1)  # int8-static: training batches that set the activation ranges
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"  # int8-static
    block_size: Literal[16, 32, 64, 128, 256] = 32  # int4: input features per scale
    accuracy_level: Literal[0, 1, 2, 3, 4] | None = None  # int4: MatMulNBits compute type (4: int8 activations)

    @model_validator(mode="after")
    def _only_keys_of_this_quantization(self):
        applies_to = {"per_channel": ("int8-dynamic", "int8-static"), "calibration_batches": ("int8-static",),
                      "calibration_method": ("int8-static",), "block_size": ("int4",), "accuracy_level": ("int4",)}
        given = [key for key, kinds in applies_to.items() if self.quantization not in kinds
                 and key in self.model_fields_set and getattr(self, key) != type(self).model_fields[key].default]
        if given:
            raise ValueError("; ".join(f"{key} only applies to quantization: {' or '.join(applies_to[key])}"
                                       for key in given))
        return self


BACKEND_NAMES = ("bitsandbytes", "quanto", "half", "onnx")


def _backend_of(value) -> str | None:
    return value.get("backend") if isinstance(value, dict) else getattr(value, "backend", None)


VariantOptions = Annotated[
    Union[
        Annotated[BitsAndBytesOptions, Tag("bitsandbytes")],
        Annotated[QuantoOptions, Tag("quanto")],
        Annotated[HalfOptions, Tag("half")],
        Annotated[OnnxOptions, Tag("onnx")],
    ],
    Discriminator(
        _backend_of,
        custom_error_type="unknown_backend",
        custom_error_message=f"backend must be one of: {', '.join(BACKEND_NAMES)}",
    ),
]
_VARIANT_ADAPTER = TypeAdapter(VariantOptions)


def parse_variant(data: dict) -> BitsAndBytesOptions | QuantoOptions | HalfOptions | OnnxOptions:
    """Validate one variant given as a dict; its problems become one HfCompressError line."""
    try:
        return _VARIANT_ADAPTER.validate_python(data)
    except ValidationError as error:
        problems = "; ".join(_describe(problem) for problem in error.errors())
        raise HfCompressError(f"quantization variant {data!r}: {problems}") from None


def _describe(problem: dict) -> str:
    key = ".".join(str(part) for part in problem["loc"][1:])  # loc[0] is the backend tag
    if problem["type"] == "unknown_backend":
        key = "backend"
    return f"{key}: {problem['msg']}" if key else problem["msg"]


def variant_name(variant) -> str:
    """A short, folder-safe name: bnb-int8, bnb-nf4-dq, quanto-int4, quanto-int8-a8, bf16, onnx-int8, ... (or the
    given name)."""
    if variant.name:
        return variant.name
    if variant.backend == "onnx":
        return _onnx_variant_name(variant)
    if variant.backend == "half":
        return {"float16": "fp16", "bfloat16": "bf16"}[variant.dtype]
    if variant.backend == "bitsandbytes":
        name = "bnb-int8" if variant.bits == 8 else f"bnb-{variant.quant_type}"
        name += "-dq" if variant.bits == 4 and variant.double_quant else ""
    else:
        name = f"quanto-{variant.weights}" + (f"-g{variant.group_size}" if variant.group_size else "")
        name += "-a8" if variant.activations else ""
    return name + ("-emb" if variant.quantize_embeddings else "")


def _onnx_variant_name(variant: OnnxOptions) -> str:
    """onnx-fp32, onnx-int8, onnx-int8-static, onnx-int4 (block size and unfused graphs named when not default)."""
    name = {"none": "onnx-fp32", "int8-dynamic": "onnx-int8", "int8-static": "onnx-int8-static",
            "int4": "onnx-int4"}[variant.quantization]
    if variant.quantization == "int4" and variant.block_size != 32:
        name += f"-b{variant.block_size}"
    return name + ("" if variant.optimize else "-unfused")
