"""Weight width per MatMul for INT8 dynamic, from the error the CPU's kernel actually makes.

On x86 CPUs without VNNI (AVX2, AVX-512 without VNNI), ONNX Runtime's u8 x s8 GEMM
multiplies with ``vpmaddubsw``, which adds two u8 x s8 products into a *signed 16-bit*
lane and saturates there. Dynamic quantization maps activations to u8 with a zero point
(often 70-180), so even small activations are large u8 values; next to 8-bit weights
near +-127 the pair sum passes 32767 and is clipped. ONNX Runtime's documented remedy is
``reduce_range`` (7-bit weights: 2 x 255 x 64 < 32767, no saturation) at the price of
half the weight resolution. Neither choice is right for every layer. MiniLM on an AVX2
host (relative RMS error of each MatMul's output, 8-bit / 7-bit weights): layer 0's
attention-output projection 0.199 / 0.027, the other layers' 0.029-0.043 / 0.019-0.023,
while the query/key/value and FFN-output projections are better with 8 bits
(0.015-0.035 / 0.016-0.039).

So the choice is measured per MatMul: quantize every candidate both ways, run both models
on calibration samples with the engine's own kernels, and compare each MatMul's output
with the FP32 product of the same input activation (relative RMS error). A MatMul gets
7-bit weights only where that error is smaller. On a VNNI CPU (``vpdpbusd`` accumulates
in 32 bits) the 8-bit error is always the smaller, and nothing changes.

Both models are ``onnx_ir`` models; the quantized one is serialized only for the ONNX
Runtime session that measures it.
"""

from __future__ import annotations

__all__ = ["matmul_errors", "narrower"]

import numpy as np
import onnx_ir as ir

from adapter.passes.calibration import probe_session


def matmul_errors(
    reference: ir.Model, quantized: ir.Model, nodes: list[str], samples: list[dict[str, np.ndarray]]
) -> dict[str, float]:
    """Relative RMS error of each quantized MatMul's (or Gemm's) output against its FP32 product.

    Args:
        reference: The FP32 model the quantizer was given (its MatMul weights are used).
        quantized: The quantized model: ONNX Runtime's quantizer keeps each MatMul's
            activation input and output tensor names.
        nodes: MatMul nodes of ``reference`` (2-D initializer weights) to measure.
        samples: Feeds to run ``quantized`` on (with full graph optimisation, so with the
            kernels an engine uses).

    Returns:
        Node name to ``||y_int8 - x W|| / ||x W||`` over all samples; nodes whose tensors
        the quantized model does not have are left out.
    """
    wanted = set(nodes)
    pairs: dict[str, tuple[str, str, np.ndarray, np.ndarray | float]] = {}
    for node in reference.graph:
        if node.name not in wanted or node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2:
            continue
        x, w = node.inputs[0], node.inputs[1]
        if x is None or w is None or not w.is_initializer() or w.const_value is None:
            continue
        weight = w.const_value.numpy().astype(np.float64)
        bias: np.ndarray | float = 0.0
        if node.op_type == "Gemm":  # y = x W' + c, as exported from nn.Linear (no transA, alpha = beta = 1)
            attrs = {k: a.value for k, a in node.attributes.items()}
            if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
                continue
            weight = weight.T if attrs.get("transB", 0) else weight
            c = node.inputs[2] if len(node.inputs) > 2 else None
            if c is not None:
                if not c.is_initializer() or c.const_value is None:
                    continue
                bias = c.const_value.numpy().astype(np.float64)
        if weight.ndim == 2:
            pairs[node.name] = (x.name, node.outputs[0].name, weight, bias)
    if not pairs or not samples:
        return {}
    produced = {o.name for n in quantized.graph for o in n.outputs} | {i.name for i in quantized.graph.inputs}
    pairs = {k: v for k, v in pairs.items() if v[0] in produced and v[1] in produced}
    names = sorted({t for x, y, _, _ in pairs.values() for t in (x, y)})
    session = probe_session(quantized, names, optimize=True)  # serializes: ONNX Runtime runs a ModelProto
    sums = {k: [0.0, 0.0] for k in pairs}
    for feed in samples:
        values = dict(zip(names, session.run(names, feed)))
        for node, (x, y, weight, bias) in pairs.items():
            want = values[x].astype(np.float64) @ weight + bias
            sums[node][0] += float(np.square(values[y] - want).sum())
            sums[node][1] += float(np.square(want).sum())
    return {k: float(np.sqrt(err / max(ref, 1e-30))) for k, (err, ref) in sums.items()}


def narrower(eight: dict[str, float], seven: dict[str, float]) -> list[str]:
    """The nodes whose measured error is smaller with 7-bit weights than with 8-bit."""
    return sorted(k for k in eight if k in seven and seven[k] < eight[k])
