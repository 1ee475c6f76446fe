"""ONNX Runtime's quantizers on an exported graph: dynamic int8, static int8 (calibrated), 4-bit weight-only.

- dynamic int8 (`quantize_dynamic`): MatMul weights int8 (per output channel when asked), activations quantized to
  uint8 at run time (DynamicQuantizeLinear + MatMulInteger; a fused Attention becomes QAttention). Embedding tables
  (Gather) are stored uint8 with one scale per table and dequantized where they are read.
- static int8 (`quantize_static`, QDQ format): weights int8 and activations uint8 with ranges calibrated on
  training batches, the CPU settings onnxruntime recommends for x86 with VNNI.
- int4 (`MatMulNBitsQuantizer`): MatMul weights 4-bit in blocks of `block_size` input features (symmetric),
  and with `embeddings` the embedding tables too (GatherBlockQuantized, blocks along the hidden size); everything
  else float32.

The nodes that read the weights of `keep_float` modules (the task head: `classifier`, `lm_head`) stay float32, as in
the other backends. The 4-bit quantizer only handles MatMul, so Gemm nodes (GPT-2's Conv1D layers, BERT's pooler)
are first rewritten as MatMul + Add (the dynamic quantizer does that itself, naming the new node `<gemm>_MatMul`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import HfCompressError, first_line
from .export import EXTERNAL_DATA_LIMIT, graph_input_names
from .runtime import session_feed

# Without a type for every tensor, the quantizers stop at the outputs of ORT's fused ops (com.microsoft domain).
FLOAT_BY_DEFAULT = {"DefaultTensorType": onnx.TensorProto.FLOAT}


def quantize_int8_dynamic(source: Path, target: Path, per_channel: bool, keep_float: Iterable[str] = ()) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    _quantizing("int8-dynamic", source, keep_float, False, lambda graph, exclude: quantize_dynamic(
        graph, target, weight_type=QuantType.QInt8, per_channel=per_channel, nodes_to_exclude=exclude,
        extra_options=FLOAT_BY_DEFAULT, use_external_data_format=_is_large(source)))


def quantize_int8_static(source: Path, target: Path, batches: Iterable[dict], per_channel: bool, method: str,
                         keep_float: Iterable[str] = ()) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    reader = CalibrationReader(batches, graph_input_names(source))
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    _quantizing("int8-static", source, keep_float, False, lambda graph, exclude: quantize_static(
        graph, target, reader, quant_format=QuantFormat.QDQ, per_channel=per_channel, nodes_to_exclude=exclude,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=methods[method],
        extra_options=FLOAT_BY_DEFAULT, use_external_data_format=_is_large(source)))
    if reader.batches_read == 0:
        raise HfCompressError("onnx int8-static: the calibration batches were empty")


def quantize_int4(source: Path, target: Path, block_size: int, accuracy_level: int | None,
                  keep_float: Iterable[str] = (), embeddings: bool = False) -> None:
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    # The module calls logging.basicConfig at import and logs every node it visits at INFO.
    logging.getLogger(nbits.__name__).setLevel(logging.WARNING)

    def quantize(graph: Path, exclude: list[str]) -> None:
        ops = ("MatMul", "Gather") if embeddings else ("MatMul",)
        quantizer = nbits.MatMulNBitsQuantizer(onnx.load(str(graph)), block_size=block_size, is_symmetric=True,
                                               accuracy_level=accuracy_level, nodes_to_exclude=exclude,
                                               op_types_to_quantize=ops)
        quantizer.process()
        quantizer.model.save_model_to_file(str(target), use_external_data_format=_is_large(source))

    _quantizing("int4", source, keep_float, True, quantize)


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


def _quantizing(kind: str, source: Path, keep_float: Iterable[str], gemms_as_matmuls: bool, quantize) -> None:
    """Run `quantize(graph, nodes_to_exclude)` on a prepared copy of `source`; a failure is one HfCompressError line."""
    graph = source.with_name(source.stem + "-prepared.onnx")
    model = with_inferred_types(onnx.load(str(source)))
    exclude = nodes_reading(model, keep_float) + [logits_node(model).name]
    exclude += [name + "_MatMul" for name in exclude]  # onnxruntime's own Gemm -> MatMul rewrite names them so
    if gemms_as_matmuls:
        rewrite_gemms_as_matmuls(model, skip=set(exclude))
    onnx.save(model, str(graph), save_as_external_data=_is_large(source))
    try:
        with _quiet_root_logger():
            quantize(graph, exclude)
    except HfCompressError:
        raise
    except Exception as error:  # onnxruntime's quantizers raise RuntimeError, ValueError, AssertionError, ...
        raise HfCompressError(f"onnxruntime {kind} quantization failed: {first_line(error)}") from None


def with_inferred_types(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph with every tensor's type and shape inferred again, ORT's fused ops (com.microsoft) included.

    The exporter's value_info shapes disagree with ONNX shape inference on some nodes ("Inferred shape and existing
    shape differ"), which stops the quantizers, so they are dropped; ONNX's own inference then leaves the outputs
    of fused ops untyped, and the static quantizer's calibration skips untyped tensors (BERT's pooler, which reads
    the [CLS] row of a fused SkipLayerNormalization, then fails for want of its input's range). ONNX Runtime's
    symbolic shape inference knows the fused ops; where it gives up, the quantizers infer what they can.
    """
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    del model.graph.value_info[:]
    try:
        with _quiet_root_logger():
            return SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception:  # noqa: BLE001 - any failure just means no inferred types, as before
        return model


def nodes_reading(model: onnx.ModelProto, module_names: Iterable[str]) -> list[str]:
    """Names of the nodes that read a weight of one of the modules (initializer names are module paths)."""
    patterns = [re.compile(rf"(^|\.){re.escape(name)}\.") for name in module_names]
    weights = {tensor.name for tensor in model.graph.initializer if any(p.search(tensor.name) for p in patterns)}
    return [node.name for node in model.graph.node if weights.intersection(node.input)]


PLUMBING_OPS = ("Add", "Reshape", "Identity", "Cast", "Squeeze", "Unsqueeze")


def logits_node(model: onnx.ModelProto) -> onnx.NodeProto:
    """The layer that computes the `logits` output (the task head), past bias adds and shape plumbing. The exporter
    can give the head's weight a generic name (a folded, transposed constant), so name matching alone misses it."""
    producer = {output: node for node in model.graph.node for output in node.output}
    node = producer["logits"]
    while node.op_type in PLUMBING_OPS:
        node = next(producer[name] for name in node.input if name in producer)
    return node


def rewrite_gemms_as_matmuls(model: onnx.ModelProto, skip: set[str]) -> None:
    """Gemm(A, W[, C]) with a constant W, no transposed A and unit alpha/beta -> MatMul(A, W) (+ Add C)."""
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        settings = {attribute.name: helper.get_attribute_value(attribute) for attribute in node.attribute}
        if (node.op_type != "Gemm" or node.name in skip or node.input[1] not in initializers
                or settings.get("transA", 0) or settings.get("alpha", 1.0) != 1.0 or settings.get("beta", 1.0) != 1.0):
            nodes.append(node)
            continue
        weight = node.input[1]
        if settings.get("transB", 0):
            transposed = numpy_helper.from_array(numpy_helper.to_array(initializers[weight]).T.copy(), weight + ".T")
            model.graph.initializer.append(transposed)
            weight = transposed.name
        has_bias = len(node.input) > 2 and node.input[2]
        product = node.output[0] + "_matmul" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], weight], [product], name=node.name + "_matmul"))
        if has_bias:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=node.name + "_bias"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)


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
