"""ONNX files as a source: vetted before opening, referenced by ONNX Runtime unoptimised."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

from adapter import _safety
from adapter.errors import SourceError
from adapter.specs import DEFAULT_DIM_MAX, Dim, TensorSpec


def _data_files(path: Path) -> list[Path]:
    import onnx

    proto = _safety.check_onnx_file(path)
    files = set()
    for tensor in _safety._iter_tensors(proto.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = {e.key: e.value for e in tensor.external_data}["location"]
            files.add(_safety.check_external_data_location(location, path.parent, path))
    return sorted(files)


def source_files(path: Path) -> list[str]:
    """The ONNX file and its (vetted) external-data files."""
    if not path.is_file():
        raise SourceError(f"'{path}' does not exist.", "Check the path of the .onnx file.")
    return [str(path)] + [str(p) for p in _data_files(path)]


def onnx_digest(path: Path) -> str:
    """Hash the ONNX file and every external-data file it uses (after vetting them)."""
    if not path.is_file():
        raise SourceError(f"'{path}' does not exist.", "Check the path of the .onnx file.")
    digest = hashlib.sha256()
    for file in [path, *_data_files(path)]:
        digest.update(file.name.encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def _input_specs(model: ir.Model, dynamic: dict[str, dict[int, Dim]]) -> list[TensorSpec]:
    names = {d.name: d for axes in dynamic.values() for d in axes.values()}
    initializers = set(model.graph.initializers)
    specs = []
    for value in model.graph.inputs:
        if value.name in initializers:
            continue
        if value.shape is None or value.dtype is None:
            raise SourceError(
                f"ONNX input '{value.name}' has no declared type or shape.",
                "Give the model's inputs full type information.",
            )
        dims: list[int | Dim] = []
        for axis, d in enumerate(value.shape):
            user = dynamic.get(value.name, {}).get(axis)
            if isinstance(d, int):
                if user is not None:
                    raise SourceError(
                        f"--dynamic makes axis {axis} of '{value.name}' dynamic, but the ONNX file fixes it to {d}.",
                        "Re-export the model with that axis dynamic.",
                    )
                dims.append(d)
            else:
                label = str(d.value) if d.value is not None else f"{value.name}_{axis}"
                dims.append(user or names.get(label) or Dim(label, 1, DEFAULT_DIM_MAX))
        specs.append(TensorSpec(value.name, value.dtype.numpy().name, tuple(dims)))
    return specs


def import_onnx(path: Path, dynamic: dict[str, dict[int, Dim]], digest: str):
    """Load a vetted ONNX file as an ImportedModel referenced by unoptimised ONNX Runtime."""
    import onnxruntime as ort

    from adapter.importer import ImportedModel
    from adapter.verify import random_inputs

    start = time.perf_counter()
    _data_files(path)
    try:
        model = ir.load(str(path))
    except Exception as exc:
        raise SourceError(f"'{path}' could not be read as an ONNX model: {exc}") from exc
    inputs = _input_specs(model, dynamic)
    outputs = [
        TensorSpec(
            v.name,
            v.dtype.numpy().name if v.dtype else "float32",
            tuple(d if isinstance(d, int) else Dim(str(d)) for d in (v.shape or [])),
        )
        for v in model.graph.outputs
    ]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    holder: dict[str, ort.InferenceSession] = {}

    def reference(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "session" not in holder:
            holder["session"] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        names = [o.name for o in outputs]
        return dict(zip(names, holder["session"].run(names, feed)))

    examples = random_inputs(inputs, None, np.random.default_rng(0))
    return ImportedModel(
        model=model,
        kind="onnx",
        source=str(path),
        digest=digest,
        inputs=inputs,
        outputs=outputs,
        example_inputs=examples,
        reference=reference,
        reference_kind="ONNX Runtime with graph optimizations off, on the source file",
        seconds={"load": time.perf_counter() - start},
    )
