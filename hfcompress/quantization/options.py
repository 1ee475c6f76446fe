"""What a quantized variant is: one options model per backend, told apart by `backend`.

    {backend: bitsandbytes, bits: 8, llm_int8_threshold: 6.0}
    {backend: bitsandbytes, bits: 4, quant_type: nf4, double_quant: true, compute_dtype: float32}
    {backend: quanto, weights: int4, activations: int8, calibration_batches: 8}
    {backend: half, dtype: bfloat16}
    {backend: onnx, quantization: int8-dynamic, optimize: true}
    {backend: compressed-tensors, bits: 4, group_size: 64}          round-to-nearest, a compressed-tensors checkpoint
    {backend: gptq, bits: 4, group_size: 64, act_order: true, damp: 0.01}   the same format, calibrated (GPTQ)
    {backend: gguf, type: q8_0}                                       a llama.cpp GGUF file
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
    # weights stay float32, so an unfused int8 graph can be the smaller one (docs/formats.md).
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



class CompressedTensorsOptions(_Variant):
    """Integer weights in groups, rounded to nearest, saved as a compressed-tensors `pack-quantized` checkpoint
    (W4A16 / W8A16) that plain `AutoModelForCausalLM.from_pretrained` and vLLM load."""

    backend: Literal["compressed-tensors"]
    bits: Literal[4, 8] = 4
    # Input features per scale (and zero point). None: one scale per output row (compressed-tensors' "channel").
    group_size: int | None = Field(128, ge=8)
    symmetric: bool = True  # False: a zero point per group as well
    # How each group's range is chosen: its min and max, or shrunk to the least rounding error (MSE_SHRINKS).
    observer: Literal["minmax", "mse"] = "minmax"
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"  # of the scales and the unquantized weights
    skip_modules: list[str] = Field(default_factory=list)  # kept in full precision, besides the task head

    @model_validator(mode="after")
    def _symmetric_only(self):
        if not self.symmetric:
            raise ValueError("symmetric: false writes packed zero points, which transformers 5.24 (with "
                             "compressed-tensors 0.20) rejects as a size mismatch when loading; use symmetric: true")
        return self


class GptqOptions(CompressedTensorsOptions):
    """GPTQ (Frantar et al. 2022): the same format, each weight column rounded with the error of the columns
    before it pushed onto the ones after, as the layer's input Hessian on the training text says."""

    backend: Literal["gptq"]  # type: ignore[assignment]
    act_order: bool = False  # columns in order of decreasing Hessian diagonal (groups stay contiguous)
    damp: float = Field(0.01, gt=0, description="added to the Hessian diagonal, as a fraction of its mean")
    block_size: int = Field(128, ge=1, description="columns whose updates are applied together (speed only)")


class GgufOptions(_Variant):
    """A llama.cpp GGUF file (Llama architecture), evaluated as transformers loads it back (`gguf_file=`)."""

    backend: Literal["gguf"]
    type: Literal["f32", "f16", "bf16", "q8_0", "q5_0", "q5_1", "q4_0", "q4_1"] = "q8_0"


BACKEND_NAMES = ("bitsandbytes", "quanto", "half", "onnx", "compressed-tensors", "gptq", "gguf")


def _backend_of(value) -> str | None:
    return value.get("backend") if isinstance(value, dict) else getattr(value, "backend", None)


VariantOptions = Annotated[
    Union[
        Annotated[BitsAndBytesOptions, Tag("bitsandbytes")],
        Annotated[QuantoOptions, Tag("quanto")],
        Annotated[HalfOptions, Tag("half")],
        Annotated[OnnxOptions, Tag("onnx")],
        Annotated[CompressedTensorsOptions, Tag("compressed-tensors")],
        Annotated[GptqOptions, Tag("gptq")],
        Annotated[GgufOptions, Tag("gguf")],
    ],
    Discriminator(
        _backend_of,
        custom_error_type="unknown_backend",
        custom_error_message=f"backend must be one of: {', '.join(BACKEND_NAMES)}",
    ),
]
_VARIANT_ADAPTER = TypeAdapter(VariantOptions)


def parse_variant(data: dict) -> (BitsAndBytesOptions | QuantoOptions | HalfOptions | OnnxOptions
                                  | CompressedTensorsOptions | GptqOptions | GgufOptions):
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
    if variant.backend == "gguf":
        return f"gguf-{variant.type}"
    if variant.backend in ("compressed-tensors", "gptq"):
        method = "gptq" if variant.backend == "gptq" else "rtn"
        name = f"{method}-int{variant.bits}" + (f"-g{variant.group_size}" if variant.group_size else "")
        name += ("" if variant.symmetric else "-asym") + ("-mse" if variant.observer == "mse" else "")
        return name + ("-ao" if variant.backend == "gptq" and variant.act_order else "")
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
