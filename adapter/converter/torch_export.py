"""torch.export and the dynamo ONNX exporter, with errors a user can act on."""

from __future__ import annotations

import ast
import logging
import re
import warnings
from typing import Any

import numpy as np
import onnx_ir as ir
import torch

from adapter.core.errors import ExportError, UnsupportedOp, UnsupportedOpsError
from adapter.core.specs import DEFAULT_DIM_MAX, Dim

MODULE_KEY = "adapter.module"
"""Node metadata key holding the ``nn.Module`` path a node came from."""
MODULE_CLASS_KEY = "adapter.module_class"


def _first_lines(exc: BaseException, limit: int = 3) -> str:
    text = " ".join(line.strip() for line in str(exc).strip().splitlines()[:limit] if line.strip())
    return re.sub(r"\x1b\[[0-9;]*m", "", text)[:600]


def broaden_examples(inputs: dict[str, torch.Tensor], dynamic: dict[str, dict[int, Dim]]) -> dict[str, torch.Tensor]:
    """Repeat example inputs along dynamic axes of size 1 (torch.export specialises 0/1 sizes)."""
    out = dict(inputs)
    for name, axes in dynamic.items():
        for axis in axes:
            if name in out and out[name].shape[axis] == 1:
                out[name] = torch.cat([out[name], out[name]], dim=axis)
    return out


def export_program(module: torch.nn.Module, inputs: dict[str, torch.Tensor], dynamic: dict[str, dict[int, Dim]]):
    """Run ``torch.export.export`` with named dynamic dims; failures become ExportError."""
    unknown = sorted(set(dynamic) - set(inputs))
    if unknown:
        raise ExportError(
            f"--dynamic names input(s) {', '.join(unknown)} that the model does not take.",
            f"The model's inputs are: {', '.join(inputs)}.",
        )
    torch_dims: dict[str, Any] = {}
    shapes: dict[str, Any] = {}
    for name, value in inputs.items():
        axes = dynamic.get(name)
        if not axes:
            shapes[name] = None
            continue
        spec = {}
        for axis, dim in axes.items():
            if axis >= value.ndim:
                raise ExportError(f"--dynamic gives axis {axis} of '{name}', which has only {value.ndim} axes.")
            if dim.name not in torch_dims:
                torch_dims[dim.name] = torch.export.Dim(dim.name, min=dim.min, max=dim.max)
            spec[axis] = torch_dims[dim.name]
        shapes[name] = spec
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.export(module, (), inputs, dynamic_shapes=shapes, strict=False)
    except Exception as exc:  # torch.export raises many unrelated types
        raise ExportError(
            f"torch.export could not trace the model: {_first_lines(exc)}",
            "Check the --dynamic ranges (a dim the model fixes cannot be dynamic), or run "
            "with --debug for the full trace.",
        ) from exc


def _unsupported_torch_ops(program) -> list[UnsupportedOp]:
    """List every torch op in the program that the ONNX exporter has no translation for."""
    from torch.onnx._internal.exporter import _fx_passes, _registration

    registry = _registration.ONNXRegistry.from_torchlib()
    decomposed = _fx_passes.decompose_with_registry(program, registry)
    found: list[UnsupportedOp] = []
    for node in decomposed.graph_module.graph.nodes:
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
            continue
        if target.namespace == "onnx" or registry.is_registered(target):
            continue
        stack = node.meta.get("nn_module_stack") or {}
        module = list(stack.values())[-1][0] if stack else ""
        found.append(UnsupportedOp(node.name, str(target.name()), "torch", module, "no ONNX translation"))
    return found


def to_onnx(program, inputs: dict[str, torch.Tensor], opset: int | None = None) -> ir.Model:
    """Convert an ExportedProgram to an ``onnx_ir.Model`` with the dynamo exporter."""
    # The exporter logs a warning per missing torchvision op; they are not the user's concern.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            onnx_program = torch.onnx.export(
                program,
                (),
                kwargs=inputs,
                dynamo=True,
                optimize=False,
                verbose=False,
                opset_version=opset,
                report=False,
            )
    except Exception as exc:
        try:
            missing = _unsupported_torch_ops(program)
        except Exception:  # the analysis is best effort; the exporter's message stands
            missing = []
        if missing:
            raise UnsupportedOpsError(
                "onnx-exporter",
                missing,
                "Register an ONNX translation for these ops (torch.onnx.export custom_translation_table) "
                "or replace them with standard torch operations.",
            ) from exc
        raise ExportError(
            f"The ONNX exporter failed: {_first_lines(exc)}", "Run with --debug for the full trace."
        ) from exc
    model = onnx_program.model
    annotate_modules(model)
    return model


