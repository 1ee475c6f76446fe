"""ONNX export and ONNX Runtime: the pipeline's models as graphs that run without torch.

    path = export_to_onnx(model, "out/", "my-model")              # out/model.onnx, dynamic batch and length
    model = ORTModelForSequenceClassification.from_pretrained("out/")
    logits = model(**tokenizer(["a fine film"], return_tensors="pt")).logits

The quantization backend `onnx` (hfcompress.quantization.onnx) chains export, fusion and onnxruntime's quantizers.
"""

from .export import MODEL_FILE, export_to_onnx, graph_input_names, token_batch
from .optimize import FusionRejected, fuse_for_ort
from .quantize import quantize_int4, quantize_int8_dynamic, quantize_int8_static
from .runtime import ORTModel, ORTModelForCausalLM, ORTModelForSequenceClassification

__all__ = [
    "MODEL_FILE",
    "FusionRejected",
    "ORTModel",
    "ORTModelForCausalLM",
    "ORTModelForSequenceClassification",
    "export_to_onnx",
    "fuse_for_ort",
    "graph_input_names",
    "quantize_int4",
    "quantize_int8_dynamic",
    "quantize_int8_static",
    "token_batch",
]
