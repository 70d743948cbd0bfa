"""What the GPU-recipe backends (TensorRT, MIGraphX) share: atomic files, the standard-domain
graph they write, and the ONNX Runtime CPU stand-in that verifies that same graph here."""

from __future__ import annotations

__all__ = [
    "write_atomic",
    "standard_domain_problems",
    "prepare_graph",
    "cpu_stand_in",
    "constant_of",
    "documented_support",
    "MAX_OPSET",
]

import os
import tempfile
from pathlib import Path
from typing import Any

import onnx_ir as ir

from adapter.backends import onnxruntime as ort_backend
from adapter.backends.base import Support, module_of
from adapter.core.errors import AdapterError, UnsupportedOp

MAX_OPSET = 20
"""Highest standard opset written: TensorRT 10's parser covers opsets 9-20
(onnx-tensorrt docs/operators.md); MIGraphX's matrix goes to 19 per op, 20 is accepted."""


def constant_of(value: ir.Value | None) -> Any:
    """The value's constant contents (initializer or Constant node) as an array, else None."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and producer.domain in ("", "ai.onnx"):
        attr = producer.attributes.get("value")
        if attr is not None:
            return attr.value.numpy()
    return None


def documented_support(node: ir.Node, documented: Any, foreign_domain: str) -> Any:
    """Whether a GPU parser takes ``node`` per its cited operator matrix.

    The standard domain only (``foreign_domain`` says why not, per backend); the op must
    be in the matrix; the inputs the matrix requires constant (``constant_inputs``) must
    be initializers or Constant nodes here.
    """
    doc = f"{documented.version}, {documented.source}"
    if node.domain not in ("", "ai.onnx"):
        return Support(False, f"{foreign_domain} ({doc})")
    if not documented.supports(node.op_type):
        note = documented.notes.get(node.op_type)
        return Support(False, f"{node.op_type} is not in the {doc}" + (f" ({note})" if note else ""))
    for index in documented.constant_inputs.get(node.op_type, ()):
        if index < len(node.inputs) and node.inputs[index] is not None and constant_of(node.inputs[index]) is None:
            note = documented.notes.get(node.op_type, "the matrix requires it to be a constant")
            return Support(False, f"input {index} is computed at run time: {note} ({doc})")
    return Support(True)


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write ``data`` to a temp file beside ``path``, fsync, and rename it into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def standard_domain_problems(model: ir.Model, why: str) -> list[UnsupportedOp]:
    """Every node outside the standard ONNX domain (after functions are inlined)."""
    return [
        UnsupportedOp(node.name or "", node.op_type, node.domain, module_of(node), why)
        for node in model.graph.all_nodes()
        if node.domain not in ("", "ai.onnx")
    ]


def prepare_graph(model: ir.Model, max_opset: int = MAX_OPSET) -> ir.Model:
    """A copy with local functions inlined and the standard opset at most ``max_opset``
    (:data:`MAX_OPSET`; 21 for blocked INT4 ``DequantizeLinear``, which needs it).

    Raises:
        AdapterError: The graph's opset is newer and ONNX's version converter cannot lower it.
    """
    model = model.clone()
    if model.functions:
        ir.passes.common.InlinePass()(model)
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", max_opset))
    if opset > max_opset:
        import onnx
        from onnx import version_converter

        try:
            lowered = version_converter.convert_version(ir.serde.serialize_model(model), max_opset)
        except Exception as exc:
            raise AdapterError(
                f"The graph uses ONNX opset {opset}; the GPU parsers read up to opset {max_opset} and ONNX's "
                f"version converter could not lower it: {str(exc).splitlines()[0][:300]}",
                f"Export with opset {max_opset} or lower.",
            ) from exc
        model = ir.serde.deserialize_model(onnx.ModelProto.FromString(lowered.SerializeToString()))
    return model


def check_onnx(path: Path) -> None:
    """Run ``onnx.checker`` (full check, shapes included) on a written model file.

    Raises:
        AdapterError: The checker refuses the file.
    """
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise AdapterError(
            f"The ONNX written for the GPU build fails onnx.checker: {str(exc).splitlines()[0][:400]}",
            "Report the model: the passes produced an invalid graph.",
        ) from exc


def cpu_stand_in(folder: Path, inputs: list, outputs: list, model_file: str, what: str) -> tuple[Any, str]:
    """An ONNX Runtime CPU engine over ``folder/model_file``, and its one-line description."""
    if model_file != ort_backend.MODEL_FILE:
        raise AdapterError(f"The stand-in expects {ort_backend.MODEL_FILE}, not {model_file}.")
    config = {"files": [model_file], "optimization": "all", "threads": 0, "save_optimized": False}
    engine = ort_backend.Engine(Path(folder), inputs, outputs, config)
    return engine, (
        f"ONNX Runtime {ort_backend.version()} CPU over the same {model_file} {what} "
        "(the graph the GPU engine is built from; its numerics are not the GPU's)"
    )
