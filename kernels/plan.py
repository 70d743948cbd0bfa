"""Which kernels a graph can use: the fused patterns of an ONNX graph and their problem sizes.

Patterns (standard-domain graphs as the dynamo exporter writes them, and ONNX Runtime's
fused contrib ops):

* ``Add(x, residual) -> LayerNormalization`` (same shapes), ``SkipLayerNormalization`` -> ``add_layernorm``;
  ``SkipSimplifiedLayerNormalization`` -> ``add_rmsnorm``;
* ``Add(x, constant bias) -> Gelu`` (``BiasGelu``) -> ``bias_gelu``;
* ``Softmax(scores [+ mask]) -> MatMul(., v)`` over (batch, heads, m, n) -> ``attention``;
  ``GroupQueryAttention`` -> ``attention`` (decode: one query position over the past);
* ``MatMulNBits`` (4 bits) -> ``int4_gemm``; ``RotaryEmbedding`` -> ``rotary``.

Symbolic dimensions take the example sizes (``sizes``: dim name -> size); a pattern whose
shape stays unknown is skipped. Nodes with the same problem share one kernel.
"""

from __future__ import annotations

__all__ = ["Found", "decoder_problems", "problems_in"]

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import onnx_ir as ir

from adapter.kernels.attention import ATTENTION
from adapter.kernels.elementwise import BIAS_GELU
from adapter.kernels.int4_gemm import INT4_GEMM
from adapter.kernels.norms import ADD_LAYERNORM, ADD_RMSNORM
from adapter.kernels.rotary import ROTARY
from adapter.kernels.spec import FLAGS, Kernel


@dataclass
class Found:
    kernel: Kernel
    problem: dict[str, int]
    nodes: list[str] = field(default_factory=list)
    ops: list[str] = field(default_factory=list)
    """The op types of the anchor nodes matched (what a plugin node would stand for)."""


def _dims(value: ir.Value | None, sizes: Mapping[str, int]) -> list[int] | None:
    if value is None or value.shape is None:
        return None
    out = []
    for dim in value.shape:
        if isinstance(dim, int):
            out.append(dim)
        elif getattr(dim, "value", None) in sizes:
            out.append(int(sizes[dim.value]))
        else:
            return None
    return out


def _producer(value: ir.Value | None) -> ir.Node | None:
    return value.producer() if value is not None else None


