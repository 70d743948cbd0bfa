"""Activation smoothing before INT8 (SmoothQuant, Xiao et al. 2022, arXiv:2211.10438).

Per-tensor INT8 of an activation spends its 256 levels on the largest channel, so a few
outlier channels round the rest to a handful of values. Smoothing divides each input
channel ``k`` of a MatMul's activation by ``s_k`` and multiplies row ``k`` of its constant
weight by ``s_k``: the product is unchanged in exact arithmetic, and with
``s_k = max|X_k|^a / max|W_k|^(1-a)`` the activation's channels come closer in range
while the weight (quantized per output channel) absorbs the difference.

Here the divisor is an explicit ``Mul`` on the activation, shared by every lowered MatMul
that reads it (one ``s`` from the largest of their weight rows); MatMuls kept in FP32
keep reading the original tensor. Channel maxima come from the calibration samples.
"""

from __future__ import annotations

__all__ = ["channel_absmax", "smooth"]

import hashlib

import numpy as np
import onnx
from adapter.passes.calibration import probe_session
from onnx import numpy_helper

_MAXIMA: dict[tuple[str, int, str], dict[str, np.ndarray]] = {}
"""In-process cache: (model digest, sample count, tensors digest) -> per-channel maxima."""


def channel_absmax(model: onnx.ModelProto, names: list[str], samples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Largest magnitude per last-axis channel of each named tensor over ``samples``."""
    key = (
        hashlib.sha256(model.SerializeToString()).hexdigest(),
        len(samples),
        hashlib.sha256("|".join(sorted(names)).encode()).hexdigest(),
    )
    if key in _MAXIMA:
        return _MAXIMA[key]
    session = probe_session(model, names)
    maxima: dict[str, np.ndarray] = {}
    for feed in samples:
        for name, value in zip(names, session.run(names, feed)):
            flat = np.abs(np.asarray(value, dtype=np.float32)).reshape(-1, value.shape[-1]).max(axis=0)
            maxima[name] = np.maximum(maxima[name], flat) if name in maxima else flat
    _MAXIMA[key] = maxima
    return maxima


MIN_SPREAD = 10.0
"""Smooth an activation only when its largest channel maximum is at least this many times
its median one: the divisor ``Mul`` costs a pass over the tensor, which pays only where
outliers actually dominate (MiniLM: the FFN tensors, 12-20x; Q/K/V inputs are 4-6x)."""


def smooth(
    model: onnx.ModelProto,
    lowered: list[str],
    samples: list[dict[str, np.ndarray]],
    alpha: float = 0.5,
    min_spread: float = MIN_SPREAD,
) -> tuple[onnx.ModelProto, int]:
    """Smooth the activations of the ``lowered`` MatMuls (a new model; count of tensors smoothed).

    Only MatMuls whose weight (input 1) is a 2-D initializer and whose activation's last
    axis matches the weight's rows take part, and only activations whose channel maxima
    spread by ``min_spread`` or more.
    """
    if not samples or not lowered:
        return model, 0
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    wanted = set(lowered)
    groups: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        if node.name in wanted and node.op_type == "MatMul" and node.input[1] in inits:
            if len(inits[node.input[1]].dims) == 2:
                groups.setdefault(node.input[0], []).append(node)
    if not groups:
        return model, 0
    maxima = channel_absmax(model, list(groups), samples)
    used: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            if name in inits:
                used[name] = used.get(name, 0) + 1
    smoothed = 0
    for activation, nodes in groups.items():
        weights = [numpy_helper.to_array(inits[n.input[1]]).astype(np.float32) for n in nodes]
        x_max = maxima.get(activation)
        if x_max is None or any(w.shape[0] != x_max.shape[0] for w in weights):
            continue
        if x_max.max() < min_spread * max(float(np.median(x_max)), 1e-12):
            continue
        w_max = np.max(np.stack([np.abs(w).max(axis=1) for w in weights]), axis=0)
        scale = np.power(np.maximum(x_max, 1e-5), alpha) / np.power(np.maximum(w_max, 1e-5), 1 - alpha)
        scale = np.clip(scale, 1e-4, 1e4).astype(np.float32)
        divisor_name = f"{activation}_smooth_inv"
        out_name = f"{activation}_smoothed"
        graph.initializer.append(numpy_helper.from_array((1.0 / scale).astype(np.float32), divisor_name))
        mul = onnx.helper.make_node("Mul", [activation, divisor_name], [out_name], name=f"{nodes[0].name}_smooth")
        order = {id(n): i for i, n in enumerate(graph.node)}
        graph.node.insert(min(order[id(n)] for n in nodes), mul)
        for node, weight in zip(nodes, weights):
            new_weight = f"{node.input[1]}_smoothed_{node.name}" if used[node.input[1]] > 1 else node.input[1]
            tensor = numpy_helper.from_array((weight * scale[:, None]).astype(np.float32), new_weight)
            if new_weight == node.input[1]:
                inits[new_weight].CopyFrom(tensor)
            else:
                graph.initializer.append(tensor)
            node.input[0], node.input[1] = out_name, new_weight
        smoothed += 1
    return model, smoothed
