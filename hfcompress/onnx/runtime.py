"""ONNX Runtime models that are called like transformers models: token tensors in, an output with `.logits` out.

    model = ORTModelForSequenceClassification.from_pretrained("out/onnx-int8")
    logits = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits   # a torch tensor

Named like optimum's classes (optimum's ONNX Runtime path needs transformers < 4.58, so it cannot be used here).
A folder holds model.onnx, config.json (labels, vocabulary size) and, when hfcompress wrote it, quantization.json.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import onnx
import torch
from transformers import AutoConfig, PretrainedConfig
from transformers.modeling_outputs import CausalLMOutput, SequenceClassifierOutput

from ..errors import HfCompressError
from ..fileio import read_json
from .export import MODEL_FILE

RECORD_FILE = "quantization.json"  # quantization.base.RECORD_FILE (not imported: quantization imports this module)


class ORTModel:
    """An onnxruntime InferenceSession over an exported graph, with the parts of a transformers model that
    evaluation and users touch: `config`, `device`, `eval()`, `num_parameters()`, `get_memory_footprint()`."""

    output_class = SequenceClassifierOutput

    def __init__(self, model_path: str | Path, config: PretrainedConfig, num_parameters: int | None = None,
                 provider: str = "CPUExecutionProvider", session_options=None):
        import onnxruntime

        self.model_path = Path(model_path)
        self.config = config
        self._num_parameters = num_parameters
        self.export_record = {"num_parameters": num_parameters}  # what the onnx backend writes in quantization.json
        self.session = onnxruntime.InferenceSession(str(self.model_path), session_options, providers=[provider])
        self.input_names = [graph_input.name for graph_input in self.session.get_inputs()]
        self.device = torch.device("cpu")  # inputs are copied to numpy on the host whatever the provider

    @classmethod
    def from_pretrained(cls, folder: str | Path, **kwargs) -> ORTModel:
        folder = Path(folder)
        if not (folder / MODEL_FILE).is_file():
            raise HfCompressError(f"{folder}: no {MODEL_FILE}, so this is not an ONNX checkpoint")
        record = read_json(folder / RECORD_FILE) if (folder / RECORD_FILE).is_file() else {}
        config = AutoConfig.from_pretrained(str(folder))
        return cls(folder / MODEL_FILE, config, record.get("num_parameters"), **kwargs)

    def save_pretrained(self, folder: str | Path) -> None:
        """Copy the graph (and its external weights, if any) and write config.json into `folder`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for source in [self.model_path, *self.model_path.parent.glob(self.model_path.name + ".data")]:
            target = folder / (MODEL_FILE + source.name[len(self.model_path.name):])
            if source.resolve() != target.resolve():
                shutil.copyfile(source, target)
        config = copy.deepcopy(self.config)
        if hasattr(config, "auto_map"):  # names the source's modeling code, which a graph folder does not ship
            del config.auto_map
        config.save_pretrained(folder)

    def __call__(self, input_ids=None, attention_mask=None, **inputs):
        feed = session_feed(self.input_names, {"input_ids": input_ids, "attention_mask": attention_mask, **inputs})
        logits = self.session.run(["logits"], feed)[0]
        return self.output_class(logits=torch.from_numpy(logits))

    forward = __call__

    def eval(self) -> ORTModel:
        return self

    def to(self, device) -> ORTModel:
        if torch.device(device).type != "cpu":
            raise HfCompressError(f"{self.model_path}: ONNX Runtime models take inputs on the cpu, not {device}")
        return self

    def num_parameters(self) -> int | None:
        """The parameters of the model the graph was exported from (a graph has initializers, not parameters)."""
        return self._num_parameters

    def get_memory_footprint(self) -> int:
        """Bytes of the graph's initializers (weights at their stored width: int8, packed 4-bit, float32)."""
        graph = onnx.load(str(self.model_path), load_external_data=False).graph
        return sum(_initializer_bytes(tensor) for tensor in graph.initializer)


class ORTModelForSequenceClassification(ORTModel):
    output_class = SequenceClassifierOutput


class ORTModelForCausalLM(ORTModel):
    output_class = CausalLMOutput

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 20, min_new_tokens: int = 0,
                 do_sample: bool = False, eos_token_id: int | None = None, pad_token_id: int | None = None,
                 **unused) -> torch.Tensor:
        """Greedy decoding without a KV cache (each step runs the whole sequence): prompt + new token ids."""
        if do_sample:
            raise HfCompressError("ORTModelForCausalLM.generate decodes greedily only (do_sample=False)")
        eos_token_id = self.config.eos_token_id if eos_token_id is None else eos_token_id
        input_ids = torch.as_tensor(input_ids)
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else torch.as_tensor(attention_mask)
        for step in range(max_new_tokens):
            next_token = self(input_ids=input_ids, attention_mask=attention_mask).logits[:, -1].argmax(-1, keepdim=True)
            input_ids = torch.cat([input_ids, next_token], dim=1)
            attention_mask = torch.cat([attention_mask, torch.ones_like(next_token)], dim=1)
            if step + 1 >= min_new_tokens and eos_token_id is not None and bool((next_token == eos_token_id).all()):
                break
        return input_ids


def session_feed(input_names: list[str], inputs: dict) -> dict[str, np.ndarray]:
    """The graph's inputs as int64 numpy arrays; a missing attention mask is all ones, missing token types zeros.
    Other keys (labels, example_index) are not graph inputs and are left out."""
    input_ids = inputs.get("input_ids")
    if input_ids is None:
        raise HfCompressError("an ONNX model needs input_ids")
    defaults = {"attention_mask": np.ones_like, "token_type_ids": np.zeros_like}
    feed = {}
    for name in input_names:
        value = inputs.get(name)
        if value is None and name not in defaults:
            raise HfCompressError(f"the ONNX graph needs the input {name!r}, which was not given")
        feed[name] = defaults[name](_as_int64(input_ids)) if value is None else _as_int64(value)
    return feed


def _as_int64(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=np.int64)


def _initializer_bytes(tensor: onnx.TensorProto) -> int:
    count = int(np.prod(tensor.dims)) if tensor.dims else 1
    bits = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4}.get(tensor.data_type)
    if bits is not None:
        return (count * bits + 7) // 8
    return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