def annotate_modules(model: ir.Model) -> None:
    """Copy each node's ``nn.Module`` path from the exporter's metadata to ``adapter.module``."""
    for node in model.graph.all_nodes():
        scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
        classes = node.metadata_props.get("pkg.torch.onnx.class_hierarchy")
        if not scopes:
            continue
        try:
            names = ast.literal_eval(scopes)
            kinds = ast.literal_eval(classes) if classes else []
        except (ValueError, SyntaxError):
            continue
        if len(names) >= 2 and not str(names[0]).startswith("_empty_nn_module_stack"):
            node.metadata_props[MODULE_KEY] = str(names[-2])
            if len(kinds) >= 2:
                node.metadata_props[MODULE_CLASS_KEY] = str(kinds[-2])


def symbol_dims(program, dynamic: dict[str, dict[int, Dim]]) -> dict[str, Dim]:
    """Map torch.export's shape symbols (``s43``) to the user's named dims and ranges."""
    mapping: dict[str, Dim] = {}
    user_inputs = program.graph_signature.user_inputs
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    ranges = {str(sym): rng for sym, rng in program.range_constraints.items()}
    for name in user_inputs:
        node = placeholders.get(name)
        value = node.meta.get("val") if node is not None else None
        if not isinstance(value, torch.Tensor):
            continue
        for axis, size in enumerate(value.shape):
            if not isinstance(size, torch.SymInt):
                continue
            sym = str(size.node.expr)
            if sym in mapping:
                continue
            user = dynamic.get(name, {}).get(axis)
            if user is not None:
                mapping[sym] = user
                continue
            rng = ranges.get(sym)
            lo = int(rng.lower) if rng is not None and rng.lower.is_finite else 1
            hi = int(rng.upper) if rng is not None and rng.upper.is_finite else DEFAULT_DIM_MAX
            mapping[sym] = Dim(sym, max(lo, 1), min(hi, DEFAULT_DIM_MAX))
    return mapping


def rename_symbols(model: ir.Model, mapping: dict[str, Dim]) -> None:
    """Rewrite symbolic dims in every value's shape to the user's dim names."""
    if not mapping:
        return
    pattern = re.compile(r"\b(" + "|".join(re.escape(s) for s in sorted(mapping, key=len, reverse=True)) + r")\b")

    def fix(value: ir.Value) -> None:
        if value.shape is None:
            return
        dims = []
        changed = False
        for dim in value.shape:
            if isinstance(dim, ir.SymbolicDim) and dim.value is not None:
                new = pattern.sub(lambda m: mapping[m.group(1)].name, dim.value)
                changed |= new != dim.value
                dims.append(new)
            else:
                dims.append(dim)
        if changed:
            value.shape = ir.Shape(dims)

    for value in model.graph.inputs:
        fix(value)
    for node in model.graph.all_nodes():
        for value in node.outputs:
            fix(value)


def flatten_outputs(result: Any) -> list[tuple[str, torch.Tensor]]:
    """Flatten a forward's result into ``(name, tensor)`` pairs in pytree order."""
    from torch.utils import _pytree as pytree

    if isinstance(result, torch.Tensor):
        return [("output", result)]
    leaves, _ = pytree.tree_flatten_with_path(result)
    named = []
    for path, leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            continue
        parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
        named.append((".".join(parts) if parts else "output", leaf))
    if all(part.isdigit() for name, _ in named for part in name.split(".")):
        named = [(f"output_{name.replace('.', '_')}", leaf) for name, leaf in named]
    return named


def name_outputs(model: ir.Model, names: list[str]) -> None:
    """Give graph outputs the eager model's output names."""
    outputs = list(model.graph.outputs)
    if len(outputs) != len(names):
        return
    taken = {v.name for v in model.graph.inputs} | set(model.graph.initializers)
    for node in model.graph.all_nodes():
        taken.update(v.name for v in node.outputs)
    for value, name in zip(outputs, names):
        if value.name == name:
            continue
        if name in taken:
            clash = next((v for n in model.graph.all_nodes() for v in n.outputs if v.name == name), None)
            if clash is not None:
                clash.name = f"{name}__inner"
        value.name = name
        taken.add(name)


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """Detach a tensor to numpy, widening bfloat16 (numpy has no native bfloat16)."""
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.numpy()
