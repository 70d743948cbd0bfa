"""Random small graphs for the fuzz tests: op-library ops and fusable motifs, with a feed.

``random_graph`` (a hypothesis strategy) draws a chain of unary, binary, reduction and
matrix ops plus the motifs the fusion passes look for (decomposed layer norm and GELU,
MatMul + bias, residual + layer norm, constant chains) over a pool of live tensors.
Used by ``tests/test_fuzz.py`` (which re-exports it) and ``benchmarks/fuzz_campaign.py``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import TensorProto, helper

OPSET = 20
"""Opset of the random graphs."""

UNARY = ("Relu", "Neg", "Abs", "Tanh", "Sigmoid", "Erf", "Gelu", "Sin", "Cos")
BINARY = ("Add", "Sub", "Mul", "Max", "Min")
MOTIFS = ("layernorm-decomposed", "gelu-decomposed", "matmul-bias", "skip-layernorm", "constant-chain")


class _GraphBuilder:
    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.count = 0

    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def const(self, array: np.ndarray) -> str:
        name = self.name("c")
        self.inits.append(onnx.numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        out = self.name("v")
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.name(op.lower()), **attrs))
        return out

    def weight(self, *shape: int) -> str:
        return self.const((self.rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32))


def _apply(b: _GraphBuilder, op: str, pool: list[tuple[str, tuple[int, ...]]], pick: Any) -> tuple[str, tuple]:
    value, shape = pool[pick(len(pool))]
    last = shape[-1]
    if op in UNARY:
        return b.node(op, [value]), shape
    if op in BINARY:
        same = [v for v, s in pool if s == shape]
        other = same[pick(len(same))] if pick(2) else b.weight(last)  # a tensor, or a broadcast row
        return b.node(op, [value, other]), shape
    if op == "Div":
        return b.node(
            "Div", [value, b.const(np.float32(1.5) + np.abs(b.rng.standard_normal(last)).astype(np.float32))]
        ), shape
    if op == "MatMul":
        n = (4, 8, 16)[pick(3)]
        return b.node("MatMul", [value, b.weight(last, n)]), (*shape[:-1], n)
    if op == "Transpose":
        perm = list(b.rng.permutation(len(shape)))
        return b.node("Transpose", [value], perm=perm), tuple(shape[p] for p in perm)
    if op == "Reshape":
        total = int(np.prod(shape))
        target = (shape[0], -1) if pick(2) else (total // last, last)
        out_shape = (shape[0], total // shape[0]) if target[1] == -1 else target
        return b.node("Reshape", [value, b.const(np.array(target, np.int64))]), out_shape
    if op == "Softmax":
        axis = -1 - pick(len(shape))
        return b.node("Softmax", [value], axis=axis), shape
    if op == "LayerNormalization":
        return b.node("LayerNormalization", [value, b.weight(last), b.weight(last)], axis=-1, epsilon=1e-5), shape
    if op == "Concat":
        same = [v for v, s in pool if s == shape]
        axis = pick(len(shape))
        out_shape = tuple(d * 2 if i == axis else d for i, d in enumerate(shape))
        return b.node("Concat", [value, same[pick(len(same))]], axis=axis), out_shape
    if op == "ReduceMean":
        return b.node("ReduceMean", [value, b.const(np.array([-1], np.int64))], keepdims=1), (*shape[:-1], 1)
    return _motif(b, op, value, shape)


def _motif(b: _GraphBuilder, op: str, x: str, shape: tuple[int, ...]) -> tuple[str, tuple]:
    """Subgraphs the fusion passes look for, written the way exporters write them."""
    last = shape[-1]
    axes = b.const(np.array([-1], np.int64))
    if op in ("layernorm-decomposed", "skip-layernorm"):
        if op == "skip-layernorm":
            x = b.node("Add", [x, b.node("Relu", [x])])
        mean = b.node("ReduceMean", [x, axes])
        centred = b.node("Sub", [x, mean])
        var = b.node("ReduceMean", [b.node("Pow", [centred, b.const(np.float32(2.0))]), axes])
        std = b.node("Sqrt", [b.node("Add", [var, b.const(np.float32(1e-5))])])
        normed = b.node("Div", [centred, std])
        return b.node("Add", [b.node("Mul", [normed, b.weight(last)]), b.weight(last)]), shape
    if op == "gelu-decomposed":
        inner = b.node("Erf", [b.node("Div", [x, b.const(np.float32(np.sqrt(2.0)))])])
        half = b.node("Mul", [x, b.const(np.float32(0.5))])
        return b.node("Mul", [half, b.node("Add", [inner, b.const(np.float32(1.0))])]), shape
    if op == "matmul-bias":
        n = 8
        return b.node("Add", [b.node("MatMul", [x, b.weight(last, n)]), b.weight(n)]), (*shape[:-1], n)
    # constant-chain: a subgraph of constants the folding pass must get right
    k = b.node("Mul", [b.weight(last), b.const(np.float32(2.0))])
    k = b.node("Sqrt", [b.node("Add", [b.node("Abs", [k]), b.const(np.float32(1.0))])])
    return b.node("Mul", [x, k]), shape


OPS = (
    *UNARY,
    *BINARY,
    "Div",
    "MatMul",
    "Transpose",
    "Reshape",
    "Softmax",
    "LayerNormalization",
    "Concat",
    "ReduceMean",
    *MOTIFS,
)


@st.composite
def random_graph(draw) -> tuple[bytes, dict[str, np.ndarray]]:
    """A random graph of 1-8 steps over one or two float inputs, with its feed (serialized model)."""
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    b = _GraphBuilder(rng)
    rank = draw(st.integers(2, 4))
    shape = tuple(draw(st.sampled_from((1, 2, 3, 4, 8))) for _ in range(rank - 1)) + (
        draw(st.sampled_from((4, 8, 16))),
    )
    inputs = [("x", shape)]
    if draw(st.booleans()):
        inputs.append(("y", shape))
    pool = list(inputs)
    for op in draw(st.lists(st.sampled_from(OPS), min_size=1, max_size=8)):
        pool.append(_apply(b, op, pool, lambda n: draw(st.integers(0, n - 1))))
        if int(np.prod(pool[-1][1])) > 4096:
            break
    outputs = [pool[-1]] + ([pool[draw(st.integers(len(inputs), len(pool) - 1))]] if len(pool) > 2 else [])
    outputs = list(dict(outputs).items())
    graph = helper.make_graph(
        b.nodes,
        "random",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n, _ in outputs],
        b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=9)
    feed = {n: rng.standard_normal(s).astype(np.float32) for n, s in inputs}
    return model.SerializeToString(), feed
