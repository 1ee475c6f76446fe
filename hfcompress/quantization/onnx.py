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

from torch import nn
from transformers import AutoModelForCausalLM

from ..errors import HfCompressError
from ..evaluation import count_parameters
from .base import QuantizationBackend, estimate_checkpoint_bytes, in_modules, load_full_precision
from .base import task_head_names, write_record
from .options import OnnxOptions

logger = logging.getLogger(__name__)

# The graph's nodes (names, shapes, exporter metadata) beside its weights, per transformer block (docs/formats.md).
GRAPH_BYTES_PER_BLOCK = 120_000
_EXPORTS: dict[tuple, tuple[Path, int, object]] = {}  # (folder, class, newest file time) -> (graph, parameters, config)


class OnnxBackend(QuantizationBackend):
    name = "onnx"
    package = "onnxruntime"
    pip_name = "onnxruntime onnx onnxscript"

    def quantize(self, model_dir: Path, model_class, variant: OnnxOptions,
                 calibration_batches: Iterable[dict] | None = None):
        self.require_package()
        from ..onnx import MODEL_FILE, FusionRejected, fuse_for_ort, quantize_int4, quantize_int8_dynamic
        from ..onnx import graph_input_names, quantize_int8_static, token_batch
        from ..onnx.export import PROBE_SHAPE

        runtime_class = ort_class_for(model_class)
        if variant.quantization == "int8-static" and calibration_batches is None:
            raise HfCompressError("onnx int8-static needs calibration batches, none given")
        exported, num_parameters, config = _export_once(Path(model_dir), model_class)
        keep_float = task_head_names(Path(model_dir), model_class)  # classifier / lm_head / score stay float32
        work = Path(tempfile.mkdtemp(prefix="hfcompress-onnx-"))
        graph, record = exported, {"num_parameters": num_parameters, "bits": _bits(variant)}
        try:
            if variant.optimize:
                probe = token_batch(config.vocab_size, graph_input_names(exported), *PROBE_SHAPE)
                try:
                    record["fusions"] = fuse_for_ort(exported, work / "fused.onnx", probe)
                    graph = work / "fused.onnx"
                except FusionRejected as reason:
                    logger.warning("%s: graph fusions not used: %s", model_dir, reason)
                    record["fusions_rejected"] = str(reason)
            target = work / MODEL_FILE
            if variant.quantization == "none":
                shutil.copyfile(graph, target)
            elif variant.quantization == "int8-dynamic":
                quantize_int8_dynamic(graph, target, variant.per_channel, keep_float)
            elif variant.quantization == "int8-static":
                batches = itertools.islice(calibration_batches, variant.calibration_batches)
                quantize_int8_static(graph, target, batches, variant.per_channel, variant.calibration_method,
                                     keep_float)
            else:
                quantize_int4(graph, target, variant.block_size, variant.accuracy_level, keep_float)
            model = runtime_class(target, config, num_parameters)
        except HfCompressError as error:
            shutil.rmtree(work, ignore_errors=True)
            raise HfCompressError(f"{model_dir}: {error}") from None
        model.export_record = record  # what save writes into quantization.json
        weakref.finalize(model, shutil.rmtree, work, True)  # the session has read the file; save copies it
        return model

    def save(self, model, out_dir: Path, variant: OnnxOptions) -> None:
        out_dir = Path(out_dir)
        model.save_pretrained(out_dir)
        write_record(out_dir, variant, **model.export_record)

    def load(self, path: Path, model_class):
        self.require_package()
        return ort_class_for(model_class).from_pretrained(path)

    def estimated_size(self, model: nn.Module, variant: OnnxOptions, skip: list[str]) -> int | None:
        """The graph's weights and nodes: int8 puts one byte per weight in every linear layer (plus a float32 scale and a
        zero point per output channel) and in every embedding table; int4 half a byte per linear weight plus a
        float32 scale per block and leaves embeddings float32. None with `optimize`: which fusions apply, and so
        which weights stay float32 (a fused Attention's), is known only once the graph is built."""
        if variant.optimize and variant.quantization != "none":
            return None
        int8 = variant.quantization in ("int8-dynamic", "int8-static")

        def price(name: str, module: nn.Module) -> int | None:
            if variant.quantization == "none" or in_modules(name, skip):
                return None
            bias = module.bias.numel() * 4 if getattr(module, "bias", None) is not None else 0
            if isinstance(module, nn.Linear):
                rows, columns = module.weight.shape
                per_row = 5 if (int8 and variant.per_channel) else 0
                return bias + (rows * columns + rows * per_row if int8
                               else rows * columns // 2 + 4 * rows * -(-columns // variant.block_size))
            if isinstance(module, nn.Embedding) and int8:
                return module.weight.numel()
            return None

        graph = GRAPH_BYTES_PER_BLOCK * getattr(model.config, "num_hidden_layers", 1)
        return estimate_checkpoint_bytes(model, price) + graph


def export_checkpoint(source: str | Path, output_dir: str | Path, quantization: str = "none",
                      optimize: bool = True) -> Path:
    """`hfcompress export`: a checkpoint folder (or a run directory's final checkpoint) as an ONNX checkpoint with
    its tokenizer in `output_dir`, written beside it first and renamed into place when complete."""
    from transformers import AutoTokenizer

    from ..modeling import model_class_for
    from .options import parse_variant

    folder, output_dir = full_precision_checkpoint(Path(source)), Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise HfCompressError(f"{output_dir}: the output directory exists and is not empty")
    variant = parse_variant({"backend": "onnx", "quantization": quantization, "optimize": optimize})
    model = OnnxBackend().quantize(folder, model_class_for(folder), variant)
    partial = output_dir.with_name(output_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    OnnxBackend().save(model, partial, variant)
    try:
        AutoTokenizer.from_pretrained(str(folder)).save_pretrained(partial)
    except (OSError, ValueError):
        logger.warning("%s: no tokenizer to copy beside the ONNX graph", folder)
    if output_dir.exists():
        output_dir.rmdir()
    partial.rename(output_dir)
    return output_dir


def full_precision_checkpoint(path: Path) -> Path:
    """The folder itself, or a run directory's final checkpoint; refused when it is already quantized."""
    from ..report import load_results
    from .base import RECORD_FILE, read_record

    if not path.is_dir():
        raise HfCompressError(f"{path}: no such checkpoint folder or run directory")
    if (path / "results.json").is_file():
        final = load_results(path).get("final_model_dir")
        if not final:
            raise HfCompressError(f"{path}: the run has no final checkpoint yet (results.json names none)")
        path = path / final
    if (path / RECORD_FILE).is_file():
        backend = read_record(path).get("backend")
        raise HfCompressError(f"{path}: this checkpoint is already quantized ({backend}); export a full-precision "
                              "one, e.g. the run's last distill or prune stage folder")
    return path


def ort_class_for(model_class):
    """The ORT runtime class for a transformers Auto class: causal LMs and sequence classifiers (logits)."""
    from ..onnx import ORTModelForCausalLM, ORTModelForSequenceClassification

    if model_class is AutoModelForCausalLM or model_class.__name__.endswith(("ForCausalLM", "LMHeadModel")):
        return ORTModelForCausalLM
    if model_class.__name__.endswith("ForSequenceClassification"):
        return ORTModelForSequenceClassification
    raise HfCompressError(f"onnx export covers sequence classifiers and causal LMs (logits), not {model_class.__name__}")


def _export_once(model_dir: Path, model_class) -> tuple[Path, int, object]:
    """The float32 graph of the checkpoint, its parameter count and config (exported on the first call)."""
    from ..onnx import export_to_onnx

    newest = max((path.stat().st_mtime_ns for path in model_dir.iterdir()), default=0) if model_dir.is_dir() else 0
    key = (str(model_dir.resolve()), model_class.__name__, newest)
    if key not in _EXPORTS:
        model = load_full_precision(model_dir, model_class)  # load_pruned when the blocks differ in shape
        folder = Path(tempfile.mkdtemp(prefix="hfcompress-onnx-export-"))
        atexit.register(shutil.rmtree, folder, True)
        _EXPORTS[key] = (export_to_onnx(model, folder, str(model_dir)), count_parameters(model), model.config)
    return _EXPORTS[key]


def _bits(variant: OnnxOptions) -> int | None:
    return {"none": None, "int8-dynamic": 8, "int8-static": 8, "int4": 4}[variant.quantization]
