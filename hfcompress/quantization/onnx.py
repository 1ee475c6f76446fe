"""onnx: the model exported to an ONNX graph (fused for ONNX Runtime) and quantized by onnxruntime's quantizers.

The "quantized model" is an `hfcompress.onnx.ORTModel` (an InferenceSession called like a transformers model); its
checkpoint is model.onnx, config.json and quantization.json (options, the source's parameter count, the fusions
applied). The float32 export of a folder is made once per process and shared by the variants quantized from it.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import shutil
import tempfile
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from torch import nn
from transformers import AutoModelForCausalLM

from ..errors import HfCompressError
from ..evaluation import count_parameters
from ..onnx import (
    MODEL_FILE,
    FusionRejected,
    ORTModelForCausalLM,
    ORTModelForSequenceClassification,
    export_to_onnx,
    fuse_for_ort,
    graph_input_names,
    quantize_int4,
    quantize_int8_dynamic,
    quantize_int8_static,
    token_batch,
)
from ..onnx.export import PROBE_SHAPE
from .base import QuantizationBackend, Requirement, VariantOptions, estimate_checkpoint_bytes, in_modules
from .base import load_full_precision
from .registry import register_backend

logger = logging.getLogger(__name__)

# The graph's nodes (names, shapes, exporter metadata) beside its weights, per transformer block (docs/formats.md).
GRAPH_BYTES_PER_BLOCK = 120_000
_EXPORTS: dict[tuple, tuple[Path, int, object]] = {}  # (folder, class, newest file time) -> (graph, parameters, config)
QUANTIZATION_NAMES = {"none": "onnx-fp32", "int8-dynamic": "onnx-int8", "int8-static": "onnx-int8-static",
                      "int4": "onnx-int4"}


class OnnxOptions(VariantOptions):
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
    # int4: the embedding tables 4-bit too, in blocks of `block_size` along the hidden size (GatherBlockQuantized);
    # int8 always stores them as uint8.
    quantize_embeddings: bool = False

    @model_validator(mode="after")
    def _only_keys_of_this_quantization(self):
        applies_to = {"per_channel": ("int8-dynamic", "int8-static"), "calibration_batches": ("int8-static",),
                      "calibration_method": ("int8-static",), "block_size": ("int4",), "accuracy_level": ("int4",),
                      "quantize_embeddings": ("int4",)}
        given = [key for key in self.options_given(applies_to) if self.quantization not in applies_to[key]]
        if given:
            raise ValueError("; ".join(f"{key} only applies to quantization: {' or '.join(applies_to[key])}"
                                       for key in given))
        return self


@register_backend
class OnnxBackend(QuantizationBackend):
    name = "onnx"
    options_model = OnnxOptions
    requirements = (Requirement("onnxruntime", "onnxruntime"), Requirement("onnxscript", "onnxscript"))
    runtime_packages = ("onnxruntime",)
    hub_tag = "onnx"

    def default_name(self) -> str:
        """onnx-fp32, onnx-int8, onnx-int8-static, onnx-int4 (block size and unfused graphs named when not default)."""
        options = self.options
        name = QUANTIZATION_NAMES[options.quantization]
        if options.quantization == "int4" and options.block_size != 32:
            name += f"-b{options.block_size}"
        name += "-emb" if options.quantize_embeddings else ""
        return name + ("" if options.optimize else "-unfused")

    @property
    def bits(self) -> int | None:
        return {"none": None, "int8-dynamic": 8, "int8-static": 8, "int4": 4}[self.options.quantization]

    def check(self, model: nn.Module) -> None:
        super().check(model)
        ort_class_for(type(model))

    def quantize(self, model_dir: Path, model_class, calibration_batches: Iterable[dict] | None = None):
        self.require_packages()
        options = self.options
        runtime_class = ort_class_for(model_class)
        if options.quantization == "int8-static" and calibration_batches is None:
            raise HfCompressError("onnx int8-static needs calibration batches, none given")
        exported, num_parameters, config = _export_once(Path(model_dir), model_class)
        keep_float = self.unquantized_modules_of(model_dir, model_class)  # classifier / lm_head / score stay float32
        work = Path(tempfile.mkdtemp(prefix="hfcompress-onnx-"))
        graph, record = exported, {"num_parameters": num_parameters, "bits": self.bits}
        try:
            if options.optimize:
                probe = token_batch(config.vocab_size, graph_input_names(exported), *PROBE_SHAPE)
                try:
                    record["fusions"] = fuse_for_ort(exported, work / "fused.onnx", probe)
                    graph = work / "fused.onnx"
                except FusionRejected as reason:
                    logger.warning("%s: graph fusions not used: %s", model_dir, reason)
                    record["fusions_rejected"] = str(reason)
            target = work / MODEL_FILE
            if options.quantization == "none":
                shutil.copyfile(graph, target)
            elif options.quantization == "int8-dynamic":
                quantize_int8_dynamic(graph, target, options.per_channel, keep_float)
            elif options.quantization == "int8-static":
                batches = itertools.islice(calibration_batches, options.calibration_batches)
                quantize_int8_static(graph, target, batches, options.per_channel, options.calibration_method,
                                     keep_float)
            else:
                quantize_int4(graph, target, options.block_size, options.accuracy_level, keep_float,
                              options.quantize_embeddings)
            model = runtime_class(target, config, num_parameters)
        except HfCompressError as error:
            shutil.rmtree(work, ignore_errors=True)
            raise HfCompressError(f"{model_dir}: {error}") from None
        model.export_record = record  # what save writes into quantization.json
        weakref.finalize(model, shutil.rmtree, work, True)  # the session has read the file; save copies it
        return model

    def save(self, model, out_dir: Path) -> None:
        out_dir = Path(out_dir)
        model.save_pretrained(out_dir)
        self.write_record(out_dir, **model.export_record)

    def load(self, path: Path, model_class):
        self.require_packages()
        return ort_class_for(model_class).from_pretrained(path)

    def estimated_size(self, model: nn.Module) -> int | None:
        """The graph's weights and nodes: int8 puts one byte per weight in every linear layer (plus a float32 scale
        and a zero point per output channel) and in every embedding table; int4 half a byte per linear weight plus
        a float32 scale per block and leaves embeddings float32 unless `quantize_embeddings` (then priced the same
        way along their rows). None with `optimize`: which fusions apply, and so
        which weights stay float32 (a fused Attention's), is known only once the graph is built."""
        options = self.options
        if options.optimize and options.quantization != "none":
            return None
        int8 = options.quantization in ("int8-dynamic", "int8-static")
        skip = self.unquantized_modules(model)

        def price(name: str, module: nn.Module) -> int | None:
            if options.quantization == "none" or in_modules(name, skip):
                return None
            bias = module.bias.numel() * 4 if getattr(module, "bias", None) is not None else 0
            if isinstance(module, nn.Linear):
                rows, columns = module.weight.shape
                per_row = 5 if (int8 and options.per_channel) else 0
                return bias + (rows * columns + rows * per_row if int8
                               else rows * columns // 2 + 4 * rows * -(-columns // options.block_size))
            if isinstance(module, nn.Embedding) and int8:
                return module.weight.numel()
            if isinstance(module, nn.Embedding) and options.quantize_embeddings:
                rows, columns = module.weight.shape
                return rows * columns // 2 + 4 * rows * -(-columns // options.block_size)
            return None

        graph = GRAPH_BYTES_PER_BLOCK * getattr(model.config, "num_hidden_layers", 1)
        return estimate_checkpoint_bytes(model, price) + graph

    def usage_code(self, repo_id: str, task_type: str, record: dict) -> list[str]:
        """How to run the graph with onnxruntime and its tokenizer only (no torch, no hfcompress)."""
        code = [
            "import json",
            "",
            "import numpy as np",
            "import onnxruntime as ort  # pip install onnxruntime",
            "from huggingface_hub import snapshot_download",
            "from transformers import AutoTokenizer",
            "",
            f'folder = snapshot_download("{repo_id}")',
            "tokenizer = AutoTokenizer.from_pretrained(folder)",
            'session = ort.InferenceSession(f"{folder}/model.onnx")',
            "",
        ]
        if task_type == "causal-lm":
            return code + [
                'input_ids = tokenizer("Once upon a time", return_tensors="np")["input_ids"]',
                "for _ in range(30):  # greedy decoding; the graph has no KV cache, so each step reads the whole text",
                '    logits = session.run(["logits"], {"input_ids": input_ids, '
                '"attention_mask": np.ones_like(input_ids)})[0]',
                "    input_ids = np.concatenate([input_ids, logits[:, -1:].argmax(-1)], axis=1)",
                "print(tokenizer.decode(input_ids[0], skip_special_tokens=True))",
            ]
        return code + [
            'inputs = tokenizer(["A gripping, beautifully shot film."], return_tensors="np")',
            'feed = {graph_input.name: inputs[graph_input.name] for graph_input in session.get_inputs()}',
            'logits = session.run(["logits"], feed)[0]',
            'id2label = json.load(open(f"{folder}/config.json"))["id2label"]',
            "print(id2label[str(logits[0].argmax())])",
        ]

    def usage_notes(self, record: dict) -> list[str]:
        return ["The model is an ONNX graph (`model.onnx`) for ONNX Runtime; it needs neither torch nor hfcompress. "
                "`hfcompress.from_pretrained(folder)` loads it as an `ORTModel` that is called like a transformers "
                "model."]


def ort_class_for(model_class):
    """The ORT runtime class for a transformers Auto class: causal LMs and sequence classifiers (logits)."""
    if model_class is AutoModelForCausalLM or model_class.__name__.endswith(("ForCausalLM", "LMHeadModel")):
        return ORTModelForCausalLM
    if model_class.__name__.endswith("ForSequenceClassification"):
        return ORTModelForSequenceClassification
    raise HfCompressError(f"onnx export covers sequence classifiers and causal LMs (logits), not {model_class.__name__}")


def _export_once(model_dir: Path, model_class) -> tuple[Path, int, object]:
    """The float32 graph of the checkpoint, its parameter count and config (exported on the first call)."""
    newest = max((path.stat().st_mtime_ns for path in model_dir.iterdir()), default=0) if model_dir.is_dir() else 0
    key = (str(model_dir.resolve()), model_class.__name__, newest)
    if key not in _EXPORTS:
        model = load_full_precision(model_dir, model_class)  # load_pruned when the blocks differ in shape
        folder = Path(tempfile.mkdtemp(prefix="hfcompress-onnx-export-"))
        atexit.register(shutil.rmtree, folder, True)
        _EXPORTS[key] = (export_to_onnx(model, folder, str(model_dir)), count_parameters(model), model.config)
    return _EXPORTS[key]
