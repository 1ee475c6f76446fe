"""Graph fusions for ONNX Runtime: attention, skip + layer norm, bias + GELU, rotary embeddings into ORT's fused ops.

onnxscript's ORT fusion rewrites (`optimize_for_ort`), not `onnxruntime.transformers.optimizer.optimize_model`: on
graphs from the dynamo exporter ORT's optimizer fused skip-layer-norms and bias-GELUs but no attention (0
`Attention` nodes on BERT), while onnxscript fused every layer's attention. A rewrite can also break a graph (it made
GPT-2's graph unloadable: a rank-3 input to Gemm), so every fused graph is checked against the unfused one; one
that fails the check is not used.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import first_line
from .export import max_logit_difference, run_session


class FusionRejected(Exception):
    """The fused graph does not load or does not reproduce the unfused one."""


def fuse_for_ort(source: Path, target: Path, probe: dict[str, np.ndarray]) -> dict[str, int]:
    """Write the fused graph of `source` to `target`; the number of each fusion applied. Raises FusionRejected."""
    import onnx_ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    model, counts = optimize_for_ort(onnx_ir.load(str(source)))
    onnx_ir.save(model, str(target))
    expected = run_session(source, probe)
    try:
        actual = run_session(target, probe)
    except Exception as error:  # onnxruntime raises its own Fail / InvalidGraph types
        raise FusionRejected(f"onnxruntime cannot load the fused graph: {first_line(error)}") from None
    difference = max_logit_difference(actual, expected, probe["attention_mask"])
    if not difference <= 1e-4 * max(1.0, float(np.abs(expected).max())):
        raise FusionRejected(f"the fused graph's logits differ from the unfused graph's by {difference:.3g}")
    return {name: count for name, count in counts.items() if count}
