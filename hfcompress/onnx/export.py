"""A transformers model (or one pruned into blocks of different shapes) as an ONNX graph: token ids in, logits out.

`torch.onnx.export(..., dynamo=True)`: on these models it gives graphs that match torch at any batch size and length,
where the TorchScript exporter (dynamo=False) baked shapes of the example into BERT's and GPT-2's graphs (their
logits were off by 0.008 and 0.2 at another shape). Each export is checked on a batch of another shape, with
padding, against the torch model before it is kept.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import HfCompressError, first_line

logger = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
EXTERNAL_DATA_LIMIT = 1_800_000_000  # protobuf files stop at 2 GB: larger graphs keep their weights beside them
EXAMPLE_SHAPE = (2, 8)  # the exporter specializes dimensions of size 0 or 1, so the example has none
PROBE_SHAPE = (3, 5)  # another shape, with padding, to check the graph's axes are really dynamic


def onnx_input_names(model: nn.Module) -> list[str]:
    """input_ids and attention_mask, and token_type_ids when the model embeds more than one token type (BERT)."""
    names = ["input_ids", "attention_mask"]
    if getattr(model.config, "type_vocab_size", 1) > 1:
        names.append("token_type_ids")
    return names


class LogitsOnly(nn.Module):
    """The model as a function of its token inputs that returns only the logits (no cache for causal LMs)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.extra = {"use_cache": False} if model.can_generate() else {}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None):
        types = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **types, **self.extra).logits


def export_to_onnx(model: nn.Module, folder: Path, model_name: str) -> Path:
    """Write `folder`/model.onnx with dynamic batch and sequence axes; a failure is one HfCompressError line."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / MODEL_FILE
    names = onnx_input_names(model)
    wrapper = LogitsOnly(model.eval())
    example = token_batch(model.config.vocab_size, names, *EXAMPLE_SHAPE)
    dynamic = {name: {0: "batch_size", 1: "sequence_length"} for name in names}
    dynamic["logits"] = {0: "batch_size"} | ({1: "sequence_length"} if model.can_generate() else {})
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, tuple(torch.from_numpy(example[name]) for name in names), str(path),
                              input_names=names, output_names=["logits"], dynamic_axes=dynamic, dynamo=True,
                              external_data=_parameter_bytes(model) > EXTERNAL_DATA_LIMIT, verbose=False)
    except Exception as error:  # the exporter raises many types; the innermost cause says which op or construct
        raise HfCompressError(f"{model_name}: cannot export to ONNX: {_root_cause(error)}") from None
    check_against_torch(path, wrapper, names, model_name)
    return path


def check_against_torch(path: Path, wrapper: LogitsOnly, names: list[str], model_name: str) -> None:
    """Raise when the graph's logits on a batch of another shape (padded) differ from the torch model's."""
    probe = token_batch(wrapper.model.config.vocab_size, names, *PROBE_SHAPE)
    with torch.no_grad():
        expected = wrapper(*(torch.from_numpy(probe[name]) for name in names)).numpy()
    actual = run_session(path, probe)
    difference = max_logit_difference(actual, expected, probe["attention_mask"])
    if not difference <= 1e-3 * max(1.0, float(np.abs(expected).max())):
        raise HfCompressError(f"{model_name}: the exported ONNX graph does not reproduce the model: its logits "
                              f"differ by {difference:.3g} on a batch of shape {PROBE_SHAPE}")


def token_batch(vocab_size: int, names: list[str], batch_size: int, length: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random token ids (int64, as tokenizers return them), the last row padded at its end when there are rows."""
    generator = np.random.default_rng(seed)
    input_ids = generator.integers(min(3, vocab_size - 1), vocab_size, (batch_size, length), dtype=np.int64)
    attention_mask = np.ones_like(input_ids)
    if batch_size > 1:
        attention_mask[-1, length // 2 + 1:] = 0
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": np.zeros_like(input_ids)}
    return {name: batch[name] for name in names}


def run_session(path: Path, feed: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], feed)[0]


def max_logit_difference(actual: np.ndarray, expected: np.ndarray, attention_mask: np.ndarray) -> float:
    """Largest absolute difference; for per-token logits, at the positions that are not padding."""
    difference = np.abs(actual - expected)
    if difference.ndim == 3:
        difference = difference[attention_mask.astype(bool)]
    return float(difference.max())


def graph_input_names(path: Path) -> list[str]:
    import onnx

    return [graph_input.name for graph_input in onnx.load(str(path), load_external_data=False).graph.input]


def _root_cause(error: BaseException) -> str:
    """The first line of the innermost exception: the exporter wraps the real reason in generic advice."""
    while error.__cause__ is not None:
        error = error.__cause__
    return first_line(error)


def _parameter_bytes(model: nn.Module) -> int:
    return sum(parameter.numel() * parameter.element_size() for parameter in model.parameters())
