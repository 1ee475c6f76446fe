"""ONNX Runtime's quantizers on an exported graph: dynamic int8, static int8 (calibrated), 4-bit weight-only.

- dynamic int8 (`quantize_dynamic`): MatMul weights int8 (per output channel when asked), activations quantized to
  uint8 at run time (MatMulInteger); fused Attention becomes QAttention. The embedding tables (Gather) are stored
  uint8 with one scale each and dequantized where they are read. Gemm is not in the dynamic quantizer's op list,
  so BERT's pooler and classifier (exported as Gemm) stay float32; a causal LM's head (a MatMul) is quantized.
- static int8 (`quantize_static`, QDQ format): weights int8 and activations uint8 with ranges calibrated on
  training batches, the CPU settings onnxruntime recommends for x86 with VNNI.
- int4 (`MatMulNBitsQuantizer`): MatMul weights 4-bit in blocks of `block_size` input features (symmetric),
  everything else float32.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx

from ..errors import HfCompressError, first_line
from .export import EXTERNAL_DATA_LIMIT, graph_input_names
from .runtime import session_feed

# Without a type for every tensor, the quantizers stop at the outputs of ORT's fused ops (com.microsoft domain).
FLOAT_BY_DEFAULT = {"DefaultTensorType": onnx.TensorProto.FLOAT}


def quantize_int8_dynamic(source: Path, target: Path, per_channel: bool) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    _quantizing("int8-dynamic", source, lambda graph: quantize_dynamic(
        graph, target, weight_type=QuantType.QInt8, per_channel=per_channel, extra_options=FLOAT_BY_DEFAULT,
        use_external_data_format=_is_large(source)))


def quantize_int8_static(source: Path, target: Path, batches: Iterable[dict], per_channel: bool,
                         method: str) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    reader = CalibrationReader(batches, graph_input_names(source))
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    _quantizing("int8-static", source, lambda graph: quantize_static(
        graph, target, reader, quant_format=QuantFormat.QDQ, per_channel=per_channel,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=methods[method],
        extra_options=FLOAT_BY_DEFAULT, use_external_data_format=_is_large(source)))
    if reader.batches_read == 0:
        raise HfCompressError("onnx int8-static: the calibration batches were empty")


def quantize_int4(source: Path, target: Path, block_size: int, accuracy_level: int | None) -> None:
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    # The module calls logging.basicConfig at import and logs every node it visits at INFO.
    logging.getLogger(nbits.__name__).setLevel(logging.WARNING)

    def quantize(graph: Path) -> None:
        quantizer = nbits.MatMulNBitsQuantizer(onnx.load(str(graph)), block_size=block_size, is_symmetric=True,
                                               accuracy_level=accuracy_level)
        quantizer.process()
        quantizer.model.save_model_to_file(str(target), use_external_data_format=_is_large(source))

    _quantizing("int4", source, quantize)


class CalibrationReader:
    """onnxruntime's CalibrationDataReader over batches of model inputs (torch tensors or numpy arrays)."""

    def __init__(self, batches: Iterable[dict], input_names: list[str]):
        self.batches = iter(batches)
        self.input_names = input_names
        self.batches_read = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        if batch is None:
            return None
        self.batches_read += 1
        return session_feed(self.input_names, batch)


def _quantizing(kind: str, source: Path, quantize) -> None:
    """Run a quantizer on a copy of `source` without value_info; its failure as one HfCompressError line."""
    graph = source.with_name(source.stem + "-untyped.onnx")
    # The exporter's value_info shapes disagree with ONNX shape inference on some nodes ("Inferred shape and
    # existing shape differ"), which stops the quantizers: let them infer every shape again.
    model = onnx.load(str(source))
    del model.graph.value_info[:]
    onnx.save(model, str(graph), save_as_external_data=_is_large(source))
    try:
        with _quiet_root_logger():
            quantize(graph)
    except HfCompressError:
        raise
    except Exception as error:  # onnxruntime's quantizers raise RuntimeError, ValueError, AssertionError, ...
        raise HfCompressError(f"onnxruntime {kind} quantization failed: {first_line(error)}") from None


@contextmanager
def _quiet_root_logger():
    """onnxruntime's quantizers log advice and every tensor they skip as root-logger warnings: silence them."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def _is_large(path: Path) -> bool:
    return path.with_name(path.name + ".data").exists() or path.stat().st_size > EXTERNAL_DATA_LIMIT
