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

The rewrite is over ``onnx_ir``; the model is serialized only for the ONNX Runtime
session that measures the channel maxima.
"""

from __future__ import annotations

__all__ = ["channel_absmax", "smooth"]

import hashlib

import numpy as np
import onnx_ir as ir

from adapter.passes.calibration import probe_session

_MAXIMA: dict[tuple[str, int, str], dict[str, np.ndarray]] = {}
"""In-process cache: (model digest, sample count, tensors digest) -> per-channel maxima."""


def channel_absmax(model: ir.Model, names: list[str], samples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Largest magnitude per last-axis channel of each named tensor over ``samples``."""
    proto = ir.serde.serialize_model(model)  # the boundary: ONNX Runtime runs a ModelProto
    key = (
        hashlib.sha256(proto.SerializeToString()).hexdigest(),
        len(samples),
        hashlib.sha256("|".join(sorted(names)).encode()).hexdigest(),
    )
    if key in _MAXIMA:
        return _MAXIMA[key]
    session = probe_session(proto, names)
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


def _initializer(name: str, array: np.ndarray) -> ir.Value:
    tensor = ir.tensor(array, name=name)
    return ir.Value(name=name, type=ir.TensorType(tensor.dtype), shape=tensor.shape, const_value=tensor)


def _weight(node: ir.Node) -> ir.Value | None:
    """The MatMul's weight when it is an initializer."""
    value = node.inputs[1] if len(node.inputs) > 1 else None
    return value if value is not None and value.is_initializer() and value.const_value is not None else None


def smooth(
    model: ir.Model,
    lowered: list[str],
    samples: list[dict[str, np.ndarray]],
    alpha: float = 0.5,
    min_spread: float = MIN_SPREAD,
) -> tuple[ir.Model, int]:
    """Smooth the activations of the ``lowered`` MatMuls (a new model; count of tensors smoothed).

    Only MatMuls whose weight (input 1) is a 2-D initializer and whose activation's last
    axis matches the weight's rows take part, and only activations whose channel maxima
    spread by ``min_spread`` or more. ``model`` is not changed (the new model is a clone
    sharing its unchanged tensors); with nothing to smooth it is returned as is.
    """
    if not samples or not lowered:
        return model, 0
    model = model.clone()
    graph = model.graph
    wanted = set(lowered)
    groups: dict[str, list[ir.Node]] = {}
    activations: dict[str, ir.Value] = {}
    for node in graph:
        if node.name in wanted and node.op_type == "MatMul" and node.inputs[0] is not None:
            weight = _weight(node)
            if weight is not None and len(weight.const_value.shape) == 2:
                groups.setdefault(node.inputs[0].name, []).append(node)
                activations[node.inputs[0].name] = node.inputs[0]
    if not groups:
        return model, 0
    maxima = channel_absmax(model, list(groups), samples)
    used = {value.name: len(value.uses()) for value in graph.initializers.values()}
    smoothed = 0
    for activation, nodes in groups.items():
        weights = [_weight(n).const_value.numpy().astype(np.float32) for n in nodes]
        x_max = maxima.get(activation)
        if x_max is None or any(w.shape[0] != x_max.shape[0] for w in weights):
            continue
        if x_max.max() < min_spread * max(float(np.median(x_max)), 1e-12):
            continue
        w_max = np.max(np.stack([np.abs(w).max(axis=1) for w in weights]), axis=0)
        scale = np.power(np.maximum(x_max, 1e-5), alpha) / np.power(np.maximum(w_max, 1e-5), 1 - alpha)
        scale = np.clip(scale, 1e-4, 1e4).astype(np.float32)
        divisor = _initializer(f"{activation}_smooth_inv", (1.0 / scale).astype(np.float32))
        graph.register_initializer(divisor)
        out = ir.Value(name=f"{activation}_smoothed")
        mul = ir.Node("", "Mul", [activations[activation], divisor], outputs=[out], name=f"{nodes[0].name}_smooth")
        order = {id(n): i for i, n in enumerate(graph)}
        graph.insert_before(min(nodes, key=lambda n: order[id(n)]), mul)
        for node, weight in zip(nodes, weights):
            old = node.inputs[1]
            array = (weight * scale[:, None]).astype(np.float32)
            if used[old.name] > 1 or old.is_graph_output():  # shared: this node gets its own copy
                new = _initializer(f"{old.name}_smoothed_{node.name}", array)
                graph.register_initializer(new)
            else:
                new = old
                old.const_value = ir.tensor(array, name=old.name)
                old.type, old.shape = ir.TensorType(old.const_value.dtype), old.const_value.shape
            node.replace_input_with(0, out)
            node.replace_input_with(1, new)
        smoothed += 1
    return model, smoothed
