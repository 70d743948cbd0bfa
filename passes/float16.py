"""FP16 / BF16 graph conversion with a keep-list, blocked nodes and few Casts.

Why not ONNX Runtime's ``float16`` tool: between two FP32-kept nodes it still rounds the
tensor through FP16 (a Cast pair), and it converts a kept node's initializers to FP16
before casting them back — both turn a value above 65504 into ``inf``, which is exactly
what dynamic precision switching must avoid. This pass decides per node from the ONNX
schema which inputs and outputs follow the float type variable, lowers only those, and
inserts one shared Cast per (tensor, type) boundary.
"""

from __future__ import annotations

__all__ = ["ConvertFloat"]

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from adapter.passes.base import CountedPass

_FLOAT = ir.DataType.FLOAT
_TYPE_NAMES = {ir.DataType.FLOAT16: "tensor(float16)", ir.DataType.BFLOAT16: "tensor(bfloat16)"}


@dataclass
class _Formal:
    inputs: list[bool] = field(default_factory=list)
    outputs: list[bool] = field(default_factory=list)
    variadic_in: bool = False
    variadic_out: bool = False


def _formal(node: ir.Node, opset: int, low: ir.DataType) -> _Formal | None:
    """Which formal inputs/outputs take the float type variable that allows ``low``."""
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
    except onnx.defs.SchemaError:
        return None
    allowed = {c.type_param_str for c in schema.type_constraints if _TYPE_NAMES[low] in c.allowed_type_strs and "tensor(float)" in c.allowed_type_strs}
    if not allowed:
        return None

    def flags(params) -> list[bool]:
        return [p.type_str in allowed for p in params]

    var = onnx.defs.OpSchema.FormalParameterOption.Variadic
    return _Formal(
        flags(schema.inputs), flags(schema.outputs),
        bool(schema.inputs) and schema.inputs[-1].option == var,
        bool(schema.outputs) and schema.outputs[-1].option == var,
    )  # fmt: skip


def _flag(flags: list[bool], variadic: bool, index: int) -> bool:
    if index < len(flags):
        return flags[index]
    return variadic and bool(flags) and flags[-1]


class ConvertFloat(CountedPass):
    """Lower float compute to FP16 or BF16 except keep-list ops and blocked nodes.

    Graph inputs and outputs keep FP32 (Casts at the boundary).
    """

    name = "convert-float"

    def __init__(self, dtype: ir.DataType = ir.DataType.FLOAT16, keep_ops: tuple[str, ...] = (), blocked: set[str] | None = None, max_value: float = 65504.0) -> None:
        super().__init__()
        self.dtype, self.keep_ops, self.blocked, self.max_value = dtype, set(keep_ops), set(blocked or ()), max_value

    def _lower_node(self, node: ir.Node, formal: _Formal | None) -> bool:
        if formal is None or node.domain not in ("", "ai.onnx") or node.op_type in self.keep_ops or node.name in self.blocked:
            return False
        if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
            return False
        floats = [v for i, v in enumerate(node.inputs) if v is not None and _flag(formal.inputs, formal.variadic_in, i) and v.dtype in (_FLOAT, self.dtype)]
        return bool(floats)

    def apply(self, model: ir.Model) -> dict[str, Any]:
        graph = model.graph
        casts: dict[tuple[int, ir.DataType], ir.Value] = {}
        lowered_inits: dict[str, ir.Value] = {}
        counts = {"nodes_lowered": 0, "casts_inserted": 0, "initializers_lowered": 0}

        def convert_input(node: ir.Node, value: ir.Value, target: ir.DataType) -> ir.Value:
            if value.dtype == target or value.dtype not in (_FLOAT, self.dtype):
                return value
            if value.const_value is not None and value.name in graph.initializers and target == self.dtype:
                if value.name not in lowered_inits:
                    array = np.clip(value.const_value.numpy().astype(np.float32), -self.max_value, self.max_value)
                    tensor = ir.tensor(array.astype(self.dtype.numpy()), name=f"{value.name}_{self.dtype.name.lower()}")
                    new = ir.Value(name=tensor.name, shape=value.shape, type=ir.TensorType(self.dtype), const_value=tensor)
                    graph.register_initializer(new)
                    lowered_inits[value.name] = new
                    counts["initializers_lowered"] += 1
                return lowered_inits[value.name]
            key = (id(value), target)
            if key not in casts:
                cast = ir.node("Cast", [value], attributes={"to": target})
                cast.outputs[0].dtype, cast.outputs[0].shape = target, value.shape
                cast.outputs[0].name = f"{value.name}_to_{target.name.lower()}"
                graph.insert_before(node, cast)
                casts[key] = cast.outputs[0]
                counts["casts_inserted"] += 1
            return casts[key]

        for node in list(graph):
            opset = model.opset_imports.get(node.domain or "", model.opset_imports.get("ai.onnx", 1))
            formal = _formal(node, opset, self.dtype)
            target = self.dtype if self._lower_node(node, formal) else _FLOAT
            for index, value in enumerate(node.inputs):
                if value is None:
                    continue
                follows = formal is not None and _flag(formal.inputs, formal.variadic_in, index)
                wanted = target if follows else _FLOAT
                if value.dtype in (_FLOAT, self.dtype) and value.dtype != wanted:
                    node.replace_input_with(index, convert_input(node, value, wanted))
            if target == self.dtype:
                counts["nodes_lowered"] += 1
                for index, value in enumerate(node.outputs):
                    if _flag(formal.outputs, formal.variadic_out, index) and value.dtype == _FLOAT:
                        # a new type object: a clone of the model shares its values' types
                        value.type = ir.TensorType(self.dtype)
        for index, value in enumerate(list(graph.outputs)):
            if value.dtype == self.dtype:
                cast = ir.node("Cast", [value], attributes={"to": _FLOAT})
                out = cast.outputs[0]
                out.dtype, out.shape = _FLOAT, value.shape
                name = value.name
                value.name = f"{name}_{self.dtype.name.lower()}"
                out.name = name
                graph.append(cast)
                graph.outputs[index] = out
                counts["casts_inserted"] += 1
        return counts