def _const(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None


def _attr(node: ir.Node, name: str, default: Any = None) -> Any:
    found = node.attributes.get(name)
    return found.value if found is not None else default


def _rows(shape: list[int]) -> dict[str, int]:
    return {"rows": math.prod(shape[:-1]), "n": shape[-1]}


def _match(node: ir.Node, sizes: Mapping[str, int]) -> tuple[Kernel, dict[str, int]] | None:
    op = node.op_type
    first = node.inputs[0] if node.inputs else None
    if op == "LayerNormalization":
        add = _producer(first)
        if add is None or add.op_type != "Add" or any(_const(i) for i in add.inputs):
            return None
        shape = _dims(add.inputs[0], sizes)
        if shape is None or add.inputs[0].shape != add.inputs[1].shape:  # a broadcast add (positions) is no residual
            return None
        return ADD_LAYERNORM, _rows(shape)
    if op in ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization"):
        bias_at = 4 if op == "SkipLayerNormalization" else 3
        if len(node.inputs) > bias_at and node.inputs[bias_at] is not None:  # an input bias: not this kernel's sum
            return None
        shape = _dims(first, sizes)
        return (ADD_RMSNORM if "Simplified" in op else ADD_LAYERNORM, _rows(shape)) if shape else None
    if op in ("Gelu", "BiasGelu"):
        if _attr(node, "approximate", "none") != "none":  # the kernel is the erf form
            return None
        add = _producer(first) if op == "Gelu" else node
        if add is None or (op == "Gelu" and add.op_type != "Add"):
            return None
        bias = [i for i in add.inputs if _const(i) and len(i.shape or ()) == 1]
        shape = _dims(add.inputs[0] if not _const(add.inputs[0]) else add.inputs[1], sizes)
        return (BIAS_GELU, _rows(shape)) if bias and shape else None
    if op == "Softmax":
        scores = _dims(node.outputs[0], sizes)
        users = [u for u, _ in node.outputs[0].uses() if u.op_type == "MatMul"]
        values = _dims(users[0].inputs[1], sizes) if users else None
        if scores is None or values is None or len(scores) != 4 or len(values) != 4:
            return None
        add = _producer(first)
        masked = add is not None and add.op_type == "Add"
        b, h, m, n = scores
        return ATTENTION, {"batch": b, "q_heads": h, "kv_heads": values[1], "m": m, "n": n, "head_dim": values[3],
                           "mask": int(masked), "causal": 0}  # fmt: skip
    if op == "GroupQueryAttention":
        if len(node.inputs) < 2 or node.inputs[1] is None:  # packed QKV: the query is not (b, s, heads x d)
            return None
        q = _dims(first, sizes)
        heads, kv_heads = _attr(node, "num_heads"), _attr(node, "kv_num_heads")
        context = sizes.get("past", 0) + (q[1] if q else 0)
        if not q or not heads or not kv_heads:
            return None
        return ATTENTION, {"batch": q[0], "q_heads": heads, "kv_heads": kv_heads, "m": q[1], "n": max(context, q[1]),
                           "head_dim": q[2] // heads, "mask": 0, "causal": 1}  # fmt: skip
    if op == "MatMulNBits" and _attr(node, "bits", 4) == 4:
        a = _dims(first, sizes)
        # ONNX Runtime packs zero points 4-bit and pads K to whole blocks; the kernel takes a byte
        # per group and whole groups: those nodes keep ONNX Runtime's kernel
        zeros = len(node.inputs) > 3 and node.inputs[3] is not None
        if not a or zeros or _attr(node, "K", 0) % _attr(node, "block_size", 32):
            return None
        return INT4_GEMM, {"m": math.prod(a[:-1]), "n": _attr(node, "N"), "k": _attr(node, "K"),
                           "group": _attr(node, "block_size", 32), "zeros": int(zeros)}  # fmt: skip
    if op == "RotaryEmbedding":
        x = _dims(first, sizes)
        if not x or len(x) != 4 or _attr(node, "interleaved", 0) or _attr(node, "rotary_embedding_dim", 0):
            return None  # the kernel rotates whole (batch, heads, seq, head) tensors, halves not interleaved
        return ROTARY, {"batch": x[0], "heads": x[1], "seq": x[2], "head_dim": x[3]}
    return None


def problems_in(model: ir.Model, sizes: Mapping[str, int]) -> dict[str, Found]:
    """Label -> the kernel, its problem and the nodes it serves (see the module docstring)."""
    found: dict[tuple[str, tuple], Found] = {}
    for node in model.graph.all_nodes():
        matched = _match(node, sizes)
        if matched is None:
            continue
        kernel, problem = matched
        if min(v for k, v in problem.items() if k not in FLAGS) <= 0:
            continue  # an empty example dimension: nothing to launch
        key = (kernel.name, tuple(sorted(problem.items())))
        item = found.setdefault(key, Found(kernel, problem))
        item.nodes.append(node.name or node.op_type)
        item.ops.append(node.op_type)
    labels: dict[str, Found] = {}
    for (name, _), item in found.items():
        count = sum(1 for label in labels if label.split("-")[0] == name)
        labels[name if count == 0 else f"{name}-{count + 1}"] = item
    return labels


def _norm_nodes(model: ir.Model) -> tuple[list[str], list[str], int | None]:
    """RMSNorms of an exported decoder (``Pow -> ReduceMean``, or the fused ops): (after a
    residual Add, the others, hidden size)."""
    residual, plain, hidden = [], [], None
    for node in model.graph.all_nodes():
        x = None
        if node.op_type == "ReduceMean" and _producer(node.inputs[0]) is not None:
            pow_node = _producer(node.inputs[0])
            x = pow_node.inputs[0] if pow_node.op_type == "Pow" else None
        elif node.op_type in ("SimplifiedLayerNormalization", "RMSNormalization"):
            x = node.inputs[0]
        elif node.op_type == "SkipSimplifiedLayerNormalization":
            residual.append(node.name)
            hidden = hidden or (node.inputs[0].shape[-1] if node.inputs[0].shape else None)
            continue
        if x is None:
            continue
        if x.shape is not None and isinstance(x.shape[-1], int):
            hidden = x.shape[-1]
        made = _producer(x)
        (residual if made is not None and made.op_type == "Add" else plain).append(node.name)
    return residual, plain, hidden


def decoder_problems(model: ir.Model, layout: Any, prompt: int = 512, context: int = 4096,
                     batch: int = 1, past: int = 0) -> dict[str, Found]:  # fmt: skip
    """The kernels of a decoder with a KV cache, for a prefill of ``prompt`` tokens and a decode
    step over ``context`` positions: its shapes come from the layout (KV heads, head size) and
    the graph's static dims (query heads, hidden size), the graph's symbolic ones being sums
    the exporter named for itself. The attention takes the additive mask (left padding, empty
    cache slots); a prefill attends over ``past`` cached positions plus its own."""
    context = min(context, layout.max_positions)
    prompt = min(prompt, context)
    found: dict[str, Found] = {}
    attention = [n for n in model.graph.all_nodes() if n.op_type in ("Softmax", "GroupQueryAttention")]
    heads = None
    for node in attention:
        if node.op_type == "GroupQueryAttention":
            heads = _attr(node, "num_heads")
        elif node.inputs[0].shape is not None and isinstance(node.inputs[0].shape[1], int):
            heads = node.inputs[0].shape[1]
    if attention and heads:
        base = {"batch": batch, "q_heads": heads, "kv_heads": layout.kv_heads, "head_dim": layout.head_dim,
                "causal": 1, "mask": 1}  # fmt: skip
        names, ops = [n.name for n in attention], [n.op_type for n in attention]
        found["attention_prefill"] = Found(ATTENTION, {**base, "m": prompt, "n": past + prompt}, names, ops)
        found["attention_decode"] = Found(ATTENTION, {**base, "m": 1, "n": context}, names, ops)
    residual, plain, hidden = _norm_nodes(model)
    if residual and hidden:
        norm_ops = ["RMSNorm"] * len(residual)
        found["add_rmsnorm_prefill"] = Found(ADD_RMSNORM, {"rows": batch * prompt, "n": hidden}, residual, norm_ops)
        found["add_rmsnorm_decode"] = Found(ADD_RMSNORM, {"rows": batch, "n": hidden}, residual, norm_ops)
    rotary = [n for n in model.graph.all_nodes() if n.op_type in ("RotaryEmbedding", "Neg")]
    if rotary and heads:  # rotate-half's Neg, one per rotated tensor
        found["rotary_prefill"] = Found(ROTARY, {"batch": batch, "heads": heads, "seq": prompt,
                                                 "head_dim": layout.head_dim}, [n.name for n in rotary],
                                        ["RotaryEmbedding"] * len(rotary))  # fmt: skip
    for node in model.graph.all_nodes():
        if node.op_type == "MatMulNBits" and _attr(node, "bits", 4) == 4:
            problem = {"m": batch, "n": _attr(node, "N"), "k": _attr(node, "K"), "group": _attr(node, "block_size", 32),
                       "zeros": int(len(node.inputs) > 3 and node.inputs[3] is not None)}  # fmt: skip
            if problem["zeros"] or problem["k"] % problem["group"]:  # see _match: ONNX Runtime's layout differs
                continue
            label = f"int4_gemm_decode_{problem['n']}x{problem['k']}"
            item = found.setdefault(label, Found(INT4_GEMM, problem))
            item.nodes.append(node.name)
            item.ops.append("MatMulNBits")
    return found
